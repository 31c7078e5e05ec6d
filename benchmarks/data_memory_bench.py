"""Peak memory of the data stages as users run them: `dvc repro -f -s <stage>` for ingest, curate
and tokenize, on the default corpus and on a larger one, in a fresh copy of the project.

    .venv/bin/python benchmarks/data_memory_bench.py [--large PATH] [--cap-gb 8] [--cap-s 900]

The default corpus is the standard library (data.source: python-stdlib). The large one is every
.py file under PATH (by default this environment's site-packages, about ten times the standard
library). Each stage runs alone, forced, in its own process tree; its peak RSS (the tree's sum,
sampled every 0.1 s) is printed with the corpus's size. A stage past --cap-gb or --cap-s is
stopped there, and its row says so: the table then shows at least how much it needed.
"""

import argparse
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil
from project_copy import BIN, copy_project, project_env  # beside this file

STAGES = ("ingest", "curate", "tokenize")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(proj: Path, stage: str, cap_bytes: int, cap_s: float) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "-f", "-s", stage],
        cwd=proj, env=project_env(proj), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    watched, peak, stopped = psutil.Process(proc.pid), 0, ""
    while proc.poll() is None:
        peak = max(peak, tree_rss(watched))
        if peak > cap_bytes:
            stopped = f"stopped at {cap_bytes / 2**30:.0f} GiB"
        elif time.monotonic() - started > cap_s:
            stopped = f"stopped after {cap_s:.0f} s"
        if stopped:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    error = "" if stopped or proc.returncode == 0 else proc.stderr.read().decode(errors="replace")[-300:]
    return {"peak": peak, "seconds": time.monotonic() - started, "stopped": stopped, "error": error}


def corpus_bytes(proj: Path) -> int:
    """The text bytes of the raw snapshot's documents (0 before ingest wrote it)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    raw = sorted((proj / "data" / "raw").glob("*.parquet"))
    return sum(
        pc.sum(pc.binary_length(pq.read_table(f, columns=["content"])["content"])).as_py() or 0 for f in raw
    )


def measure(name: str, overrides: list[str], cap_bytes: int, cap_s: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        proj = copy_project(Path(tmp), None, overrides)
        # the check stage before ingest: what DVC cannot hash itself (not measured)
        subprocess.run([str(BIN / "dvc"), "repro", "-s", "inputs"], cwd=proj, env=project_env(proj),
                       check=True, capture_output=True)  # fmt: skip
        for stage in STAGES:
            result = run_stage(proj, stage, cap_bytes, cap_s)
            rows.append({"corpus": name, "stage": stage, **result, "raw": corpus_bytes(proj)})
            r = rows[-1]
            note = r["stopped"] or (f"FAILED: {r['error']}" if r["error"] else "")
            print(
                f"{name:<10} {stage:<9} peak {r['peak'] / 2**20:>8,.0f} MB  {r['seconds']:>6.1f} s  {note}",
                flush=True,
            )
            if r["stopped"] or r["error"]:
                break  # the next stage needs this one's output
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--large", default=sysconfig.get_paths()["purelib"], help="folder of the large corpus"
    )
    parser.add_argument("--cap-gb", type=float, default=8.0, help="stop a stage past this peak RSS")
    parser.add_argument("--cap-s", type=float, default=900.0, help="stop a stage past this many seconds")
    parser.add_argument("--skip-large", action="store_true", help="only the default corpus")
    args = parser.parse_args()
    cap = int(args.cap_gb * 2**30)
    print(
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; caps {args.cap_gb:g} GiB, {args.cap_s:g} s"
    )
    rows = measure("default", [], cap, args.cap_s)
    if not args.skip_large:
        large = [
            "data.source=" + str(Path(args.large).resolve()),
            'data.include=["**/*.py"]',
            "data.max_documents=null",
        ]
        rows += measure("large", large, cap, args.cap_s)
    print("\n| corpus | text | stage | peak RSS | × the text | seconds |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        times = f"{r['peak'] / r['raw']:.0f}×" if r["raw"] else "–"
        peak = f"{r['peak'] / 2**20:,.0f} MB" + (f" ({r['stopped']})" if r["stopped"] else "")
        print(
            f"| {r['corpus']} | {r['raw'] / 2**20:,.1f} MB | {r['stage']} | {peak} | {times} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
