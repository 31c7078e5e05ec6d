"""End to end: a score belongs to its weights. `trainpipe train` runs no evaluate, so the
metrics it leaves describe the previous weights: publish refuses them in one line and changes
nothing in the registry; after `trainpipe evaluate`, publish registers the new weights with their
own score. Real DVC, Prefect and MLflow, as in tests/integration/test_e2e.py."""

import json

import pytest
from conftest import BIN, MODEL, make_project, sh, trainpipe
from mlflow import MlflowClient

from pipelines.core.data import sha256_file

pytestmark = pytest.mark.slow


def registry(client: MlflowClient) -> dict:
    """Every version with its tags, the aliases and the registered model's tags."""
    model = client.get_registered_model(MODEL)
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name = '{MODEL}'")}
    return {"versions": versions, "aliases": dict(model.aliases), "tags": model.tags}


def test_publish_after_train_refuses_the_old_score_until_evaluate_runs(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    run = sh([str(BIN / "trainpipe"), "run"], proj, env, timeout=1200)  # every stage, on a shared CPU
    assert run.returncode == 0, run.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    before = registry(client)
    assert set(before["versions"]) == {"1"}
    weights = proj / "models/model.safetensors"

    def scored() -> dict:
        """evaluate's score: the numbers (metrics.json) and what they scored (evaluation.json)."""
        reports = proj / "reports"
        return {
            **json.loads((reports / "metrics.json").read_text()),
            **json.loads((reports / "evaluation.json").read_text()),
        }

    old_metrics = scored()
    assert old_metrics["weights_sha256"] == sha256_file(weights)

    trained = trainpipe(proj, env, "train", "-S", "train.max_steps=30")
    assert trained.returncode == 0, trained.stderr[-3000:]
    new_sha = sha256_file(weights)
    assert new_sha != old_metrics["weights_sha256"]
    assert scored() == old_metrics  # train ran no evaluate

    refused = trainpipe(proj, env, "publish")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"trainpipe publish: reports/evaluation.json scored other weights "
        f"(sha256 {old_metrics['weights_sha256'][:12]}) than models/model.safetensors "
        f"(sha256 {new_sha[:12]}): run `trainpipe evaluate` first"
    )
    assert registry(client) == before

    evaluated = trainpipe(proj, env, "evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = scored()
    assert metrics["weights_sha256"] == new_sha
    published = trainpipe(proj, env, "publish")
    assert published.returncode == 0, published.stderr[-3000:]
    version = client.get_model_version(MODEL, "2")
    assert float(version.tags["val_bits_per_byte"]) == metrics["val_bits_per_byte"]
    assert version.tags["val_bits_per_byte"] != repr(old_metrics["val_bits_per_byte"])
    assert version.tags["weights_sha256"] == new_sha
    assert version.tags["score_key"] == metrics["score_key"] == old_metrics["score_key"]
    assert version.tags["alias_decision"]  # the gate decided, on comparable scores, without a re-score
    assert "re-scored" not in version.tags["alias_decision"]
