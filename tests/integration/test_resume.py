"""Exact resume: a real training process killed by a real SIGKILL at several points (before the
first checkpoint, just after one, between two, in the middle of writing one) resumes and ends
with weights byte-identical to an uninterrupted run, and leaves no checkpoint once its model is
written; a truncated newest checkpoint falls back to the one before."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_mlflow_db
from test_stages import curated_from_stdlib, tiny_params

from pipelines.adapters.checkpoint import (
    PAUSE_ENV,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
)
from pipelines.core.data import read_json
from pipelines.core.usage import USAGE_DIR_ENV, read_usage, stage_work
from pipelines.stages import tokenize

MAX_STEPS, EVERY = 60, 10


@pytest.fixture(scope="module")
def base(tmp_path_factory, mlflow_template_db):
    """Tiny tokens, an environment for training processes, and the weights of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    params = tiny_params(root, f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={EVERY}")
    curated_from_stdlib(params)
    tokenize.run(params)
    env = dict(os.environ, MLFLOW_TRACKING_URI=copy_mlflow_db(mlflow_template_db, root), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_RUN_ID", None)
    env.pop(PAUSE_ENV, None)
    full = run_train(write_params(params, root / "full"), env)
    assert full.returncode == 0, full.stderr
    return params, env, (root / "full" / "models" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def base_ckpt(base, tmp_path_factory) -> Path:
    """The run folder of a run killed while writing its third checkpoint: the checkpoints of
    steps EVERY and 2 * EVERY (a finished run leaves none)."""
    params, env, _ = base
    params_file = write_params(params, tmp_path_factory.mktemp("killed") / "run")
    slow_env = dict(env, **{PAUSE_ENV: "0.5"})
    assert kill_when(params_file, slow_env, writing(3 * EVERY)) == 2 * EVERY
    return run_folder(params_file.parent / "ckpt")


def run_folder(ckpt_root: Path) -> Path | None:
    """The one run folder (checkpoints/<key>/) under a checkpoint root; None when there is none."""
    folders = [p for p in ckpt_root.iterdir() if p.is_dir()] if ckpt_root.is_dir() else []
    assert len(folders) <= 1, folders
    return folders[0] if folders else None


def committed(ckpt_root: Path) -> list[tuple[int, Path]]:
    folder = run_folder(ckpt_root)
    return list_checkpoints(folder) if folder else []


def write_params(params, where: Path, ckpt_dir: Path | None = None) -> Path:
    """A params file for one training process, with its own checkpoint (unless ckpt_dir names
    one) and model dirs."""
    mine = params.model_copy(deep=True)
    mine.train.checkpoint_dir = str(ckpt_dir or where / "ckpt")
    mine.train.model_dir = str(where / "models")
    mine.train.reports_dir = str(where / "reports")
    where.mkdir(parents=True)
    (where / "params.yaml").write_text(yaml.safe_dump(mine.model_dump()))
    return where / "params.yaml"


def train_cmd(params_file: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.stages.train", "--params", str(params_file)]


def run_train(params_file: Path, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Train to the end; cwd: where `python -m pipelines.stages.train` finds its code (default: here)."""
    return subprocess.run(
        train_cmd(params_file), env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


def wait_for(predicate, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)


def kill_when(params_file: Path, env: dict, point, cwd: Path | None = None, timeout: float = 60.0) -> int:
    """Start a training process, SIGKILL it when point(ckpt_dir, first_line) is true; the newest
    committed checkpoint step at the kill (0 when none)."""
    ckpt_dir = params_file.parent / "ckpt"
    proc = subprocess.Popen(
        train_cmd(params_file), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    first_line = proc.stdout.readline().decode()  # "train: no checkpoint", printed before step 0
    wait_for(lambda: point(ckpt_dir, first_line), proc, timeout)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (params_file.parent / "models").exists()
    return committed(ckpt_dir)[0][0] if committed(ckpt_dir) else 0


def exists(step: int):
    return lambda ckpt_dir, _: any(ckpt_dir.glob(f"*/{checkpoint_path('', step)}"))


def writing(step: int):
    """The checkpoint of step is half-written (PAUSE_ENV holds it there): its temporary file has
    bytes. Seen the moment it is created it is still empty (a loaded machine let a kill land there)."""

    def half_written(ckpt_dir: Path, _) -> bool:
        for tmp in ckpt_dir.glob(f"*/{checkpoint_path('', step)}.tmp"):
            try:
                if tmp.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed into place between the glob and the stat
                pass
        return False

    return half_written


KILL_POINTS = {
    "before the first checkpoint": lambda ckpt_dir, line: "no checkpoint" in line,
    "between two checkpoints": lambda d, _: exists(2 * EVERY)(d, _) and time.sleep(0.02) is None,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_any_point_resumes_to_identical_weights(base, tmp_path, point):
    params, env, full_weights = base
    params_file = write_params(params, tmp_path / "run")
    step_at_kill = kill_when(params_file, env, KILL_POINTS[point])
    assert step_at_kill < MAX_STEPS

    usage = tmp_path / "usage"  # as the flow gives it: train's report of this run
    usage.mkdir()
    done = run_train(params_file, dict(env, **{USAGE_DIR_ENV: str(usage)}))
    assert done.returncode == 0, done.stderr
    if step_at_kill:
        assert f"resuming from checkpoint at step {step_at_kill}" in done.stdout
    else:
        assert "train: no checkpoint" in done.stdout
    assert [w["resumed_from_step"] for w in stage_work(read_usage(usage), "train")] == [step_at_kill]
    training = read_json(tmp_path / "run" / "reports" / "training.json")  # the DVC metric of this run
    assert training["resumed_from_step"] == step_at_kill and training["train_seconds"] > 0
    assert (tmp_path / "run" / "models" / "model.safetensors").read_bytes() == full_weights
    # where it resumed and how long it took are not in models/: the same weights, the same DVC hash
    full = Path(params.data.tokens_dir).parent / "full" / "models"
    assert (tmp_path / "run" / "models" / "train.json").read_bytes() == (full / "train.json").read_bytes()
    assert run_folder(tmp_path / "run" / "ckpt") is None  # the model is written: nothing to resume


def test_compiled_cpu_training_resumes_to_identical_weights(base, tmp_path):
    # torch.compile on a CPU (train.compile=on) trains in torch's deterministic mode: without it,
    # two compiled processes of the same steps ended in different weights. One uninterrupted
    # compiled run, one killed between two checkpoints and resumed: the same bytes.
    params, env, _ = base
    compiled = params.model_copy(deep=True)
    compiled.train.compile = "on"
    full = run_train(write_params(compiled, tmp_path / "full"), env)
    assert full.returncode == 0, full.stderr
    assert read_json(tmp_path / "full" / "models" / "train.json")["compiled"] is True
    params_file = write_params(compiled, tmp_path / "run")
    step_at_kill = kill_when(params_file, env, KILL_POINTS["between two checkpoints"], timeout=180)
    assert 0 < step_at_kill < MAX_STEPS
    done = run_train(params_file, env)
    assert done.returncode == 0, done.stderr
    assert f"resuming from checkpoint at step {step_at_kill}" in done.stdout
    weights = "models/model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (tmp_path / "full" / weights).read_bytes()


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous_one(base, tmp_path):
    params, env, full_weights = base
    params_file = write_params(params, tmp_path / "run")
    slow_env = dict(env, **{PAUSE_ENV: "1.5"})  # each checkpoint write stops halfway for 1.5 s
    step_at_kill = kill_when(params_file, slow_env, writing(2 * EVERY))
    assert step_at_kill == EVERY  # the second checkpoint was half-written, never committed
    folder = run_folder(tmp_path / "run" / "ckpt")
    tmp_file = checkpoint_path(folder, 2 * EVERY).with_suffix(".pt.tmp")
    assert 0 < tmp_file.stat().st_size < checkpoint_path(folder, EVERY).stat().st_size

    done = run_train(params_file, env)
    assert done.returncode == 0, done.stderr
    assert f"resuming from checkpoint at step {EVERY}" in done.stdout
    assert (tmp_path / "run" / "models" / "model.safetensors").read_bytes() == full_weights
    assert not tmp_file.exists()  # leftovers are cleaned up at the next save


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(base, base_ckpt, tmp_path):
    params, env, full_weights = base
    params_file = write_params(params, tmp_path / "run")
    ckpt_dir = tmp_path / "run" / "ckpt" / base_ckpt.name
    shutil.copytree(base_ckpt, ckpt_dir)
    newest, previous = [p for _, p in list_checkpoints(ckpt_dir)]
    assert newest.name == f"ckpt-{2 * EVERY:06d}.pt"  # a run keeps its last two
    with open(newest, "r+b") as fh:  # as a full disk or a careless copy might leave it
        fh.truncate(newest.stat().st_size // 3)

    done = run_train(params_file, env)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {newest} is unusable (truncated or corrupt" in done.stdout
    assert f"resuming from checkpoint at step {EVERY}" in done.stdout
    assert (tmp_path / "run" / "models" / "model.safetensors").read_bytes() == full_weights


def test_checkpoint_of_other_data_or_config_is_not_resumed(base_ckpt):
    ckpt_dir = base_ckpt
    state = read_checkpoint(list_checkpoints(ckpt_dir)[0][1])
    fingerprint, version = state["fingerprint"], state["data_version"]
    assert load_checkpoint(ckpt_dir, fingerprint, version)[0]["step"] == 2 * EVERY
    state, path, notes = load_checkpoint(ckpt_dir, fingerprint, "another-data-version")
    assert state is None and notes == [
        f"checkpoint {checkpoint_path(ckpt_dir, 2 * EVERY)} was trained on other data; starting fresh"
    ]
    other = {**fingerprint, "train": {**fingerprint["train"], "seed": 1}}
    assert load_checkpoint(ckpt_dir, other, version)[2][-1].endswith("has another config; starting fresh")


def curve(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("same_run", [False, True])
def test_a_resumed_run_logs_the_whole_curve_under_the_same_names_each_step_once(
    base, base_ckpt, tmp_path, same_run
):
    """Resumed in a new MLflow run (a later flow run), the run shows the curve from step 0 as an
    uninterrupted run does; resumed in the run that logged the first steps (a flow's retry of
    train, through MLFLOW_RUN_ID), no step is logged twice."""
    from mlflow import MlflowClient

    params, env, _ = base
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(params.publish.experiment).experiment_id
    (full,) = client.search_runs([experiment], order_by=["attributes.start_time ASC"], max_results=1)
    params_file = write_params(params, tmp_path / "run")
    shutil.copytree(base_ckpt, tmp_path / "run" / "ckpt" / base_ckpt.name)
    env = dict(env)
    if same_run:  # the killed attempt had logged up to its checkpoint at step 2 * EVERY
        run_id = client.create_run(experiment).info.run_id
        for step, loss, lr in read_checkpoint(list_checkpoints(base_ckpt)[0][1])["history"]:
            client.log_metric(run_id, "train_loss", loss, step=step)
            client.log_metric(run_id, "lr", lr, step=step)
        env["MLFLOW_RUN_ID"] = run_id

    done = run_train(params_file, env)
    assert done.returncode == 0, done.stderr
    assert f"resuming from checkpoint at step {2 * EVERY}" in done.stdout
    if not same_run:
        (latest,) = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)
        run_id = latest.info.run_id
    for key in ("train_loss", "lr"):  # exact resume: the very values of the uninterrupted run
        assert curve(client, run_id, key) == curve(client, full.info.run_id, key)
    steps = [step for step, _ in curve(client, run_id, "tokens_per_s")]  # timed by this process only
    every = params.train.log_every
    assert steps == list(range(2 * EVERY + every, MAX_STEPS + 1, every))
