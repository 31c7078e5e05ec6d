"""A flow run's fixed overhead: an unchanged `trainpipe run`, and all but the stages' own work in a run that trains.

    .venv/bin/python benchmarks/run_overhead.py [--repeats 5] [--baseline REV] [-S key=value ...]

Each project is a copy of the git-tracked files (of the working tree; of commit REV for the
baseline) in a temporary git repository, as a clone would be, with its own DVC cache, MLflow
database and Prefect home. params.yaml takes the -S overrides (default: train.max_steps=50, that
is the default corpus, data gate and model with a shorter training). Both databases are created
before anything is timed: their migrations are a first run's cost, not every run's.

1. A run that trains, from nothing: wall time from process start to exit, and each stage's work
   as the stage reports it (`STAGE: N s of work`: its run(), without Python's start and the
   imports before it; a baseline without that line shows none). The overhead is the rest:
   Prefect, MLflow, DVC, every stage's start-up and imports, the inputs check, push, publish with
   its smoke test. Where the time went comes from when Prefect's lines arrive (task finished, ...).
2. One settling run, not timed: the first run made a champion, so curate checks the data
   against it once.
3. --repeats unchanged runs, the projects taking turns: wall time from process start to exit.
   Each must execute no stage and publish nothing.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from project_copy import BIN, copy_project, project_env

STAGES = ("ingest", "curate", "tokenize", "train", "evaluate")
WORK_LINE = re.compile(r"^(\w+): (\d+(?:\.\d+)?) s of work$")
TASK_DONE = re.compile(r"Task run '([a-z_]+?)(?:-[0-9a-f]{3})?' - Finished in state (\w+)")


def create_databases(proj: Path, env: dict) -> None:
    """Run MLflow's and Prefect's migrations (and Prefect's block registration) once, untimed."""
    python = str(BIN / "python")
    subprocess.run(
        [python, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
        cwd=proj,
        env=env,
        check=True,
    )
    start_stop = "from prefect.server.api.server import SubprocessASGIServer as S; s = S(); s.start(timeout=600); s.stop()"
    subprocess.run([python, "-c", start_stop], cwd=proj, env=env, check=True, capture_output=True)


def timed_run(proj: Path, env: dict, echo: bool = False) -> dict:
    """One `trainpipe run`: wall time, and when each marker line arrived (seconds from start)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "trainpipe"), "run"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marks, work, lines = {}, {}, []
    for line in proc.stdout:
        at = time.monotonic() - start
        lines.append(line)
        if echo:
            sys.stderr.write(line)
        if "Beginning flow run" in line:
            marks.setdefault("flow began", at)
        elif (task := TASK_DONE.search(line)) and task.group(2) == "Completed":
            marks[task.group(1)] = at
        elif re.search(r"Flow run '[^']+' - Finished in state", line):
            marks["flow finished"] = at
        elif match := WORK_LINE.match(line.strip()):
            work[match.group(1)] = float(match.group(2))
    code = proc.wait()
    wall = time.monotonic() - start
    output = "".join(lines)
    if code:
        raise SystemExit(f"trainpipe run in {proj} exited with {code}:\n{output[-3000:]}")
    return {"wall": wall, "marks": marks, "work": work, "output": output}


def segments(run: dict) -> dict[str, float]:
    """Wall seconds between consecutive markers: where a run's time went."""
    marks, out, last = run["marks"], {}, 0.0
    order = [
        ("start-up, until the flow begins", "flow began"),
        ("MLflow run and the inputs check", "record_inputs"),
        *[(stage, stage) for stage in STAGES],
        ("dvc push", "push_outputs"),
        ("publish", "publish"),
        ("endpoints, artifact, end of flow", "flow finished"),
    ]
    for name, mark in order:
        if mark in marks:
            out[name], last = marks[mark] - last, marks[mark]
    out["exit (Prefect's workers, server stop)"] = run["wall"] - last
    return out


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="unchanged runs per project (median); 0: none")
    parser.add_argument(
        "--baseline", metavar="REV", help="also a project with this commit's code, side by side"
    )
    parser.add_argument(
        "-S", "--set", action="append", default=None, metavar="KEY=VALUE", help="params override"
    )
    parser.add_argument("--keep", action="store_true", help="keep the projects (their folders are printed)")
    parser.add_argument("--echo", action="store_true", help="show the runs' output")
    args = parser.parse_args()
    overrides = args.set if args.set is not None else ["train.max_steps=50"]
    print(machine())
    print(f"overrides: {' '.join(overrides) or 'none'}; load average at start {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="run-overhead-"))
    variants = {"this tree": None} | ({f"baseline {args.baseline}": args.baseline} if args.baseline else {})
    projects, first = {}, {}
    try:
        for name, rev in variants.items():
            proj = copy_project(tmp / name.replace(" ", "-"), rev, overrides)
            env = project_env(proj)
            create_databases(proj, env)
            print(f"{name}: a run that trains ...", file=sys.stderr, flush=True)
            first[name] = timed_run(proj, env, args.echo)
            if args.repeats:
                timed_run(proj, env, args.echo)  # settles curate against the new champion
            projects[name] = (proj, env)
        unchanged = {name: [] for name in variants}
        for i in range(args.repeats):
            for name, (proj, env) in projects.items():
                run = timed_run(proj, env, args.echo)
                if "Running stage" in run["output"] or "unchanged:" not in run["output"]:
                    raise SystemExit(f"{name}: run {i + 1} was not unchanged:\n{run['output'][-3000:]}")
                unchanged[name].append(run)
                print(f"{name}: unchanged run {i + 1}: {run['wall']:.2f} s", file=sys.stderr, flush=True)
        print_report(first, unchanged)
        print(f"load average at end {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep:
            print(f"projects kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_report(first: dict, unchanged: dict) -> None:
    names = list(first)
    print("\nA run that trains (one run each; seconds of wall time):\n")
    print("| step | " + " | ".join(f"{n}: wall | {n}: stage's work" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    rows = {n: segments(first[n]) for n in names}
    for step in rows[names[0]]:
        cells = []
        for n in names:
            work = first[n]["work"].get(step)
            cells += [f"{rows[n].get(step, float('nan')):.2f}", f"{work:.2f}" if work is not None else ""]
        print(f"| {step} | " + " | ".join(cells) + " |")
    for n in names:
        wall, work = first[n]["wall"], sum(first[n]["work"].values())
        if work:
            print(
                f"{n}: total {wall:.1f} s, stage work {work:.1f} s, overhead {wall - work:.1f} s "
                f"= {(wall - work) / wall:.0%} of the run"
            )
        else:
            print(f"{n}: total {wall:.1f} s (its stages report no work time)")

    if not unchanged[names[0]]:
        return
    print(f"\nAn unchanged run (median of {len(unchanged[names[0]])}; seconds of wall time):\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (1 + len(names)) + "|")
    steps = list(segments(unchanged[names[0]][0]))
    for step in steps:
        cells = [f"{statistics.median(segments(r).get(step, 0.0) for r in unchanged[n]):.2f}" for n in names]
        print(f"| {step} | " + " | ".join(cells) + " |")
    medians = {n: statistics.median(r["wall"] for r in unchanged[n]) for n in names}
    print("| **whole run** | " + " | ".join(f"**{medians[n]:.2f}**" for n in names) + " |")
    for n in names:
        walls = ", ".join(f"{r['wall']:.2f}" for r in unchanged[n])
        print(f"{n}: {walls} s")
    if len(names) == 2:
        print(f"ratio {names[0]} / {names[1]}: {medians[names[0]] / medians[names[1]]:.2f}")
    print(
        f"goal: an unchanged run <= 8 s: {medians[names[0]]:.2f} s {'PASS' if medians[names[0]] <= 8 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
