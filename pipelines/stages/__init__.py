"""The stages, one module each (ingest, curate, tokenize, train, evaluate, publish): a pure core and
a thin `run(params)`, runnable as `python -m pipelines.stages.<stage>` from dvc.yaml."""
