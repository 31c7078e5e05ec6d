"""trainpipe stages: one module per stage (ingest, curate, tokenize, train, evaluate, publish, serve).

Each stage has a pure core (objects in, objects out) and a thin ``run(params)`` that does the
I/O. ``flows/`` wires the stages together; ``dvc.yaml`` declares them.
"""
