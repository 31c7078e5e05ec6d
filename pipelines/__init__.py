"""trainpipe: the stages, the served model, their adapters and the commands, in layers.

    cli.py       the `trainpipe` command line: parses, prints, exits; nothing imports it
    commands/    promotion, promote/rollback, restart, status, compare, history
    stages/      ingest, curate, tokenize, train, evaluate, publish (each `python -m` runnable)
    serving/     the served model (what travels inside a logged model) and the endpoint
    adapters/    the only code that talks to MLflow, DVC, torch.distributed, checkpoints, the lock
    core/        model, optimizer, params, quality filters, scrub, dedupe, scoring: no servers

Imports point down only (tests/unit/test_layers.py). ``flows/`` (Prefect only) sits between cli and
commands; ``dvc.yaml`` declares the stages.
"""
