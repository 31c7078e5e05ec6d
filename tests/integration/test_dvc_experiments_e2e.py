"""DVC experiments as a DVC user runs them, in a fresh `git clone` of the project (its tracked
files only): `dvc exp run -S`, then two experiments queued with `dvc exp run --queue -S` and run
by `dvc queue start` in DVC's temporary workspaces, which see only git-tracked files. Every
experiment's metrics must reach `dvc exp show --json` under its overridden params, and the
README's `dvc exp show` command must fit a 120-column terminal with bits per byte in it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_mlflow_db, tracked_copy

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# As small as the gate allows: the queue runs train and evaluate once per experiment
TINY = [
    "data.max_documents=80",
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=50000",
    "tokenize.vocab_size=300",
    "tokenize.val_fraction=0.1",
    "train.max_steps=12",
    "train.batch_size=4",
    "train.block_size=32",
    "train.n_layer=1",
    "train.n_head=2",
    "train.n_embd=32",
    "train.compile=off",  # auto compiles on a CPU: inductor's seconds per training
    "train.warmup_steps=2",
    "train.log_every=2",
    "evaluate.max_tokens=4000",
    "evaluate.num_samples=1",
    "evaluate.sample_tokens=8",
    "publish.model_name=exp-model",
]
# The README's command (section "Experiments with DVC")
EXP_SHOW = [
    *("exp", "show", "--only-changed", "--keep", ".*_bits_per_byte$"),
    *(
        "--drop",
        ".*_(documents|bytes|per_s|seconds|step|secrets|checked)$|.*_slice|Created|State|Executor|data/|models|pipelines/|reports/",
    ),
]
QUEUE_TIMEOUT_S = 1200  # two experiments of train + evaluate on a shared 2-core machine


def dvc(clone: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def experiments(shown: list) -> list[dict]:
    """Every experiment row of `dvc exp show --json`: its name, params.yaml and metrics."""
    rows = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                metrics = {}
                for found in (data.get("metrics") or {}).values():
                    metrics.update(found.get("data") or {})
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                rows.append({"name": rev.get("name"), "params": params, "metrics": metrics})
    return rows


def wait_for_queue(clone: Path, env: dict) -> str:
    """`dvc queue status` once nothing is queued or running, within QUEUE_TIMEOUT_S."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = dvc(clone, env, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {QUEUE_TIMEOUT_S} s:\n{status}"
        time.sleep(10)


def test_exp_run_and_the_queue_work_in_a_fresh_clone(tmp_path, mlflow_template_db):
    origin = tracked_copy(tmp_path / "origin", TINY)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_RUN_ID")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",  # stage commands run `python` from PATH
        MLFLOW_TRACKING_URI=copy_mlflow_db(mlflow_template_db, tmp_path),
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )

    ran = dvc(clone, env, "exp", "run", "-S", "train.max_steps=10")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    for override in (["train.max_steps=6"], ["train.max_steps=14", "train.lr=1e-3"]):
        queued = dvc(clone, env, "exp", "run", "--queue", *[a for o in override for a in ("-S", o)])
        assert queued.returncode == 0, queued.stderr[-2000:]
    started = dvc(clone, env, "queue", "start")
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        status = wait_for_queue(clone, env)
    finally:
        dvc(clone, env, "queue", "stop")
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    assert not failed, status + "".join(
        dvc(clone, env, "queue", "logs", task).stdout[-3000:] for task in failed
    )

    shown = dvc(clone, env, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    by_steps = {row["params"]["train"]["max_steps"]: row for row in experiments(json.loads(shown.stdout))}
    assert set(by_steps) == {10, 6, 14}, by_steps
    assert by_steps[14]["params"]["train"]["lr"] == 0.001 and by_steps[6]["params"]["train"]["lr"] == 0.003
    for row in by_steps.values():
        metrics = row["metrics"]
        assert 0 < metrics["val_bits_per_byte"] < 8, row
        assert list(metrics)[:3] == ["val_bits_per_byte", "xz_bits_per_byte", "gzip_bits_per_byte"], row
        assert metrics["kept_documents"] > 0 and metrics["kept_bytes"] > 0, row
    # different training, different scores; the same held-out bytes under the same compressors
    assert len({row["metrics"]["val_bits_per_byte"] for row in by_steps.values()}) == 3
    assert len({row["metrics"]["xz_bits_per_byte"] for row in by_steps.values()}) == 1

    # the README's `dvc exp show`: within 120 columns, bits per byte shown, no column collapsed
    table = dvc(clone, {**env, "COLUMNS": "120"}, *EXP_SHOW, "--no-pager")
    assert table.returncode == 0, table.stderr[-2000:]
    print(table.stdout)
    lines = table.stdout.rstrip("\n").splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120, table.stdout
    assert lines[1].split() == [
        *("Experiment", "val_bits_per_byte", "xz_bits_per_byte", "gzip_bits_per_byte"),
        *("train.max_steps", "train.lr"),  # the params that differ, and only those
    ], table.stdout
    assert "…" not in table.stdout, table.stdout
