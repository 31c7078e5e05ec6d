"""Training across processes: train re-run under torchrun, and what its ranks share.

    python -m pipelines.stages.train -S train.nproc_per_node=2     # launch_ranks runs it under torchrun

With train.nproc_per_node above 1, `python -m pipelines.stages.train` starts
`python -m torch.distributed.run --standalone --nproc-per-node N -m pipelines.stages.train` with the
params it validated and waits for it. Each rank joins the process group (gloo on CPU, nccl on
CUDA, one GPU per rank), takes its slice of every step's batch and trains a
DistributedDataParallel copy of the model; rank 0 alone reads and writes checkpoints, the model
and MLflow. Used by pipelines/stages/train.py.
"""

import codecs
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from pipelines.core.errors import ConfigError, TrainpipeError
from pipelines.core.params import PARAMS_FILE, Params, TrainParams

STDERR_TAIL_BYTES = 16384  # holds a rank's last message and torchrun's failure report


class RankFailed(TrainpipeError):
    """A rank of a multi-process run failed; exit_code is that rank's own (see pipelines.core.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def in_torchrun() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE and LOCAL_RANK for each rank)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def threads_per_rank(nproc: int) -> int:
    """Torch threads for each of nproc processes on this machine, so that together they use
    each core once: 2 ranks of 2 threads on 2 cores would take turns on them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def launch_ranks(params: Params) -> None:
    """Run `python -m pipelines.stages.train` again under torchrun, train.nproc_per_node processes on this
    machine, on the params validated here (written to a temporary file, so -S overrides reach
    every rank). Their output streams through. torchrun, and so its ranks, die with this process,
    as one training process would. A failure raises RankFailed with the failed rank's own one-line
    reason and exit code (torchrun itself exits 1): a diverged run stays exit 4, which a flow does
    not retry."""
    nproc = params.train.nproc_per_node
    env = dict(os.environ)
    # torchrun would give each rank 1 thread; a user's OMP_NUM_THREADS wins over ours
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    with tempfile.TemporaryDirectory(prefix="trainpipe-ranks-") as tmp:
        params_file = Path(tmp) / PARAMS_FILE
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"),
            *("-m", "pipelines.stages.train", "--params", str(params_file)),
        ]
        sys.stdout.flush()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        while chunk := os.read(proc.stderr.fileno(), 65536):  # as it comes: progress stays live
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-STDERR_TAIL_BYTES:]
        code = proc.wait()
    if code:
        raise RankFailed(*rank_failure(tail, code))


def rank_failure(stderr: str, code: int) -> tuple[str, int]:
    """(reason, exit code) of a failed torchrun from its stderr: the rank's own `trainpipe train:`
    line, and the exit code torchrun reports for the root cause; a rank ended by a signal, or a
    report that cannot be read, is 1 (unexpected: a flow may retry it)."""
    prefix = "trainpipe train: "
    ours = [ln.removeprefix(prefix) for ln in re.split(r"[\r\n]", stderr) if ln.startswith(prefix)]
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.S)
    rank_code = int(root.group(1)) if root else 1
    reason = ours[-1] if ours else f"torchrun exited with {code} (its report is above)"
    return reason, rank_code if rank_code > 0 else 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies, even by SIGKILL: torchrun when
    the launcher dies, a rank when torchrun does. torchrun starts each rank in its own session, so
    a kill of the launcher or of its process group would otherwise leave the ranks training, and
    rank 0 writing checkpoints, beside the run that resumes them. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def join_ranks(cfg: TrainParams, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: (0, 1, device) outside torchrun. Under torchrun
    it joins the process group: gloo on CPU, nccl on CUDA with one GPU per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else 1
    if world != cfg.nproc_per_node:
        how = f"launched as {world} processes" if in_torchrun() else "run as one process, outside torchrun"
        raise ConfigError(
            f"train.nproc_per_node is {cfg.nproc_per_node} but this is {how}: run `python -m "
            "pipelines.stages.train`, which starts torchrun itself (the checkpoint key names the process count)"
        )
    if world == 1:
        return 0, 1, device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.nproc_per_node > 1 trains on cpu or cuda, not {device.type}")
    import torch.distributed as dist

    die_with_parent()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"train.nproc_per_node is {world} but this machine has {torch.cuda.device_count()} GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def leave_ranks() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's obj, on every rank (a sync point): what rank 0 alone read from disk."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    """The loss of the whole step's batch: the mean of the ranks' losses on their equal slices,
    the same number on every rank, so that all stop together at a non-finite one (a sync point)."""
    if world == 1:
        return loss.item()
    import torch.distributed as dist

    total = loss.detach().float().clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total.item() / world
