"""End to end on a slice of the real stdlib corpus, with every component real: `dvc repro` in a
temporary git repository, Prefect flow runs through `trainpipe run`, an MLflow registry on
SQLite, and `trainpipe serve` answering HTTP."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import copy_mlflow_db
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "e2e-model"
SMALL = [
    "data.max_documents=150",
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=100000",
    "tokenize.vocab_size=400",
    "tokenize.val_fraction=0.1",
    "train.max_steps=60",
    "train.batch_size=8",
    "train.block_size=64",
    "train.n_layer=2",
    "train.n_head=2",
    "train.n_embd=64",
    "train.checkpoint_every=20",
    "train.warmup_steps=10",
    "evaluate.max_tokens=20000",
    "evaluate.sample_tokens=16",
    f"publish.model_name={MODEL}",
]


def make_project(root: Path, template_db: Path) -> tuple[Path, dict]:
    """A fresh clone-like copy of the project (tracked files only) with small params."""
    proj = root / "proj"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if name.startswith("tests/"):
            continue
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, proj / name)
    from pipelines.params import save_overrides

    save_overrides(proj / "params.yaml", SMALL)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(["git", *args], cwd=proj, check=True)
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=copy_mlflow_db(template_db, root),
        PREFECT_HOME=str(root / "prefect"),
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(proj),  # the copy's code, as a clone's editable install would give
    )
    env.pop("MLFLOW_RUN_ID", None)
    return proj, env


def sh(args: list[str], proj: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)


def trainpipe(proj, env, *args) -> subprocess.CompletedProcess:
    return sh([str(BIN / "trainpipe"), *args], proj, env)


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template_db):
    return make_project(tmp_path_factory.mktemp("e2e"), mlflow_template_db)


def champion(env) -> str | None:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    try:
        return str(client.get_model_version_by_alias(MODEL, "champion").version)
    except Exception:
        return None


def test_dvc_repro_runs_every_stage_then_nothing(project):
    proj, env = project
    first = sh([str(BIN / "dvc"), "repro"], proj, env)
    assert first.returncode == 0, first.stderr[-2000:]
    for stage in ("ingest", "curate", "tokenize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    for out in (
        "data/raw/documents.parquet",
        "data/curated/documents.parquet",
        "data/tokens/train.bin",
        "models/model.safetensors",
        "reports/metrics.json",
        "reports/curation.json",
        "reports/data_docs/index.html",
    ):
        assert (proj / out).exists(), out
    second = sh([str(BIN / "dvc"), "repro"], proj, env)
    assert second.returncode == 0 and "Running stage" not in second.stdout
    status = sh([str(BIN / "dvc"), "status"], proj, env)
    assert "up to date" in status.stdout


def test_flow_run_shares_dvc_cache_and_publishes_champion(project):
    proj, env = project
    run = trainpipe(proj, env, "run")
    assert run.returncode == 0, run.stderr[-3000:]
    # the stages ran under `dvc repro` above: the flow re-executes none of them
    assert "Running stage" not in run.stdout
    assert f"models:/{MODEL}@champion" in run.stdout and "trainpipe serve" in run.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    assert version.tags["prefect_flow_run_id"] and version.tags["data_version"]
    assert len(version.tags["git_commit"]) >= 40
    # the flow's Prefect artifact, read from the Prefect database the run used
    import json
    import sqlite3

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        (data,) = db.execute("SELECT data FROM artifact WHERE key = 'trainpipe-run'").fetchone()
    summary = json.loads(data)
    assert "| train | skipped" in summary and "kept: " in summary and "val_bits_per_byte" in summary
    assert "becomes champion" in summary
    run_data = client.get_run(version.run_id).data
    assert "val_bits_per_byte" in run_data.metrics and run_data.params["train.max_steps"] == "60"
    assert "train_loss" in run_data.metrics or client.get_metric_history(version.run_id, "train_loss") == []
    # the curated data's profile is stored with the model, for the data gate of later runs
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"data_profile.json", "curation"} <= artifacts
    curation = {a.path for a in client.list_artifacts(version.run_id, "curation")}
    assert {"curation/curation.json", "curation/gate.json", "curation/data_docs"} <= curation


def test_unchanged_rerun_executes_nothing_and_registers_nothing(project):
    proj, env = project
    run = trainpipe(proj, env, "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Running stage" not in run.stdout and "nothing new to publish" in run.stdout
    assert "unchanged: data, code and params as before; DVC skipped every stage" in run.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]
    latest = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id], order_by=["start_time DESC"]
    )[0]
    assert {k: v for k, v in latest.data.tags.items() if k.startswith("stage.")} == {
        f"stage.{s}": "skipped" for s in ("ingest", "curate", "tokenize", "train", "evaluate")
    }


def test_worse_challenger_does_not_replace_champion(project):
    proj, env = project
    run = trainpipe(proj, env, "run", "-S", "train.max_steps=3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Running stage 'train'" in run.stdout and "Running stage 'curate'" not in run.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert champion(env) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    # train logged per-step metrics into the flow's run
    run_id = client.get_model_version(MODEL, "2").run_id
    assert client.get_metric_history(run_id, "train_loss")
    tags = client.get_run(run_id).data.tags
    assert (tags["stage.ingest"], tags["stage.train"], tags["stage.evaluate"]) == ("skipped", "ran", "ran")
    stages = {s["stage"]: s for s in mlflow_dict(client, run_id, "stages.json")}
    assert stages["train"]["reason"] == "changed deps: train.max_steps modified"


def mlflow_dict(client: MlflowClient, run_id: str, path: str):
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def test_failed_gate_leaves_champion_and_checkpoints_alone(project):
    proj, env = project
    ckpt_before = sorted((p.name, p.stat().st_mtime_ns) for p in (proj / "checkpoints").iterdir())
    run = trainpipe(proj, env, "run", "-S", "curate.gate.min_documents=100000")
    assert run.returncode == 3
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("trainpipe run: data gate failed: expect_table_row_count_to_be_between")
    assert "Traceback" not in run.stderr + run.stdout  # the reason is one line, not Prefect's traceback
    assert "Running stage 'tokenize'" not in run.stdout and "Running stage 'train'" not in run.stdout
    assert champion(env) == "1"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (proj / "checkpoints").iterdir()) == ckpt_before
    # the failed gate's reports reached the flow's MLflow run and Prefect
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (failed_run,) = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id],
        "attributes.status = 'FAILED'",
        max_results=1,
    )
    assert "curation/data_docs" in {a.path for a in client.list_artifacts(failed_run.info.run_id, "curation")}
    import sqlite3

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        (table,) = db.execute(
            "SELECT data FROM artifact WHERE key = 'trainpipe-curation' ORDER BY created DESC LIMIT 1"
        ).fetchone()
    assert "expect_table_row_count_to_be_between" in table and "FAILED" in table

    # a corpus ten times smaller than the champion's: drift blocks it, and nothing trains
    run = trainpipe(proj, env, "run", "-S", "data.max_documents=15", "-S", "curate.gate.min_documents=5")
    assert run.returncode == 3, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "drift_documents (observed " in last and " vs champion " in last, last
    assert "Running stage 'train'" not in run.stdout and champion(env) == "1"
    # put the data and the gate back
    put_back = trainpipe(
        proj, env, "curate", "-S", "data.max_documents=150", "-S", "curate.gate.min_documents=20"
    )
    assert put_back.returncode == 0, put_back.stderr[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_prompts_from_the_champion(project):
    proj, env = project
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "trainpipe"), "serve", "--port", str(port)],
        cwd=proj,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        body = {"dataframe_records": [{"prompt": "def add(a, b):\n"}], "params": {"max_new_tokens": 12}}
        good = requests.post(f"{url}/invocations", json=body, timeout=30)
        assert good.status_code == 200, good.text
        assert isinstance(good.json()["predictions"][0]["completion"], str)
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"prompt": ""}]}, timeout=30)
        assert 400 <= bad.status_code < 500 and "prompt" in bad.text
        assert requests.post(f"{url}/invocations", json=body, timeout=30).status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_restart_restores_the_champions_data_and_model(project, tmp_path, monkeypatch):
    import mlflow

    proj, env = project
    assert "max_steps: 3" in (proj / "params.yaml").read_text()  # the workspace holds the worse v2
    run = trainpipe(proj, env, "restart")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "version 1" in run.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # the models:/ resolver reads it
    registered = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path)))
    weights = next(registered.rglob("model.safetensors")).read_bytes()
    assert (proj / "models/model.safetensors").read_bytes() == weights
    assert "max_steps: 60" in (proj / "params.yaml").read_text()
    status = sh([str(BIN / "dvc"), "status"], proj, env)
    assert "up to date" in status.stdout, status.stdout


def test_gate_failure_on_a_fresh_project_trains_nothing(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    run = trainpipe(proj, env, "run", "-S", "curate.gate.min_bytes=999999999")
    assert run.returncode == 3
    assert "expect_column_sum_to_be_between" in run.stderr.strip().splitlines()[-1]
    assert (proj / "reports/curation.json").exists() and (proj / "reports/data_docs/index.html").exists()
    assert (proj / "data/raw/documents.parquet").exists()  # the raw snapshot is kept
    for never in ("data/curated/documents.parquet", "data/tokens", "models", "checkpoints"):
        assert not (proj / never).exists(), never
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).search_registered_models() == []
