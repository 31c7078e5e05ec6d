"""A bad run restarts cleanly, end to end with real processes: a `trainpipe run` killed by SIGKILL
in the middle of training, and run again, re-runs only train onward (DVC skips the stages before
it) and train resumes from its checkpoint; a second run started meanwhile waits or refuses; the
flow records what each stage did in its MLflow run and its Prefect artifact. Then Prefect's own
retry after only the training process is killed, and a diverged loss that stops a run."""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, MODEL, make_project
from mlflow import MlflowClient
from test_e2e import mlflow_dict

pytestmark = pytest.mark.slow


def latest_prefect_artifact(env: dict) -> str:
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        (data,) = db.execute(
            "SELECT data FROM artifact WHERE key = 'trainpipe-run' ORDER BY created DESC LIMIT 1"
        ).fetchone()
    return json.loads(data)


def _runs_train(process) -> bool:
    import psutil

    try:
        return process.cmdline()[-2:] == ["-m", "pipelines.stages.train"]
    except psutil.Error:  # exited (or became a zombie) since it was listed
        return False


def _is_from(ckpt: Path, max_steps: int) -> bool:
    """Whether a checkpoint was written by a run of max_steps (not left by an earlier run)."""
    from pipelines.adapters.checkpoint import read_checkpoint

    try:
        return read_checkpoint(ckpt)["fingerprint"]["train"]["max_steps"] == max_steps
    except Exception:  # being replaced right now
        return False


def test_run_killed_in_train_reruns_from_train_and_resumes(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    trainpipe = str(BIN / "trainpipe")
    first = subprocess.Popen(
        [trainpipe, "run"],
        cwd=proj,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes dvc and the stage with it
    )
    lock = proj / ".trainpipe.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and f"pid {first.pid}," in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    # Started while it runs: one with --wait waits its turn, one without refuses at once.
    waiter = subprocess.Popen(
        [trainpipe, "run", "--wait"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    refused = subprocess.run(
        [trainpipe, "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 5, refused.stderr
    assert (
        f".trainpipe.lock is held by trainpipe run (pid {first.pid}"
        in refused.stderr.strip().splitlines()[-1]
    )

    deadline = time.monotonic() + 240
    while not list(proj.glob("checkpoints/*/ckpt-000020.pt")):  # checkpoints/<run key>/
        assert first.poll() is None and time.monotonic() < deadline, "the first run never reached training"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (proj / "models" / "model.safetensors").exists()  # killed before train finished
    killed_at = max(int(p.stem.split("-")[1]) for p in proj.glob("checkpoints/*/ckpt-*.pt"))

    out, err = waiter.communicate(timeout=300)  # the waiter now gets the lock: it is the re-run
    assert waiter.returncode == 0, err[-3000:]
    assert "waiting for trainpipe run" in err
    for stage in ("ingest", "curate", "tokenize"):
        assert f"Running stage '{stage}'" not in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert f"resuming from checkpoint at step {killed_at}" in out

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    tags = client.get_run(version.run_id).data.tags
    assert {s: tags[f"stage.{s}"] for s in ("ingest", "curate", "tokenize", "train", "evaluate")} == {
        "ingest": "skipped",
        "curate": "skipped",
        "tokenize": "skipped",
        "train": f"resumed@{killed_at}",
        "evaluate": "ran",
    }
    stages = mlflow_dict(client, version.run_id, "stages.json")
    by_stage = {s["stage"]: s for s in stages}
    assert (
        "didn't change" in by_stage["ingest"]["reason"]
        and by_stage["train"]["resumed_from_step"] == killed_at
    )
    assert "changed" in by_stage["train"]["reason"]  # what DVC saw changed (train had never completed)
    summary = latest_prefect_artifact(env)
    assert f"| train | resumed@{killed_at} |" in summary and "| ingest | skipped |" in summary
    # the ledger counts what this run trained: the steps after the checkpoint, 8 x 64 tokens each
    cost = client.get_run(version.run_id).data.metrics
    assert cost["cost.train_tokens"] == (60 - killed_at) * 8 * 64
    assert cost["cost.ingest.device_s"] == 0 and cost["cost.train.device_s"] > 0

    # Prefect's own retry: only the training process is killed; the task fails as transient
    # (a stage killed by a signal, or its shell's exit 137) and its retry resumes from the checkpoint.
    import psutil

    second = subprocess.Popen(
        [trainpipe, "run", "-S", "train.max_steps=80"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not any(_is_from(ckpt, 80) for ckpt in proj.glob("checkpoints/*/ckpt-000020.pt")):
        assert second.poll() is None and time.monotonic() < deadline, "the second run never reached training"
        time.sleep(0.01)
    # The Python process itself: where SHELL is unset DVC runs the stage through
    # `/bin/sh -c`, and dash does not exec, so a shell process names the stage too.
    (trainer,) = [c for c in psutil.Process(second.pid).children(recursive=True) if _runs_train(c)]
    trainer.kill()  # SIGKILL
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert out.count("Running stage 'train'") == 2  # the failed attempt and Prefect's retry
    # curate may run once: the first run made v1 champion, so its drift reference moved (the
    # inputs check); its curated table is the same, so tokenize does not run
    assert "resuming from checkpoint at step" in out and "Running stage 'tokenize'" not in out
    retried = client.get_model_version(MODEL, "2")
    assert client.get_run(retried.run_id).data.tags["stage.train"].startswith("resumed@")
    # the killed attempt wrote no report: the flow's wall time around it counts, then the retry's
    resumed_at = int(client.get_run(retried.run_id).data.tags["stage.train"].split("@")[1])
    (train_cost,) = [
        s for s in mlflow_dict(client, retried.run_id, "cost.json")["stages"] if s["stage"] == "train"
    ]
    assert train_cost["attempts"] == 2 and train_cost["device_s"] > 0
    assert client.get_run(retried.run_id).data.metrics["cost.train_tokens"] == (80 - resumed_at) * 8 * 64

    # A diverged loss stops the run: not retried, nothing published, the failure recorded.
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    nan = subprocess.run(
        # AdamW alone: with Muon's default the embeddings' first 1e12 update overflows the next
        # backward, and the gradient check stops training before the loss check this case is about
        [trainpipe, "run", "-S", "train.lr=1e12", "-S", "train.warmup_steps=0", "-S", "train.grad_clip=0"]
        + ["-S", "train.optimizer=adamw"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert nan.returncode == 4, nan.stderr[-2000:]
    assert nan.stderr.strip().splitlines()[-1].startswith("trainpipe run: loss became")
    assert nan.stdout.count("Running stage 'train'") == 1  # a permanent failure is not retried
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")) == versions
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert "| train | failed | loss became" in latest_prefect_artifact(env)
    # the diverged run still logged what it spent (train ran, then failed): no tokens counted
    (diverged,) = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id],
        "attributes.status = 'FAILED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert (
        diverged.data.metrics["cost.train.device_s"] > 0 and diverged.data.metrics["cost.train_tokens"] == 0
    )
