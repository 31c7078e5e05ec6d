"""What a stage process spent: its wall seconds, its peak memory and the device it held.

The flow sets TRAINPIPE_USAGE_DIR for each `dvc repro --single-item STAGE`; DVC hands its
environment to the stage's command, whose stage_main (pipelines/stages/entry.py) writes one small JSON
per process as it exits, whether the stage passed or failed. The cost ledger (pipelines/core/ledger.py)
prices them. Without the variable (a plain `dvc repro`, `trainpipe train`) nothing is written.

The reports live in a folder of the flow's, outside the workspace: never a DVC output, so no
cache key or dvc.lock hash depends on a timing, and identical runs keep identical outputs.
A stage that DVC skips runs no process and writes none: it spent nothing.

    {"stage": "train", "pid": 4242, "rank": null, "device": "cpu", "seconds": 231.4,
     "peak_rss_bytes": 1203765248, "cuda_peak_bytes": null, "exit": "ok",
     "work": {"steps": 800, "resumed_from_step": 300, "train_seconds": 220.9, ...}}

"work" holds what a stage noted about this run of it (note_work): facts of the run, not of its
result, such as the step a resumed train started from and its seconds. In a DVC output they would
give byte-identical weights a different hash, and a re-scoring where none is needed.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

USAGE_DIR_ENV = "TRAINPIPE_USAGE_DIR"
_work: dict = {}  # this process's note_work facts


def note_work(**facts) -> None:
    """Facts about this run of the stage for its usage report (see the module's docstring)."""
    _work.update(facts)


def process_seconds() -> float:
    """Wall seconds since this process started: the interpreter's start and the imports count,
    the device was held for them too. On Linux from the kernel's start time in clock ticks since
    boot (10 ms); psutil's create_time adds the boot time, which /proc gives in whole seconds."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())


def peak_rss_bytes() -> int:
    """The largest resident set of this process or of any child it waited for (curate's workers,
    torchrun and its ranks): the peak of the stage's largest single process, not of their sum."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * (1 if sys.platform == "darwin" else 1024)  # macOS counts bytes, Linux KiB


def cuda_peak_bytes() -> int | None:
    """torch.cuda.max_memory_allocated over this process's GPUs, or None when it used none.
    Only looked at when the stage imported torch itself: this never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (pipelines/adapters/ranks.py), else None."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ.get("RANK", "0"))
    return None


def measure_process(stage: str, exit_status: str) -> dict:
    cuda = cuda_peak_bytes()
    return {
        "stage": stage,
        "pid": os.getpid(),
        "rank": torchrun_rank(),
        "device": "cpu" if cuda is None else "cuda",
        "seconds": process_seconds(),
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_peak_bytes": cuda,
        "exit": exit_status,
    } | ({"work": dict(_work)} if _work else {})


def write_usage(stage: str, exit_status: str) -> Path | None:
    """This process's report in TRAINPIPE_USAGE_DIR (None when it is not set). Never raises: a
    report that cannot be written must not fail a stage that did its work."""
    folder = os.environ.get(USAGE_DIR_ENV)
    if not folder:
        return None
    try:
        record = measure_process(stage, exit_status)
        path = Path(folder) / f"{stage}-{record['pid']}.json"
        path.write_text(json.dumps(record) + "\n")
    except Exception as exc:  # the stage's own outcome matters more than its report
        print(f"trainpipe {stage}: could not write its usage report ({exc})", file=sys.stderr)
        return None
    return path


def note_unreported_attempt(folder: str | Path, stage: str, since_ns: int, seconds: float) -> Path | None:
    """For an attempt at stage that failed: when none of its main processes reported since
    since_ns (killed outright, by SIGKILL, SIGTERM or the OOM killer, or DVC failed around it),
    the flow's own wall time around `dvc repro` stands in for it, priced as CPU (no process is
    left to say which device it held). Its seconds are not lost from the ledger."""
    folder = Path(folder)
    for path in folder.glob(f"{stage}-*.json"):
        try:
            if path.stat().st_mtime_ns >= since_ns and json.loads(path.read_text()).get("rank") is None:
                return None
        except (OSError, json.JSONDecodeError):
            continue
    return record_flow_seconds(
        folder,
        stage,
        since_ns,
        seconds,
        "no report from the stage (killed?): the flow's wall time around dvc repro",
    )


def record_flow_seconds(folder: str | Path, stage: str, since_ns: int, seconds: float, note: str) -> Path:
    """A record of seconds the flow's own process spent for stage (on CPU, no peak memory of its
    own: the flow process holds more than the stage)."""
    record = {
        "stage": stage,
        "pid": os.getpid(),
        "rank": None,
        "device": "cpu",
        "seconds": seconds,
        "peak_rss_bytes": None,
        "cuda_peak_bytes": None,
        "exit": note,
    }
    path = Path(folder) / f"{stage}-flow-{since_ns}.json"
    path.write_text(json.dumps(record) + "\n")
    return path


def read_usage(folder: str | Path, since_ns: int = 0) -> list[dict]:
    """Every report in folder (written since since_ns), in the order the processes ended."""
    paths = sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    records = []
    for path in paths:
        if path.stat().st_mtime_ns < since_ns:
            continue
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a process killed mid-write: its seconds are lost, the others count
    return records


def stage_work(records: list[dict], stage: str) -> list[dict]:
    """The work facts that stage's processes noted, one per process that finished its work."""
    return [r["work"] for r in records if r["stage"] == stage and r.get("work") and r["exit"] == "ok"]
