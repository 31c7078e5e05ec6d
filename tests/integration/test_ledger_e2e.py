"""The cost ledger end to end on a fresh project: a flow run that the data gate stops still logs
what its stages cost; the next run's version counts it in the cost of arriving at the model; the
Prefect artifact shows the ledger and `trainpipe status` the champion's three figures. Real
`trainpipe run` flows (Prefect, `dvc repro`, MLflow on SQLite), as in tests/integration/test_e2e.py."""

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import MODEL, SMALL, make_project, trainpipe
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

STAGES = ("inputs", "parent", "ingest", "curate", "tokenize", "train", "evaluate")


def flow_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("trainpipe").experiment_id
    return client.search_runs([experiment], order_by=["attributes.start_time ASC"])


def test_every_run_logs_its_cost_and_the_version_counts_the_failed_one(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    failed = trainpipe(proj, env, "run", "-S", "curate.gate.min_bytes=999999999")
    assert failed.returncode == 3, failed.stderr[-2000:]
    min_bytes = next(o for o in SMALL if o.startswith("curate.gate.min_bytes="))
    run = trainpipe(proj, env, "run", "-S", min_bytes)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cost: $" in run.stdout

    (first, second) = flow_runs(client)
    assert (first.info.status, second.info.status) == ("FAILED", "FINISHED")
    # the failed run: ingest and curate ran (and the inputs check), nothing after the gate
    m = first.data.metrics
    assert m["cost.ingest.device_s"] > 0 and m["cost.curate.device_s"] > 0 and m["cost.inputs.device_s"] > 0
    assert m["cost.train.device_s"] == m["cost.tokenize.device_s"] == 0 and m["cost.train_flops"] == 0
    assert m["cost.curate.peak_rss_mb"] > 50 and m["cost.usd"] > 0
    # the good run: ingest and parent were cached by the failed one; train spent 60 steps x 8 x 64 tokens
    m = second.data.metrics
    assert m["cost.ingest.device_s"] == m["cost.parent.device_s"] == 0 and all(
        m[f"cost.{s}.device_s"] > 0 for s in STAGES if s not in ("ingest", "parent")
    )
    summary = json.loads((proj / "models/train.json").read_text())
    assert m["cost.train_tokens"] == 60 * 8 * 64 == summary["tokens_seen"]
    assert m["cost.train_flops"] == pytest.approx(summary["flops_per_token"] * 60 * 8 * 64)
    assert m["cost.device_s"] == pytest.approx(sum(m[f"cost.{s}.device_s"] for s in STAGES))
    rate = 0.10264 / 3600  # the default CPU hour: no GPU here
    assert m["cost.usd"] == pytest.approx(m["cost.device_s"] * rate)

    tags = client.get_model_version(MODEL, "1").tags
    assert (tags["cost_cumulative_runs"], tags["cost_cumulative_failed_runs"]) == ("2", "1")
    assert float(tags["cost_run_usd"]) == pytest.approx(m["cost.usd"])
    assert float(tags["cost_cumulative_usd"]) == pytest.approx(first.data.metrics["cost.usd"] + m["cost.usd"])

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        artifacts = [
            json.loads(d)
            for (d,) in db.execute("SELECT data FROM artifact WHERE key = 'trainpipe-run' ORDER BY created")
        ]
    assert "## Cost" in artifacts[0] and "| tokenize | not reached | 0 |" in artifacts[0]
    assert (
        "| ingest | skipped | 0 |" in artifacts[1]
        and "| train | cpu |" in artifacts[1]
        and f"training: {60 * 8 * 64:,} tokens" in artifacts[1]
    )

    status = trainpipe(proj, env, "status", "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    cost = json.loads(status.stdout)["cost"]
    assert cost["training_run_usd"] == pytest.approx(m["cost.usd"])
    assert cost["training_cumulative_usd"] == pytest.approx(float(tags["cost_cumulative_usd"]))
    assert cost["inference_usd_per_million_tokens"] > 0 and cost["payback_million_tokens"] > 0
    text = trainpipe(proj, env, "status").stdout
    assert "(2 runs since the first run, 1 failed)" in text
    assert "per million tokens" in text and "million tokens served cost as much as its training run" in text
    print(text)  # the figures, for a person reading the test log
