"""A checkpoint is resumed only by what wrote it, with real training processes on CPU killed by a
real SIGKILL: an edit to pipelines/stages/train.py (even a comment) trains from step 0; a short try of
another config leaves a killed run's checkpoints alone; a finished run leaves none; a checkpoint
that would run code when unpickled is refused; a non-finite gradient stops training before its
step is checkpointed."""

import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_resume import (
    EVERY,
    MAX_STEPS,
    base,  # noqa: F401  (a fixture: the tokens and the weights of an uninterrupted run)
    kill_when,
    run_folder,
    run_train,
    write_params,
    writing,
)

from pipelines.adapters.checkpoint import (
    PAUSE_ENV,
    checkpoint_path,
    checksum_path,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    run_key,
)
from pipelines.core.data import read_json, sha256_hex
from pipelines.core.errors import DivergenceError
from pipelines.stages import train

REPO = Path(__file__).resolve().parents[2]


def kill_after_first_checkpoint(params_file: Path, env: dict, cwd: Path | None = None) -> Path:
    """Run until the second checkpoint is half-written, SIGKILL; the run folder (step EVERY in it)."""
    slow_env = dict(env, **{PAUSE_ENV: "0.5"})  # holds each checkpoint write halfway
    assert kill_when(params_file, slow_env, writing(2 * EVERY), cwd=cwd) == EVERY
    return run_folder(params_file.parent / "ckpt")


def weights(where: Path) -> bytes:
    return (where / "models" / "model.safetensors").read_bytes()


def test_a_finished_run_leaves_no_checkpoint(base):  # noqa: F811
    params, env, _ = base
    full = Path(params.data.tokens_dir).parent / "full"
    assert (full / "models" / "model.safetensors").exists()
    assert list((full / "ckpt").iterdir()) == []  # its checkpoints went once the model was written


def test_an_edit_to_train_py_trains_from_step_0_never_from_other_codes_checkpoint(base, tmp_path):  # noqa: F811
    params, env, full_weights = base
    code = tmp_path / "code"  # a copy of the package, edited below as a developer would
    shutil.copytree(REPO / "pipelines", code / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(env, PYTHONPATH=str(code))
    train_py = code / "pipelines" / "stages" / "train.py"
    params_file = write_params(params, tmp_path / "run")
    other_code = "was written by other code (pipelines/stages/train.py changed); starting fresh"

    # A comment-only edit: the same math, but not the code that wrote the checkpoint.
    old = checkpoint_path(kill_after_first_checkpoint(params_file, env, cwd=code), EVERY)
    train_py.write_text(train_py.read_text() + "# a comment only\n")
    done = run_train(params_file, env, cwd=code)
    assert done.returncode == 0, done.stderr
    assert f"train: checkpoint {old} {other_code}" in done.stdout.splitlines()
    assert "resuming from checkpoint" not in done.stdout
    assert weights(tmp_path / "run") == full_weights  # from step 0 with the same math: the same weights

    # An edit to the learning-rate schedule: cosine decay becomes linear.
    shutil.rmtree(tmp_path / "run" / "models")
    old = checkpoint_path(kill_after_first_checkpoint(params_file, env, cwd=code), EVERY)
    cosine = "0.5 * (1 + math.cos(math.pi * min(1.0, progress)))"
    assert cosine in train_py.read_text()
    train_py.write_text(train_py.read_text().replace(cosine, "(1 - min(1.0, progress))"))
    done = run_train(params_file, env, cwd=code)
    assert done.returncode == 0, done.stderr
    assert f"train: checkpoint {old} {other_code}" in done.stdout.splitlines()
    assert "resuming from checkpoint" not in done.stdout
    assert weights(tmp_path / "run") != full_weights


def test_another_torch_is_other_code_but_the_same_folder(base, tmp_path):  # noqa: F811
    params, env, _ = base
    folder = kill_after_first_checkpoint(write_params(params, tmp_path / "run"), env)
    state = read_checkpoint(checkpoint_path(folder, EVERY))
    fingerprint, version = state["fingerprint"], state["data_version"]
    other_torch = {**fingerprint, "code": {**fingerprint["code"], "torch": "2.0.0"}}
    assert run_key(other_torch, version) == run_key(fingerprint, version) == folder.name
    assert load_checkpoint(folder, other_torch, version)[2] == [
        f"checkpoint {checkpoint_path(folder, EVERY)} was written by other code "
        f"(torch {torch.__version__} -> 2.0.0); starting fresh"
    ]
    other_steps = {**fingerprint, "train": {**fingerprint["train"], "max_steps": 50}}
    # train.bf16 "auto" is bf16 on one CPU and fp32 on another: the precision it resolved to keys the folder
    assert fingerprint["precision"] in ("bf16", "fp32")
    other_precision = {**fingerprint, "precision": {"bf16": "fp32", "fp32": "bf16"}[fingerprint["precision"]]}
    keys = {run_key(k, version) for k in (fingerprint, other_steps, other_precision)} | {
        run_key(fingerprint, "x")
    }
    assert len(keys) == 4
    described = read_json(folder / "run.json")  # what a person reads to tell the folders apart
    assert described == {"fingerprint": fingerprint, "data_version": version}
    assert described["fingerprint"]["train"]["max_steps"] == MAX_STEPS


def test_a_short_try_of_another_config_leaves_a_killed_runs_checkpoints(base, tmp_path):  # noqa: F811
    params, env, full_weights = base
    params_file = write_params(params, tmp_path / "run")
    folder = kill_after_first_checkpoint(params_file, env)
    before = list_checkpoints(folder)

    quick = params.model_copy(deep=True)
    quick.train.max_steps = 2 * EVERY  # `-S train.max_steps=...`, into the same checkpoints/
    tried = run_train(write_params(quick, tmp_path / "quick", ckpt_dir=tmp_path / "run" / "ckpt"), env)
    assert tried.returncode == 0, tried.stderr
    assert "train: no checkpoint" in tried.stdout.splitlines()
    assert list_checkpoints(folder) == before and [p.name for p in (tmp_path / "run" / "ckpt").iterdir()] == [
        folder.name  # the try's own folder went when its model was written
    ]

    again = run_train(params_file, env)
    assert again.returncode == 0, again.stderr
    assert f"resuming from checkpoint at step {EVERY}" in again.stdout
    assert weights(tmp_path / "run") == full_weights


class RunsCode:
    """Unpickling this calls open(path, "w"): the file appears only when a loader runs code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_training_starts_fresh(base, tmp_path):  # noqa: F811
    params, env, full_weights = base
    params_file = write_params(params, tmp_path / "run")
    path = checkpoint_path(kill_after_first_checkpoint(params_file, env), EVERY)
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({**read_checkpoint(path), "extra": RunsCode(marker)}, buf)
    path.write_bytes(buf.getvalue())
    checksum_path(path).write_text(sha256_hex(buf.getvalue()))  # intact: only its content is wrong

    with pytest.raises(ValueError, match="refused unread"):
        read_checkpoint(path)
    done = run_train(params_file, env)
    assert done.returncode == 0, done.stderr
    assert (
        f"train: checkpoint {path} is unusable (it holds objects other than tensors and plain data; "
        "refused unread); trying the one before"
    ) in done.stdout.splitlines()
    assert "train: no usable checkpoint; starting fresh" in done.stdout.splitlines()
    assert not marker.exists()
    assert weights(tmp_path / "run") == full_weights


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_gradient_stops_training_before_its_checkpoint(base, tmp_path, mlflow_env, grad_clip):  # noqa: F811
    params, _, _ = base
    bad = params.model_copy(deep=True)
    # fp32 on these tiny data: after one step at this lr the backward overflows while the loss is
    # finite. GELU's MLP, not relu2's: squaring blown-up activations makes the loss itself nan first
    bad.train.lr, bad.train.warmup_steps, bad.train.bf16, bad.train.mlp = 1e5, 0, "off", "gelu"
    bad.train.grad_clip, bad.train.checkpoint_every = grad_clip, 1
    bad.train.checkpoint_dir, bad.train.model_dir = str(tmp_path / "ckpt"), str(tmp_path / "models")
    with pytest.raises(DivergenceError) as failed:
        train.train_model(bad, log=lambda *_: None)
    message = str(failed.value)
    found = re.fullmatch(r"gradient norm became (inf|nan) at step (\d+): training stopped, .*", message)
    assert found and failed.value.exit_code == 4, message
    step = int(found.group(2))
    kept = list_checkpoints(run_folder(tmp_path / "ckpt")) if step else []
    assert [s for s, _ in kept] == [s for s in (step, step - 1) if s > 0]  # none of the failed step
    for _, path in kept:
        assert all(torch.isfinite(t).all() for t in read_checkpoint(path)["model"].values())
    assert not (tmp_path / "models").exists()


def test_dvc_yaml_lists_every_train_setting_that_changes_the_weights():
    # dvc.yaml's train params are DVC's cache key: a setting missing there lets `dvc repro` reuse
    # a model trained with another value of it
    import yaml

    from pipelines.core.params import FinetuneParams, TrainParams
    from pipelines.stages.train import NON_MODEL_FIELDS

    listed = set(yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["train"]["params"])
    expected = {f"train.{name}" for name in TrainParams.model_fields} - {
        f"train.{n}" for n in NON_MODEL_FIELDS
    }
    # a fine-tune's schedule and parent; where the parent is pinned (parent_dir) is a dependency
    expected |= {f"finetune.{name}" for name in FinetuneParams.model_fields} - {"finetune.parent_dir"}
    assert listed == expected
