"""The cost ledger: stage processes report what they spent, the ledger prices it by device,
publish keeps every run since the champion on the version (failed runs included), and
`trainpipe status` shows the champion's training cost, inference cost and payback. On a real
MLflow registry (SQLite) with a real smoke test; the flow end to end is tests/integration/test_ledger_e2e.py."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import make_model_dir, write_metrics
from mlflow import MlflowClient

from pipelines.cli import main
from pipelines.commands.promotion import publish_model
from pipelines.commands.status import format_status, read_status
from pipelines.core.ledger import (
    RUN_USD,
    format_usd,
    ledger_metrics,
    payback_million_tokens,
    price_stage,
    run_ledger,
    train_work,
    usd_per_million_tokens,
)
from pipelines.core.params import CostParams, Params
from pipelines.core.usage import USAGE_DIR_ENV, note_unreported_attempt, read_usage

RATES = CostParams(cpu_hour_usd=36.0, gpu_hour_usd=360.0)  # 1 cent a CPU-second, 10 a GPU-second
STAGES = ["inputs", "ingest", "curate", "tokenize", "train", "evaluate"]
PYTHON = sys.executable


def record(
    stage: str, seconds: float, device: str = "cpu", rank: int | None = None, rss_mb: float = 100
) -> dict:
    """A report as pipelines/core/usage.py writes it."""
    return {
        "stage": stage,
        "pid": 1,
        "rank": rank,
        "device": device,
        "seconds": seconds,
        "peak_rss_bytes": int(rss_mb * 1_000_000),
        "cuda_peak_bytes": 2_000_000_000 if device == "cuda" else None,
        "exit": "ok",
    }


@pytest.mark.parametrize(
    ("records", "device_s", "cpu_s", "gpu_s", "usd", "attempts"),
    [
        ([], 0, 0, 0, 0, 0),  # skipped by DVC: no process ran
        ([record("train", 10)], 10, 10, 0, 0.10, 1),
        ([record("train", 10), record("train", 5)], 15, 15, 0, 0.15, 2),  # a retry pays for both tries
        ([record("train", 10, "cuda")], 10, 0, 10, 1.0, 1),  # a GPU stage pays the GPU rate only
        # torchrun on 2 GPUs: the launcher holds the machine, each rank one GPU
        (
            [record("train", 12), record("train", 10, "cuda", 0), record("train", 10, "cuda", 1)],
            12,
            12,
            20,
            2.12,
            1,
        ),
        # torchrun on the CPU: the ranks share the launcher's machine, they add nothing
        ([record("train", 12), record("train", 10, rank=0), record("train", 10, rank=1)], 12, 12, 0, 0.12, 1),
        ([record("curate", 99)], 0, 0, 0, 0, 0),  # another stage's report is not train's
    ],
)
def test_price_stage_counts_wall_seconds_by_device(records, device_s, cpu_s, gpu_s, usd, attempts):
    cost = price_stage("train", records, RATES)
    assert (cost.device_s, cost.cpu_s, cost.gpu_s, cost.attempts) == (device_s, cpu_s, gpu_s, attempts)
    assert cost.usd == pytest.approx(usd)
    assert cost.ran is bool(attempts)
    assert cost.device == ("cuda" if gpu_s else "cpu")


def test_run_ledger_lists_every_stage_and_keeps_the_largest_memory():
    records = [
        record("curate", 4, rss_mb=900),
        record("train", 20, rss_mb=300),
        record("train", 20, "cuda", 0),
    ]
    ledger = run_ledger(STAGES, records, RATES)
    assert [c["stage"] for c in ledger["stages"]] == STAGES
    assert [c["ran"] for c in ledger["stages"]] == [False, False, True, False, True, False]
    assert ledger["device_s"] == 24 and ledger["cpu_s"] == 24 and ledger["gpu_s"] == 20
    assert ledger["usd"] == pytest.approx(0.24 + 2.0)
    assert ledger["peak_rss_mb"] == 900
    metrics = ledger_metrics(ledger)
    assert metrics["cost.ingest.device_s"] == 0 and metrics["cost.ingest.usd"] == 0
    assert metrics["cost.train.cuda_peak_mb"] == 2000 and "cost.curate.cuda_peak_mb" not in metrics
    assert metrics[RUN_USD] == pytest.approx(2.24)


WORK = {"steps": 100, "tokens_seen": 409600, "flops_per_token": 1e6}


@pytest.mark.parametrize(
    ("works", "tokens", "flops"),
    [
        ([], 0, 0.0),  # train skipped, restored by DVC, or failed before its end
        ([WORK | {"resumed_from_step": 0}], 409600, 4.096e11),
        # resumed at step 40: this run spent 60 of the 100 steps
        ([WORK | {"resumed_from_step": 40}], 245760, 2.4576e11),
        ([WORK | {"resumed_from_step": 100}], 0, 0.0),
    ],
)
def test_train_work_counts_only_what_this_run_trained(works, tokens, flops):
    work = train_work(works)
    assert work["tokens"] == tokens and work["flops"] == pytest.approx(flops)


def test_the_ledger_reads_train_work_from_finished_train_processes_only():
    """train's usage report carries its work; a failed attempt's, a curate's or none count nothing."""
    done = {"stage": "train", "rank": None, "device": "cpu", "seconds": 10.0, "exit": "ok"}
    records = [
        done | {"exit": "failed", "work": WORK | {"resumed_from_step": 0}},
        done | {"work": WORK | {"resumed_from_step": 40}},
        {"stage": "curate", "rank": None, "device": "cpu", "seconds": 1.0, "exit": "ok", "work": WORK},
    ]
    ledger = run_ledger(STAGES, records, RATES)
    assert ledger["train_tokens"] == 245760 and ledger["model_tokens_seen"] == 409600


def test_inference_cost_and_payback():
    # 100 tokens/s on the CPU at $36 an hour: 10,000 s for a million tokens, $100
    assert usd_per_million_tokens(100, "cpu", RATES) == pytest.approx(100.0)
    assert usd_per_million_tokens(100, "cuda", RATES) == pytest.approx(1000.0)
    assert payback_million_tokens(250.0, 100.0) == pytest.approx(2.5)
    assert [format_usd(v) for v in (1234.5, 0.0123, 0.000412, 0)] == [
        "$1,234.50",
        "$0.0123",
        "$0.000412",
        "$0",
    ]


def test_a_stage_process_reports_what_it_spent_passed_or_failed(tmp_path):
    """Real stage commands as dvc.yaml runs them: ingest passes, tokenize fails (no curated data);
    each writes its report; without TRAINPIPE_USAGE_DIR nothing is written."""
    source, usage = tmp_path / "src", tmp_path / "usage"
    source.mkdir()
    usage.mkdir()
    (source / "a.py").write_text("def f():\n    return 1\n")
    env = {**os.environ, USAGE_DIR_ENV: str(usage), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    started = time.monotonic()
    ingest = subprocess.run(
        [PYTHON, "-m", "pipelines.stages.ingest", "-S", f"data.source={source}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    wall = time.monotonic() - started
    tokenize = subprocess.run(
        [PYTHON, "-m", "pipelines.stages.tokenize"], cwd=tmp_path, env=env, capture_output=True
    )
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert tokenize.returncode == 2
    reports = {r["stage"]: r for r in read_usage(usage)}
    assert set(reports) == {"ingest", "tokenize"}
    assert reports["ingest"]["exit"] == "ok" and reports["tokenize"]["exit"] == "failed"
    assert 0.1 < reports["ingest"]["seconds"] <= wall  # the process's own life, imports included
    assert reports["ingest"]["device"] == "cpu" and reports["ingest"]["cuda_peak_bytes"] is None
    assert reports["ingest"]["peak_rss_bytes"] > 20_000_000  # python, pandas and datasets at least
    assert all(r["rank"] is None for r in reports.values())

    del env[USAGE_DIR_ENV]
    subprocess.run([PYTHON, "-m", "pipelines.stages.tokenize"], cwd=tmp_path, env=env, capture_output=True)
    assert len(list(usage.iterdir())) == 2


def test_a_failed_attempt_without_a_report_counts_the_flows_wall_time(tmp_path):
    """A stage process killed outright writes no report: the flow's time around it stands in."""
    old = tmp_path / "train-1.json"
    old.write_text(json.dumps(record("train", 7)))  # an earlier attempt's report
    since = time.time_ns()
    written = note_unreported_attempt(tmp_path, "train", since, 12.5)
    assert written is not None
    cost = price_stage("train", read_usage(tmp_path), RATES)
    assert (cost.device_s, cost.attempts) == (19.5, 2) and cost.usd == pytest.approx(0.195)
    # an attempt whose process did report needs no stand-in
    (tmp_path / "train-2.json").write_text(json.dumps(record("train", 3)))
    assert note_unreported_attempt(tmp_path, "train", since, 4.0) is None


def log_flow_run(ledger_records: list[dict], status: str = "FINISHED") -> str:
    """An MLflow run holding a flow run's ledger, logged as the flow logs it: its id."""
    mlflow.set_experiment(Params().publish.experiment)
    run = mlflow.start_run(run_name="flow-test", tags={"prefect_flow_run_id": "test"})
    mlflow.log_metrics(ledger_metrics(run_ledger(STAGES, ledger_records, RATES)))
    mlflow.end_run(status)
    time.sleep(0.01)  # runs started in one millisecond would not be ordered
    return run.info.run_id


@pytest.fixture
def published_with_ledger(mlflow_env, tmp_path):
    """v1 (champion, smoke-tested in a fresh process) from a run that cost 10 CPU-seconds; then a
    failed run (5 s), a run without a ledger, and v2 (a worse challenger) from a run of 20 s."""
    params = Params(cost=RATES)
    first = log_flow_run([record("train", 10)])
    make_model_dir(params.train.model_dir, seed=1)
    write_metrics(params.evaluate.reports_dir, 2.0)
    v1 = publish_model(params, run_id=first)
    failed = log_flow_run([record("ingest", 2), record("curate", 3)], status="FAILED")
    with mlflow.start_run(run_name="train"):  # `trainpipe train` by hand: no ledger, not counted
        mlflow.log_metric("train_seconds", 99)
    time.sleep(0.01)
    second = log_flow_run([record("train", 20)])
    make_model_dir(params.train.model_dir, seed=2)
    write_metrics(params.evaluate.reports_dir, 2.5)
    v2 = publish_model(params, run_id=second)
    assert (v1["version"], v1["promoted"], v2["version"], v2["promoted"]) == ("1", True, "2", False)
    return params, {"first": first, "failed": failed, "second": second}


def test_a_version_keeps_the_cost_of_every_run_since_the_champion_failed_ones_included(published_with_ledger):
    client = MlflowClient()
    name = Params().publish.model_name
    v1 = client.get_model_version(name, "1").tags
    assert v1["cost_since"] == "the first run" and v1["cost_cumulative_runs"] == "1"
    assert float(v1["cost_run_usd"]) == pytest.approx(0.10)
    assert float(v1["cost_cumulative_usd"]) == pytest.approx(0.10)
    v2 = client.get_model_version(name, "2").tags
    assert v2["cost_since"] == "v1"
    assert (v2["cost_cumulative_runs"], v2["cost_cumulative_failed_runs"]) == ("2", "1")
    assert float(v2["cost_cumulative_cpu_s"]) == pytest.approx(25)  # the failed run's 5 s and its own 20
    assert float(v2["cost_cumulative_usd"]) == pytest.approx(0.25)
    assert float(v2["cost_run_usd"]) == pytest.approx(0.20) and float(v2["cost_run_cpu_s"]) == pytest.approx(
        20
    )


def test_status_shows_the_champions_training_cost_inference_cost_and_payback(published_with_ledger, capsys):
    params, _ = published_with_ledger
    tags = MlflowClient().get_model_version(params.publish.model_name, "1").tags
    # the smoke test timed a warm request through the pyfunc predict the endpoint runs
    tokens_per_s = float(tags["inference_tokens_per_s"])
    assert (
        tokens_per_s > 0
        and tags["inference_device"] == "cpu"
        and "new tokens in" in tags["inference_measured"]
    )

    cost = read_status(params)["cost"]
    assert cost["version"] == "1"
    assert cost["training_run_usd"] == pytest.approx(0.10)
    assert cost["training_cumulative_usd"] == pytest.approx(0.10)
    per_mtok = 36 / 3600 * 1e6 / tokens_per_s
    assert cost["inference_usd_per_million_tokens"] == pytest.approx(per_mtok)
    assert cost["payback_million_tokens"] == pytest.approx(0.10 / per_mtok)

    lines = format_status(read_status(params))
    training, inference, payback = (
        next(ln for ln in lines if ln.startswith(k)) for k in ("training:", "inference:", "payback:")
    )
    assert "v1: $0.100 its own run; $0.100 to arrive at it (1 run since the first run)" in training
    assert f"{format_usd(per_mtok)} per million tokens" in inference and "tokens/s on cpu" in inference
    assert f"{0.10 / per_mtok:,.3g} million tokens served" in payback

    main(["status", "--json", "-S", "cost.cpu_hour_usd=36", "-S", "cost.gpu_hour_usd=360"])
    shown = json.loads(capsys.readouterr().out)["cost"]
    assert shown["training_run_usd"] == pytest.approx(0.10)
    assert shown["inference_usd_per_million_tokens"] == pytest.approx(per_mtok)
    assert math.isclose(shown["payback_million_tokens"], 0.10 / per_mtok, rel_tol=1e-9)


def test_bad_cost_params_are_one_line_errors(tmp_path):
    trainpipe = str(Path(PYTHON).parent / "trainpipe")
    for override, reason in (
        ("cost.cpu_hour_usd=-1", "greater than 0"),
        ("cost.gpu_hour_usd=free", "valid number"),
        ("cost.gpu_hour_usd=nan", "finite number"),  # nan in -S grammar (Hydra, as dvc exp run -S)
    ):
        result = subprocess.run(
            [trainpipe, "status", "-S", override], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        key = override.split("=")[0]
        assert line.startswith(f"trainpipe status: params.yaml: parameter '{key}'") and reason in line, line
