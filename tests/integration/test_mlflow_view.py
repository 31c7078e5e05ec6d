"""MLflow as its users expect, against a real MLflow on SQLite in tmp_path: the experiment is a
model-training experiment (MLflow 3's UI otherwise treats it as GenAI), a run names the data it
used as dataset inputs with DVC's hashes, and training logs system metrics unless params.yaml
turns them off, from a thread that is gone when training ends."""

import json
import threading

import pytest
import yaml
from mlflow import MlflowClient
from test_stages import tokenized  # noqa: F401  (a fixture: tiny tokens in tmp_path, MLflow there)

from pipelines.adapters.registry import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    set_training_experiment,
    training_experiment,
)
from pipelines.core.params import load_params


def test_the_experiment_is_created_as_a_training_experiment(mlflow_env):
    client = MlflowClient()
    experiment_id = set_training_experiment("fresh")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert training_experiment(client, "fresh") == experiment_id  # found, not created twice


def test_an_existing_experiment_gets_the_kind_and_a_chosen_kind_stays(mlflow_env):
    client = MlflowClient()
    old = client.create_experiment("made-before")  # as an earlier trainpipe made it: no kind
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert training_experiment(client, "made-before") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    training_experiment(client, "genai")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def write_workspace(root, params) -> dict:
    """dvc.lock outs and tokens/meta.json as the curate and tokenize stages leave them."""
    lock = {
        "schema": "2.0",
        "stages": {
            "curate": {"outs": [{"path": params.data.curated_dir, "md5": "c" * 32 + ".dir"}]},
            "tokenize": {"outs": [{"path": params.data.tokens_dir, "md5": "d" * 32 + ".dir"}]},
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    meta = {
        "vocab_size": 400,
        "val_set_sha256": "e" * 64,
        "train": {"documents": 90, "tokens": 5000, "bytes": 20000},
        "val": {"documents": 10, "tokens": 600, "bytes": 2500},
    }
    (root / params.data.tokens_dir).mkdir(parents=True)
    (root / params.data.tokens_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def test_a_run_logs_the_data_it_used_as_dataset_inputs(mlflow_env, tmp_path):
    import mlflow

    from pipelines.adapters.run_datasets import log_run_datasets

    params = load_params(tmp_path / "absent.yaml")
    write_workspace(tmp_path, params)
    set_training_experiment("trainpipe")
    with mlflow.start_run() as run:
        assert log_run_datasets(params.data, "abc123") == ["curated", "tokens", "validation"]
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    found = {
        i.dataset.name: (i.dataset.digest, json.loads(i.dataset.source), {t.key: t.value for t in i.tags})
        for i in inputs
    }
    assert found["curated"] == (
        "c" * 32 + ".dir",
        {"uri": "data/curated", "dvc_stage": "curate", "git_commit": "abc123"},
        {"mlflow.data.context": "training"},
    )
    assert found["tokens"][:2] == (
        "d" * 32 + ".dir",
        {"uri": "data/tokens", "dvc_stage": "tokenize", "git_commit": "abc123"},
    )
    assert found["validation"][0] == "e" * 32 and found["validation"][2] == {
        "mlflow.data.context": "evaluation"
    }
    curated = next(i.dataset for i in inputs if i.dataset.name == "curated")
    assert curated.source_type == "local" and json.loads(curated.profile) == {
        "documents": 100,
        "bytes": 22500,
    }


def test_without_a_dvc_lock_no_dataset_is_claimed(mlflow_env, tmp_path):
    from pipelines.adapters.run_datasets import run_datasets

    assert run_datasets(load_params(tmp_path / "absent.yaml").data) == []


@pytest.fixture
def tokenized_env(tokenized, monkeypatch):  # noqa: F811
    # a sample every 0.2 s: the tiny training lasts seconds, MLflow's default interval is 10 s
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    return tokenized


def system_metric_keys(run_id: str) -> set[str]:
    return {k for k in MlflowClient().get_run(run_id).data.metrics if k.startswith("system/")}


@pytest.mark.parametrize("on", [True, False])
def test_training_logs_system_metrics_unless_turned_off(tokenized_env, on):
    from pipelines.stages import train

    params = tokenized_env.model_copy(deep=True)
    params.train.system_metrics = on
    params.train.max_steps = 120  # a few seconds: several samples
    train.train_model(params, log=lambda *_: None)
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("trainpipe").experiment_id])
    keys = system_metric_keys(run.info.run_id)
    if on:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    else:
        assert keys == set()
    assert "SystemMetricsMonitor" not in {t.name for t in threading.enumerate()}  # stopped with the run
    # the step metrics every run logs, under the same names
    assert {"train_loss", "lr", "tokens_per_s"} <= set(run.data.metrics)
