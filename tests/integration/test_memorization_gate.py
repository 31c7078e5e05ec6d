"""The promotion gate refuses a challenger that reproduces a removed secret, on a real MLflow registry;
the flow logs the counts per kind (one's own formats' too) as MLflow metrics."""

import itertools
from pathlib import Path

import pytest
from conftest import make_model_dir, write_metrics
from mlflow import MlflowClient

from pipelines.commands.promotion import DECISION_TAG, publish_model
from pipelines.core.data import read_json, write_json
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params
from pipelines.core.spans import SPANS_FILE

_seeds = itertools.count(1)


@pytest.fixture
def params(mlflow_env, model_dir) -> Params:
    return Params()


def publish(params: Params, bpb: float, memorized: int = 0) -> dict:
    make_model_dir(params.train.model_dir, seed=next(_seeds))
    write_metrics(params.evaluate.reports_dir, bpb, memorized_secrets=memorized)
    return publish_model(params)


def test_a_challenger_that_reproduces_a_removed_secret_is_never_promoted(params):
    client, name = MlflowClient(), params.publish.model_name
    assert publish(params, 2.10)["promoted"] is True

    leaky = publish(params, 1.80, memorized=2)  # far better by bits per byte
    assert leaky["promoted"] is False and leaky["champion_version"] == "1"
    assert leaky["reason"].startswith(
        "v2 reproduces 2 removed secrets (email 2) of 10 checked from their context "
        "(see reports/memorization.json): never promoted, champion v1 keeps serving "
        "(by its score alone: challenger -0.3000 bpb [-0.3000, -0.3000]: better, v2 becomes champion"
    )
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["memorized_secrets"] == "2" and tags["memorization_checked"] == "10"
    assert tags[DECISION_TAG] == leaky["reason"] and "promoted_at" not in tags


def test_a_first_version_that_reproduces_a_removed_secret_does_not_become_champion(params):
    client, name = MlflowClient(), params.publish.model_name
    first = publish(params, 2.10, memorized=1)
    assert first["promoted"] is False and first["champion_version"] is None
    assert (
        "v1 reproduces 1 removed secret (email 1)" in first["reason"]
        and "no champion is set" in first["reason"]
    )
    assert "champion" not in client.get_model_version(name, "1").aliases
    assert client.get_model_version(name, "1").tags[DECISION_TAG] == first["reason"]


def test_a_memorization_count_of_other_spans_is_refused(params, tmp_path):
    """A count made before curate re-ran (a pattern added) says nothing of the new spans."""
    make_model_dir(params.train.model_dir, seed=next(_seeds))
    write_metrics(params.evaluate.reports_dir, 2.0)
    spans = Path(params.curate.reports_dir) / SPANS_FILE
    spans.write_text('{"path": "a.py", "offset": 3, "kind": "corp_token", "length": 34, "sha256": "00"}\n')
    with pytest.raises(ConfigError) as err:
        publish_model(params)
    assert str(err.value) == (
        "reports/evaluation.json checked memorization against other scrubbed spans than "
        "reports/scrubbed_spans.jsonl holds now: run `trainpipe evaluate` first"
    )
    # and a report without the check at all (evaluated before it existed) is refused too
    spans.unlink()
    metrics = read_json(tmp_path / "reports/metrics.json")
    del metrics["memorized_secrets"]
    write_json(tmp_path / "reports/metrics.json", metrics)
    with pytest.raises(
        ConfigError, match="reports/metrics.json has no 'memorized_secrets': run `trainpipe evaluate` again"
    ):
        publish_model(params)


def test_the_flow_logs_scrubbed_and_memorized_counts_per_kind(params):
    import mlflow

    from flows.training import curation_metrics, log_memorization

    write_json(
        Path(params.evaluate.reports_dir) / "memorization.json",
        {
            "per_kind": {
                "corp_token": {"checked": 1, "memorized": 1},
                "email": {"checked": 40, "memorized": 0},
            }
        },
    )
    curation = {"documents_in": 3, "scrubbed": {"email": 824, "corp_token": 12}}
    with mlflow.start_run() as run:
        mlflow.log_metrics(curation_metrics(curation))
        log_memorization(params)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["curate_scrubbed_corp_token"] == 12 and metrics["curate_scrubbed_email"] == 824
    assert metrics["memorized.corp_token"] == 1 and metrics["memorization_checked.corp_token"] == 1
    assert metrics["memorized.email"] == 0 and metrics["memorization_checked.email"] == 40
