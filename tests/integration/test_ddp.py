"""Training across processes: `python -m pipelines.stages.train` with train.nproc_per_node=2 runs itself
under torchrun (2 gloo ranks on CPU), trains on the same tokens as one process and ends at the same
loss within a float tolerance; a SIGKILL of its whole process group, then a restart, ends with
weights byte-identical to an uninterrupted 2-process run, and a kill of the launcher alone takes
its ranks with it; a rank's failure keeps its exit code."""

import os
import re
import signal
import subprocess

import numpy as np
import psutil
import pytest
import torch
from conftest import copy_mlflow_db
from safetensors.torch import load_model
from test_resume import committed, run_folder, run_train, train_cmd, wait_for, write_params, writing
from test_stages import curated_from_stdlib, tiny_params

from pipelines.adapters.checkpoint import PAUSE_ENV
from pipelines.adapters.ranks import rank_failure, threads_per_rank
from pipelines.core.data import load_tokens, read_json
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.usage import USAGE_DIR_ENV, read_usage, stage_work
from pipelines.stages import tokenize, train

MAX_STEPS, EVERY = 40, 10
# fp32: with bf16 autocast, rounding to 8-bit mantissas turns the same tiny differences into ~5e-3
# of the loss (measured over 60 steps), the size of what another batch does, so it could not tell them apart
FP32 = [
    f"train.max_steps={MAX_STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.log_every=1",
    "train.bf16='off'",
]
# Tolerances, relative, between the losses of a 1- and a 2-process run. Step 1's loss is that of the
# same initial weights on the same tokens: only the order of the mean's sum differs (one mean of 128
# token losses against the mean of two means of 64), a few fp32 ulps (6e-8 each); measured 8e-8.
FIRST_STEP_TOL = 1e-6
# The next steps: every gradient is summed in another order too (each rank's matrix products over
# its half of the batch, then gloo's sum of the two halves), so the weights differ in their last
# bits; measured equal to 6 decimals through step 12. A rank's half of a batch alone is off by
# 2e-2 or more (asserted below).
EARLY_TOL, EARLY_STEPS = 1e-5, 10
# From there training amplifies those bits, about 3x a step with the rope + rmsnorm + relu2 recipe
# (2e-6 at step 13, 1.5e-3 at step 19, at most 6.5e-3 over 40 steps on the AVX2 machine; GPT-2's
# recipe stayed under 2.8e-5): the later steps show that both runs trained alike, the early ones
# that they saw the same tokens.
LATE_TOL = 3e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mlflow_template_db):
    """Tiny tokens (fp32 params) and an environment for training processes."""
    root = tmp_path_factory.mktemp("ddp")
    params = tiny_params(root, *FP32)
    curated_from_stdlib(params)
    tokenize.run(params)
    env = dict(os.environ, MLFLOW_TRACKING_URI=copy_mlflow_db(mlflow_template_db, root), PYTHONUNBUFFERED="1")
    for name in ("MLFLOW_RUN_ID", PAUSE_ENV, "OMP_NUM_THREADS"):
        env.pop(name, None)
    return root, params, env


def with_processes(params, nproc: int, **train_fields):
    mine = params.model_copy(deep=True)
    mine.train.nproc_per_node = nproc
    for key, value in train_fields.items():
        setattr(mine.train, key, value)
    return mine


@pytest.fixture(scope="module")
def one_process(tiny) -> dict:
    """The summary of a 1-process run, trained in this process (its imports are done already)."""
    root, params, env = tiny
    one = with_processes(params, 1, checkpoint_dir=str(root / "one/ckpt"), model_dir=str(root / "one/models"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        return train.train_model(one, log=lambda *_: None)


@pytest.fixture(scope="module")
def two_processes(tiny) -> dict:
    """The summary and output of a 2-process run: `python -m pipelines.stages.train` starts torchrun."""
    root, params, env = tiny
    done = run_train(write_params(with_processes(params, 2), root / "two"), env)
    assert done.returncode == 0, done.stderr
    return {**read_json(root / "two" / "models" / "train.json"), "stdout": done.stdout}


def batch_loss(model, params, step: int, rank: int = 0, world: int = 1) -> float:
    """The loss of model on (rank's slice of) step's batch."""
    cfg = params.train
    data = load_tokens(f"{params.data.tokens_dir}/train.bin")
    with torch.no_grad():
        x, y = train.get_batch(
            data, step, cfg.seed, cfg.batch_size, cfg.block_size, torch.device("cpu"), rank, world
        )
        return model(x, y)[1].item()


def test_rank_slices_make_up_the_one_process_batch():
    data, cpu = np.arange(1000, dtype=np.uint16), torch.device("cpu")
    for step in (0, 7):
        x, y = train.get_batch(data, step, 1337, 4, 8, cpu)
        halves = [train.get_batch(data, step, 1337, 4, 8, cpu, rank, 2) for rank in (0, 1)]
        assert torch.equal(torch.cat([h[0] for h in halves]), x)
        assert torch.equal(torch.cat([h[1] for h in halves]), y)


@pytest.mark.slow
def test_two_processes_see_the_same_tokens_and_end_at_the_same_loss(tiny, one_process, two_processes):
    root, params, _ = tiny
    one, two = one_process, two_processes
    assert (one["processes"], two["processes"]) == (1, 2)
    assert f"train: 2 processes (gloo), {threads_per_rank(2)} threads each" in two["stdout"]
    assert two["tokens_seen"] == one["tokens_seen"] == MAX_STEPS * 4 * 32
    steps = [s for s, _, _ in one["history"]]
    assert steps == [s for s, _, _ in two["history"]] == list(range(1, MAX_STEPS + 1))
    for (step, loss_1, lr_1), (_, loss_2, lr_2) in zip(one["history"], two["history"], strict=True):
        assert lr_1 == lr_2
        tol = FIRST_STEP_TOL if step == 1 else EARLY_TOL if step <= EARLY_STEPS else LATE_TOL
        assert loss_2 == pytest.approx(loss_1, rel=tol), f"step {step}"

    # The early tolerance tells batches apart: rank 0's half of a batch alone (what a rank that took its
    # slice for the whole batch would report) is off by far more, at the initial weights (where
    # step 1's loss is that of step 0's batch) and at the trained ones.
    torch.manual_seed(params.train.seed)
    model = GPT(GPTConfig(**read_json(root / "two" / "models" / "config.json")))
    whole, half = batch_loss(model, params, 0), batch_loss(model, params, 0, 0, 2)
    assert whole == pytest.approx(one["history"][0][1], rel=FIRST_STEP_TOL)
    assert abs(half - whole) / whole > 100 * FIRST_STEP_TOL  # measured: 1.1e-3
    load_model(model, str(root / "two" / "models" / "model.safetensors"))
    for step in range(5):
        whole, half = batch_loss(model, params, step), batch_loss(model, params, step, 0, 2)
        assert abs(half - whole) / whole > 100 * EARLY_TOL  # measured: 2.1e-2 or more


@pytest.mark.slow
def test_sigkill_of_the_whole_group_resumes_to_the_uninterrupted_weights(tiny, two_processes, tmp_path):
    root, params, env = tiny
    params_file = write_params(with_processes(params, 2), tmp_path / "run")
    ckpt_root = tmp_path / "run" / "ckpt"
    slow_env = dict(env, **{PAUSE_ENV: "1"})  # rank 0 stops halfway through each checkpoint write
    proc = subprocess.Popen(
        train_cmd(params_file),
        env=slow_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and torchrun: the group `trainpipe train` would run in
    )
    # rank 0 is writing the third checkpoint, rank 1 waits for it in the next step's all-reduce
    wait_for(lambda: writing(3 * EVERY)(ckpt_root, ""), proc, timeout=90)
    processes = psutil.Process(proc.pid).children(recursive=True)  # torchrun and its 2 ranks
    ranks = [p for p in processes if "torch.distributed.run" not in p.cmdline()]
    assert len(processes) == 3 and all("pipelines.stages.train" in p.cmdline() for p in ranks), processes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # torchrun starts its ranks in sessions of their own: they die with it (ranks.die_with_parent)
    assert not running(processes, timeout=10)
    assert [step for step, _ in committed(ckpt_root)] == [2 * EVERY, EVERY]
    assert not (tmp_path / "run" / "models").exists()

    usage = tmp_path / "usage"
    usage.mkdir()
    done = run_train(params_file, dict(env, **{USAGE_DIR_ENV: str(usage)}))
    assert done.returncode == 0, done.stderr
    assert f"resuming from checkpoint at step {2 * EVERY}" in done.stdout
    # rank 0 reports the work; the other rank and the launcher report only their seconds
    assert [w["resumed_from_step"] for w in stage_work(read_usage(usage), "train")] == [2 * EVERY]
    weights = (tmp_path / "run" / "models" / "model.safetensors").read_bytes()
    assert weights == (root / "two" / "models" / "model.safetensors").read_bytes()
    assert run_folder(ckpt_root) is None  # the model is written: nothing to resume


def running(processes: list, timeout: float) -> list:
    """Those of processes still running after timeout (a zombie, dead but not yet reaped, is gone)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    running = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.mark.slow
def test_a_kill_of_the_launcher_alone_stops_torchrun_and_its_ranks_at_once(tiny, tmp_path):
    _, params, env = tiny
    params_file = write_params(with_processes(params, 2), tmp_path / "run")
    ckpt_root = tmp_path / "run" / "ckpt"
    proc = subprocess.Popen(
        train_cmd(params_file),
        env=dict(env, **{PAUSE_ENV: "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: writing(EVERY)(ckpt_root, ""), proc, timeout=90)  # rank 0 holds halfway for 1 s
    processes = psutil.Process(proc.pid).children(recursive=True)
    assert len(processes) == 3, processes  # torchrun and its 2 ranks
    os.kill(
        proc.pid, signal.SIGKILL
    )  # `python -m pipelines.stages.train` alone, as a kill of one training process
    proc.wait()
    # Left alone, torchrun and the ranks trained on for seconds (until a write to the dead
    # launcher's stderr pipe killed them), and rank 0 finished this checkpoint and wrote more.
    assert not running(processes, timeout=5)
    assert committed(ckpt_root) == [] and list(ckpt_root.glob("*/*.pt.tmp"))


@pytest.mark.slow
def test_a_diverged_rank_fails_the_run_with_its_own_reason_and_exit_code(tiny, tmp_path):
    _, params, env = tiny
    bad = with_processes(params, 2, lr=1e12, warmup_steps=0, grad_clip=0)
    done = run_train(write_params(bad, tmp_path / "run"), env)
    assert done.returncode == 4, done.stderr  # DivergenceError's: the flow does not retry it
    last = done.stderr.strip().splitlines()[-1]
    # which check trips first depends on the optimizer: Muon's default takes AdamW's lr of 1e12 on the
    # embeddings alone, and their first update overflows the next backward before the loss
    reason = r"(loss|gradient norm) became (nan|inf) at step \d+: training stopped, .*"
    assert re.fullmatch(rf"trainpipe train: {reason}", last), last
    assert not (tmp_path / "run" / "models").exists()


TORCHRUN_REPORT = """trainpipe train: loss became nan at step 1: training stopped, no model written
W1129 16:01:45.410000 5590 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 5614 closing signal SIGTERM
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 5614)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 5613)
"""


@pytest.mark.parametrize(
    ("stderr", "reason", "code"),
    [
        (TORCHRUN_REPORT.format(code=4), "loss became nan at step 1: training stopped, no model written", 4),
        (TORCHRUN_REPORT.format(code=-9), "loss became nan at step 1: training stopped, no model written", 1),
        ("RendezvousTimeoutError\n", "torchrun exited with 1 (its report is above)", 1),
    ],
)
def test_rank_failure_reads_the_ranks_reason_and_exit_code(stderr, reason, code):
    assert rank_failure(stderr, 1) == (reason, code)
