"""Prefect flows: orchestration only. The stage logic lives in pipelines/, the stage graph in dvc.yaml."""
