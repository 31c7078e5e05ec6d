"""Wall time and peak memory of ingest, curate and tokenize as users run them, at 1x, 10x and 20x the data.

The larger corpora are built from real, distinct text files of this machine, not copies.

    .venv/bin/python benchmarks/data_bench.py [--sizes 1,10,20] [--repeats 3] [--repeats-large 1]
        [--workers 1,2] [--stages ingest,curate,tokenize] [--corpus-dir DIR] [--rev REV] [-S KEY=VALUE]
    .venv/bin/python benchmarks/data_bench.py --corpus-only --sizes 10,20    # build the corpora, report them

Corpora. 1x is the default source, data.source=python-stdlib (the interpreter's standard library,
.py files only). Nx is a folder of real text files (.py .pyi .pyx .pxd .c .h .cc .cpp .hpp .md .rst
.txt) from the places that hold them here (--roots): the standard library with the other kinds,
the installed packages (this environment's and the base interpreter's), the system's Python and
C headers, /usr/share/doc, the Google Cloud SDK's sources. Files are skipped when binary (a NUL
byte in the first 8 KB, as ingest tests), over 1 MB, empty, hidden, in a package's metadata
folder, or an exact copy (sha256) of one taken already: copies would dedupe away and leave
curate's and tokenize's work flat. The distinct files are taken in the order of a hash of their
paths, a fixed shuffle, until N times the default corpus's bytes are in: each corpus holds the
same mix of kinds, and a smaller one is part of a larger one. Files are hard-linked (copied
across file systems) into --corpus-dir/xN/ and reused by later runs. If this machine holds less
distinct text than asked for, the corpus is all there is and the report says so.

Each stage runs as `python -m pipelines.stages.STAGE -S ...` in a fresh copy of the project (the
working tree, or commit --rev), after `python -m pipelines.stages.inputs` (curate reads the
champion reference it writes; not measured). Per run: wall time (Python's start and imports
included) and peak RSS, both of the whole process tree (the stage and its workers, sampled every
50 ms and summed: pages forked workers share count once per process) and of its largest single
process (the kernel's high-water mark). curate and tokenize run at each of --workers; a
parameter this project's schema does not know (tokenize.workers before it existed) is left
out and said so, and that stage runs once per repeat at its own setting. `xz -1 -T1` over the
default corpus's raw bytes runs before each repeat's curate runs, for the curate / xz ratio
(curate at the most workers; `python -m`, not `dvc repro`). Each curate run starts without
data/curated.cache, so it analyses every shard, as a first run does. Runs take turns within a repeat
(most workers first); the table holds medians of wall time, the highest peaks, the stage's own
seconds as it prints them (without Python's start and imports), and each run with the load
average after it: another process's load slows every figure. A run past --cap-gb or --cap-s is
stopped (its peaks are then lower bounds), and the stages after it are skipped. Below the table:
the speed-up from the fewest to the most --workers, the largest corpus's wall time and peak RSS
against 1x's, and curate / xz, each against its goal (issue: flat memory, at most 1.5 GB a stage
at 20x; 20x in at most 24x the time; 1 -> 2 workers at least 1.7x; curate within 10x xz).
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil
from project_copy import copy_project, project_env  # beside this file

from pipelines.core.params import override_text

STAGES = ("ingest", "curate", "tokenize")
WORKER_PARAMS = {"curate": "curate.workers", "tokenize": "tokenize.workers"}
EXTENSIONS = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 1_000_000
BINARY_SNIFF_BYTES = 8000  # ingest's test for a binary file, git's: a NUL byte in the first 8000 bytes
SKIPPED_DIRS = ("__pycache__", "site-packages")  # site-packages: a root of its own, not part of the stdlib's
SKIPPED_DIR_SUFFIXES = (".dist-info", ".egg-info")
CORPUS_FORMAT = 1  # bump when the selection changes: cached corpora of another format are rebuilt
SAMPLE_S = 0.05
GOALS = {"peak_gb_20x": 1.5, "wall_ratio_20x": 24.0, "speedup_1_2": 1.7, "curate_over_xz": 10.0}


def stdlib_files() -> list[Path]:
    """The default corpus, as ingest takes data.source=python-stdlib: the .py files of this
    interpreter's standard library, installed packages left out. (Not imported from the stage,
    whose insides may change: this file must run against the project before and after.)"""
    files = []
    for folder, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d != "site-packages"]
        files += [Path(folder, n) for n in names if n.endswith(".py") and Path(folder, n).is_file()]
    return sorted(files)


def default_roots() -> list[tuple[str, Path]]:
    """(label, folder) of the places holding real text here; the label heads the paths in a corpus."""
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    roots = [
        ("stdlib", Path(sysconfig.get_paths()["stdlib"])),
        ("env-packages", Path(sysconfig.get_paths()["purelib"])),
        ("base-packages", Path(base["purelib"])),
        ("python-include", Path(sysconfig.get_paths()["include"])),
    ]
    for folder in sorted(Path("/usr/lib").glob("python3*")) + sorted(Path("/usr/local/lib").glob("python3*")):
        roots.append((f"system-{folder.parent.parent.name}-{folder.name}", folder))
    roots += [
        ("usr-include", Path("/usr/include")),
        ("usr-doc", Path("/usr/share/doc")),
        ("google-cloud-sdk", Path("/usr/lib/google-cloud-sdk")),
    ]
    seen, unique = set(), []
    for label, folder in roots:
        if folder.is_dir() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            unique.append((label, folder))
    return unique


# ---------------------------------------------------------------------------------------------
# Corpora


def text_files(label: str, root: Path):
    """(corpus path, file) of root's candidate text files, sorted; no content read yet."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(SKIPPED_DIR_SUFFIXES)
        )
        for name in sorted(names):
            path = Path(folder, name)
            if name.startswith(".") or path.suffix.lower() not in EXTENSIONS or path.is_symlink():
                continue
            if path.is_file():
                yield f"{label}/{path.relative_to(root).as_posix()}", path


def scan_pool(roots: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path, int]], dict]:
    """Every distinct text file of roots as (corpus path, file, bytes), in the corpus order (a hash
    of the corpus path); and what was skipped."""
    seen, pool = set(), []
    skipped = {"binary": 0, "too large or empty": 0, "exact duplicates": 0, "unreadable": 0}
    for label, root in roots:
        for name, path in text_files(label, root):
            size = path.stat().st_size
            if not 0 < size <= MAX_FILE_BYTES:
                skipped["too large or empty"] += 1
                continue
            try:
                content = path.read_bytes()
            except OSError:
                skipped["unreadable"] += 1
                continue
            if b"\0" in content[:BINARY_SNIFF_BYTES]:
                skipped["binary"] += 1
                continue
            digest = hashlib.sha256(content).digest()
            if digest in seen:
                skipped["exact duplicates"] += 1
                continue
            seen.add(digest)
            pool.append((name, path, len(content)))
    pool.sort(key=lambda entry: hashlib.sha256(entry[0].encode()).digest())
    return pool, skipped


def link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed: a copy reads the same
        shutil.copyfile(src, dest)


def count_files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def build_corpora(
    multiples: list[int], default_bytes: int, corpus_dir: Path, roots, rebuild: bool
) -> dict[int, dict]:
    """{N: the corpus's record} for each N > 1, built under corpus_dir/xN or reused from there."""
    corpora, missing = {}, []
    for n in multiples:
        record_path = corpus_dir / f"x{n}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() and not rebuild else None
        wanted = {
            "format": CORPUS_FORMAT,
            "target_bytes": n * default_bytes,
            "roots": [str(r) for _, r in roots],
        }
        if (
            record
            and all(record.get(k) == v for k, v in wanted.items())
            and count_files(corpus_dir / f"x{n}") == record["files"]
        ):
            corpora[n] = record
            print(f"corpus x{n}: reusing {corpus_dir / f'x{n}'}", file=sys.stderr)
        else:
            missing.append(n)
    if not missing:
        return corpora
    print(f"scanning {len(roots)} folders for distinct text files ...", file=sys.stderr)
    started = time.perf_counter()
    pool, skipped = scan_pool(roots)
    pool_bytes = sum(size for *_, size in pool)
    print(
        f"  {len(pool):,} distinct files, {pool_bytes / 1e6:,.1f} MB in {time.perf_counter() - started:.0f} s "
        f"(skipped: {', '.join(f'{k} {v:,}' for k, v in skipped.items())})",
        file=sys.stderr,
    )
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for n in missing:
        target, folder = n * default_bytes, corpus_dir / f"x{n}"
        shutil.rmtree(folder, ignore_errors=True)
        (corpus_dir / f"x{n}.json").unlink(missing_ok=True)
        taken, total, kinds, by_root = 0, 0, {}, {}
        for name, path, size in pool:
            if total >= target:
                break
            link_or_copy(path, folder / name)
            taken, total = taken + 1, total + size
            kind, root = Path(name).suffix.lower(), name.split("/", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + size
            by_root[root] = by_root.get(root, 0) + size
        record = {
            "format": CORPUS_FORMAT,
            "target_bytes": target,
            "roots": [str(r) for _, r in roots],
            "files": taken,
            "bytes": total,
            "multiple": total / default_bytes,
            "short": total < target,
            "pool_files": len(pool),
            "pool_bytes": pool_bytes,
            "skipped": skipped,
            "bytes_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "bytes_by_root": dict(sorted(by_root.items(), key=lambda kv: -kv[1])),
        }
        (corpus_dir / f"x{n}.json").write_text(json.dumps(record, indent=1) + "\n")
        corpora[n] = record
    return corpora


def describe_corpus(n: int, record: dict) -> str:
    kinds = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in list(record["bytes_by_kind"].items())[:6])
    line = (
        f"corpus x{n}: {record['files']:,} files, {record['bytes'] / 1e6:,.1f} MB = "
        f"{record['multiple']:.2f}x the default (MB by kind: {kinds})"
    )
    if record["short"]:
        line += (
            f"; SHORT: this machine holds only {record['pool_bytes'] / 1e6:,.1f} MB of distinct text "
            f"in these folders, not the {record['target_bytes'] / 1e6:,.1f} MB asked for (no copies added)"
        )
    return line


# ---------------------------------------------------------------------------------------------
# Measuring a process tree


def watch(pid: int, started: float, cap_bytes: int, cap_s: float):
    """Sample the RSS of pid's process tree until it exits or passes a cap (then kill its group):
    (wait status, rusage, peak tree RSS, peak single-process RSS, why it was stopped or "")."""
    watched, tree_peak, proc_peak, stopped = psutil.Process(pid), 0, 0, ""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, tree_peak, proc_peak, stopped
        total = 0
        try:
            members = [watched, *watched.children(recursive=True)]
        except psutil.Error:
            members = []
        for member in members:
            try:
                rss = member.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            proc_peak = max(proc_peak, rss)
        tree_peak = max(tree_peak, total)
        if tree_peak > cap_bytes:
            stopped = f"stopped past {cap_bytes / 2**30:.0f} GiB"
        elif time.perf_counter() - started > cap_s:
            stopped = f"stopped after {cap_s:.0f} s"
        if stopped:
            os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return status, usage, tree_peak, proc_peak, stopped
        time.sleep(SAMPLE_S)


def measure(cmd: list[str], cwd: Path, env: dict, log: Path, cap_bytes: int, cap_s: float) -> dict:
    """Wall time, peak RSS of the process tree (sampled sum) and of its largest process, of cmd."""
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        status, usage, tree_peak, proc_peak, stopped = watch(proc.pid, started, cap_bytes, cap_s)
    except BaseException:  # Ctrl-C: the stage runs in a session of its own and would outlive us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    try:  # a worker left behind by a killed stage
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # ru_maxrss (KiB): the high-water mark of the stage and of every descendant it reaped
    proc_peak = max(proc_peak, usage.ru_maxrss * 1024)
    output = log.read_text(errors="replace")
    work = re.findall(r"([\d.]+) s of work", output)  # the stage's own timer
    summary = re.findall(r"^(?:ingest:|curated |tokenize:).*", output, re.M)  # what the stage says it did
    error = ""
    if not stopped and proc.returncode != 0:
        error = output.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        error = f"exit {proc.returncode}: {error[0][-300:]}"
    return {
        "wall": wall,
        "work": float(work[-1]) if work else None,
        "summary": summary[0] if summary else "",
        "tree_peak": tree_peak,
        "proc_peak": proc_peak,
        "load": os.getloadavg()[0],
        "stopped": stopped,
        "error": error,
    }


# ---------------------------------------------------------------------------------------------
# Running the stages


def known_overrides(proj: Path, env: dict, overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the overrides the project copy's params schema accepts, those it refuses), each tried alone."""
    check = (
        "import sys\nfrom pipelines.core.params import load_params\n"
        "for o in sys.argv[1:]:\n"
        "    try:\n        load_params('params.yaml', [o]); print('ok')\n"
        "    except Exception as e:\n        print('no', str(e).replace(chr(10), ' '))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, *overrides],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    answers = out.stdout.splitlines()
    ok = [o for o, a in zip(overrides, answers, strict=True) if a == "ok"]
    return ok, [o for o in overrides if o not in ok]


def stage_cmd(stage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", f"pipelines.stages.{stage}", *(a for o in overrides for a in ("-S", o))]


def corpus_overrides(source: Path | None, corpus_bytes: int) -> list[str]:
    if source is None:
        return ["data.source=python-stdlib"]
    return [
        override_text("data.source", str(source)),
        override_text("data.include", [f"**/*{ext}" for ext in EXTENSIONS]),
        "data.exclude=[]",  # the corpus holds only what was picked: no folder of it is to be left out
        # the gate's size limit, meant for a source far bigger than meant, is not this benchmark's
        f"curate.gate.max_bytes={max(1_000_000_000, 4 * corpus_bytes)}",
    ]


def stage_plan(
    stages: list[str], workers: list[int], worker_known: dict[str, bool]
) -> list[tuple[str, int | None]]:
    """(stage, workers or None: the stage's own setting) in the order one repeat runs them."""
    plan = []
    for stage in STAGES:
        if stage in WORKER_PARAMS and worker_known[stage]:
            # most workers first: the last run, whose outputs the next stage reads, needs the least memory
            plan += [(stage, w) for w in sorted(workers, reverse=True)]
        else:
            plan.append((stage, None))
    needed = STAGES.index(max(stages, key=STAGES.index)) if stages else -1
    return [(s, w) for s, w in plan if STAGES.index(s) <= needed]


def run_corpus(
    name: str,
    proj: Path,
    env: dict,
    base: list[str],
    extra: list[str],
    args,
    repeats: int,
    runs: dict,
    xz_raw: Path | None = None,
) -> None:
    """Fill runs, {(stage, workers): [run, ...]}, for one corpus; a stage not in args.stages that a
    later one needs runs once, unmeasured. With xz_raw, xz compresses it before each repeat's
    curate runs, taking turns with them (runs["xz"]: its seconds)."""
    cap_bytes = int(args.cap_gb * 2**30)
    worker_overrides = {
        stage: [override_text(key, w) for w in args.workers] for stage, key in WORKER_PARAMS.items()
    }
    known, refused = known_overrides(proj, env, [o for ws in worker_overrides.values() for o in ws])
    worker_known = {stage: all(o in known for o in ws) for stage, ws in worker_overrides.items()}
    for key in sorted({o.split("=")[0] for o in refused}):
        print(f"  {name}: this project's params do not know {key}: left out", file=sys.stderr)
    for key in ("data", "reports"):
        shutil.rmtree(proj / key, ignore_errors=True)
    result = measure(stage_cmd("inputs", base + extra), proj, env, proj / "inputs.log", cap_bytes, args.cap_s)
    if result["error"] or result["stopped"]:
        raise SystemExit(f"{name}: the inputs stage failed: {result['error'] or result['stopped']}")
    plan = stage_plan(args.stages, args.workers, worker_known)
    plan_first_curate = next((w for st, w in plan if st == "curate"), None)
    failed = {}  # stage -> whether its last run failed (stopped or an error): what comes after is skipped
    for i in range(repeats):
        for stage, workers in plan:
            measured = stage in args.stages
            if not measured and i > 0:
                continue  # an earlier stage's output, made once
            if any(failed.get(earlier) for earlier in STAGES[: STAGES.index(stage)]):
                continue
            if xz_raw and measured and stage == "curate" and workers == plan_first_curate:
                runs.setdefault("xz", []).append(time_xz(xz_raw))
                print(f"  {name} xz -1 -T1 run {i + 1}: {runs['xz'][-1]:.1f} s", file=sys.stderr, flush=True)
            overrides = base + extra + ([override_text(WORKER_PARAMS[stage], workers)] if workers else [])
            # every curate run analyses every shard: the last run's analysis, kept for a re-run, goes
            shutil.rmtree(proj / "data" / "curated.cache", ignore_errors=True)
            r = measure(stage_cmd(stage, overrides), proj, env, proj / f"{stage}.log", cap_bytes, args.cap_s)
            note = r["stopped"] or r["error"]
            print(
                f"  {name} {stage} workers={workers or '-'} run {i + 1}: {r['wall']:.1f} s, tree "
                f"{r['tree_peak'] / 2**20:,.0f} MiB, largest {r['proc_peak'] / 2**20:,.0f} MiB"
                f"{'' if measured else ' (not measured)'}  {note}  (load {r['load']:.1f})",
                file=sys.stderr,
                flush=True,
            )
            if i == 0 and r["summary"]:
                print(f"    {r['summary'][:300]}", file=sys.stderr, flush=True)
            if measured:
                runs.setdefault((stage, workers), []).append(r)
            failed[stage] = bool(note)


def default_corpus_raw(tmp: Path) -> Path | None:
    """The default corpus's raw bytes in one file (its files concatenated), for xz; None without xz."""
    if shutil.which("xz") is None:
        return None
    raw = tmp / "stdlib.bin"
    with raw.open("wb") as out:
        for file in stdlib_files():
            out.write(file.read_bytes())
    return raw


def time_xz(raw: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["xz", "-1", "-T1", "-c", str(raw)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The report


def summarize(runs: list[dict]) -> dict:
    good = [r for r in runs if not (r["stopped"] or r["error"])]
    worst = max(runs, key=lambda r: r["tree_peak"])
    works = [r["work"] for r in good if r["work"] is not None]
    return {
        "wall": statistics.median(r["wall"] for r in good) if good else None,
        "work": statistics.median(works) if works else None,
        "loads": [r["load"] for r in runs],
        "walls": [r["wall"] for r in runs],
        "tree_peak": max(r["tree_peak"] for r in runs),
        "proc_peak": max(r["proc_peak"] for r in runs),
        "note": "; ".join(sorted({r["stopped"] or r["error"] for r in runs if r["stopped"] or r["error"]})),
        "at_least": bool(worst["stopped"]),
    }


def row_order(item) -> tuple[int, int]:
    (stage, workers), _ = item
    return STAGES.index(stage), workers or 0


def print_report(results: dict, corpora_info: dict, xz: float | None, workers: list[int]) -> None:
    one = results.get(1, {})
    print(
        "\n| corpus | MB | docs | stage | workers | wall s (median) | × of 1× wall | MB/s "
        "| peak RSS tree MiB | peak RSS largest process MiB | stage's own s | runs: s (load) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, rows in results.items():
        mb, docs = corpora_info[n]
        for (stage, w), s in sorted(rows.items(), key=row_order):
            base = one.get((stage, w))
            ratio = f"{s['wall'] / base['wall']:.1f}×" if s["wall"] and base and base["wall"] else "–"
            wall = f"{s['wall']:.2f}" if s["wall"] else "–"
            speed = f"{mb / s['wall']:.1f}" if s["wall"] else "–"
            more = "≥ " if s["at_least"] else ""
            runs = ", ".join(f"{t:.1f} ({load:.1f})" for t, load in zip(s["walls"], s["loads"], strict=True))
            runs += f"; {s['note']}" if s["note"] else ""
            work = f"{s['work']:.2f}" if s["work"] else "–"
            print(
                f"| {n}× | {mb:,.1f} | {docs:,} | {stage} | {w or 'default'} | {wall} | {ratio} | {speed} "
                f"| {more}{s['tree_peak'] / 2**20:,.0f} | {more}{s['proc_peak'] / 2**20:,.0f} | {work} | {runs} |"
            )
    print_goals(results, corpora_info, xz, workers)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_goals(results: dict, corpora_info: dict, xz: float | None, workers: list[int]) -> None:
    """The issue's figures under the table, each against its goal."""
    print()
    one, lo, hi = results.get(1, {}), min(workers), max(workers)
    for n, rows in results.items() if lo != hi else ():
        for stage in WORKER_PARAMS:
            a, b = rows.get((stage, lo)), rows.get((stage, hi))
            line = f"speed-up {lo}→{hi} workers, {stage}, {n}×: "
            if (stage, None) in rows:
                print(line + "not settable in this project (the stage ran at its own setting)")
            elif a and b and a["wall"] and b["wall"]:
                speedup = a["wall"] / b["wall"]
                goal = GOALS["speedup_1_2"]
                print(line + f"{speedup:.2f}× (goal ≥ {goal}×: {verdict(speedup >= goal)})")
            elif a and b:
                print(line + "no figure: a run failed or was stopped")
    big = max(results, default=0)
    if big <= 1 or not one:
        big = 0
    for (stage, w), s in sorted(results[big].items(), key=row_order) if big else ():
        base, goal = one.get((stage, w)), GOALS["wall_ratio_20x"] * big / 20
        line = f"{big}× wall / 1× wall, {stage}, workers {w or 'default'}: "
        if base and base["wall"] and s["wall"]:
            ratio, size = s["wall"] / base["wall"], corpora_info[big][0] / corpora_info[1][0]
            print(
                line + f"{ratio:.1f}× for {size:.1f}× the bytes (goal ≤ {goal:g}×: {verdict(ratio <= goal)})"
            )
        elif base:
            print(line + "no figure: a run failed or was stopped")
    limit = GOALS["peak_gb_20x"] * 1e9
    for stage in STAGES if big else ():
        rows = [s for (st, _), s in results[big].items() if st == stage]
        if not rows:
            continue
        worst = max(rows, key=lambda s: s["tree_peak"])
        first = max((s["tree_peak"] for (st, _), s in one.items() if st == stage), default=0)
        failed = [s["note"] for s in rows if s["note"]]
        line = (
            f"peak RSS {stage}, {big}×: {'≥ ' if worst['at_least'] else ''}{worst['tree_peak'] / 2**20:,.0f} MiB "
            f"tree, largest process {max(s['proc_peak'] for s in rows) / 2**20:,.0f} MiB"
            + (f", {worst['tree_peak'] / first:.1f}× the 1× peak" if first else "")
            + f" (goal ≤ {GOALS['peak_gb_20x']} GB = {limit / 2**20:,.0f} MiB: "
        )
        ok = worst["tree_peak"] <= limit and not failed  # a failed run's peak says nothing of a whole one
        print(line + verdict(ok) + (f", {failed[0]})" if failed else ")"))
    curate = one.get(("curate", hi)) or one.get(("curate", None))
    if xz and curate and curate["wall"]:
        ratio, goal = curate["wall"] / xz, GOALS["curate_over_xz"]
        setting = hi if ("curate", hi) in one else "default"
        print(
            f"curate (python -m, workers {setting}) / xz -1 -T1 on 1×: {curate['wall']:.2f} s / {xz:.2f} s "
            f"= {ratio:.1f}× (goal ≤ {goal:g}×: {verdict(ratio <= goal)})"
        )


def int_list(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def stage_list(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    return stages


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a kill ends the running stage too, and the table of what finished prints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int_list, default="1,10,20", help="corpus sizes, multiples of the default corpus; 1 is python-stdlib itself (default: %(default)s)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of each stage on the 1× corpus, and of xz (default: %(default)s)")  # fmt: skip
    parser.add_argument("--repeats-large", type=int, default=1, help="runs of each stage on a larger corpus (default: %(default)s)")  # fmt: skip
    parser.add_argument("--workers", type=int_list, default="1,2", help="curate.workers and tokenize.workers to run at; the speed-up is fewest to most (default: %(default)s)")  # fmt: skip
    parser.add_argument("--stages", type=stage_list, default=",".join(STAGES), help="stages measured; one that a later one needs runs once, unmeasured (default: %(default)s)")  # fmt: skip
    parser.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainpipe-data-bench-corpora", help="where the Nx corpora are built, and found by later runs (default: %(default)s)")  # fmt: skip
    parser.add_argument("--rebuild-corpus", action="store_true", help="build the corpora again even if --corpus-dir has them")  # fmt: skip
    parser.add_argument("--corpus-only", action="store_true", help="build (or find) the corpora, describe them, run nothing")  # fmt: skip
    parser.add_argument("--roots", nargs="+", type=Path, metavar="FOLDER", help="folders the Nx corpora's files come from (default: the standard library, the installed packages, the system's Python and C headers, /usr/share/doc, the Google Cloud SDK)")  # fmt: skip
    parser.add_argument("--rev", help="benchmark the project as of this commit (default: the working tree)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter override for every stage run, e.g. data.executor=dask; the project's params must know it")  # fmt: skip
    parser.add_argument("--skip-xz", action="store_true", help="do not time xz -1 -T1 on the default corpus")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="stop a run whose process tree passes this RSS, in GiB (default: %(default)s)")  # fmt: skip
    parser.add_argument("--cap-s", type=float, default=1800.0, help="stop a run past this many seconds (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers: counts of 1 or more")

    default_files = stdlib_files()
    default_bytes = sum(f.stat().st_size for f in default_files)
    roots = (
        default_roots()
        if not args.roots
        else [(re.sub(r"\W+", "-", str(r)).strip("-"), r) for r in args.roots]
    )
    corpora = build_corpora(
        [n for n in args.sizes if n > 1], default_bytes, args.corpus_dir, roots, args.rebuild_corpus
    )
    corpora_info = {1: (default_bytes / 1e6, len(default_files))} if 1 in args.sizes else {}
    print(f"corpus x1: python-stdlib, {len(default_files):,} files, {default_bytes / 1e6:,.1f} MB")
    for n, record in corpora.items():
        print(describe_corpus(n, record))
        corpora_info[n] = (record["bytes"] / 1e6, record["files"])
    if args.corpus_only:
        return

    cpu = platform.processor() or platform.machine()
    print(
        f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
        f"{platform.python_version()}; project: {args.rev or 'working tree'}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, interrupt)
    started, runs = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        proj = copy_project(Path(tmp) / "project", args.rev, [])
        env = project_env(proj)
        extra, refused = known_overrides(proj, env, args.set)
        if refused:
            parser.error(f"this project's params refuse {refused}")
        xz_raw = None if args.skip_xz or 1 not in args.sizes else default_corpus_raw(Path(tmp))
        try:
            for n in args.sizes:
                source = None if n == 1 else args.corpus_dir / f"x{n}"
                base = corpus_overrides(source, int(corpora_info[n][0] * 1e6))
                repeats = args.repeats if n == 1 else args.repeats_large
                print(
                    f"{n}×: {corpora_info[n][0]:,.1f} MB, {repeats} repeat(s) ...",
                    file=sys.stderr,
                    flush=True,
                )
                runs[n] = {}
                run_corpus(
                    f"{n}×", proj, env, base, extra, args, repeats, runs[n], xz_raw if n == 1 else None
                )
        except KeyboardInterrupt:
            print("\ninterrupted: the table holds the runs that finished", flush=True)
    xz_runs = runs.get(1, {}).pop("xz", [])
    xz = statistics.median(xz_runs) if xz_runs else None
    results = {n: {key: summarize(r) for key, r in rows.items()} for n, rows in runs.items() if rows}
    print_report(results, corpora_info, xz, args.workers)
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (another process's load slows every figure)"
    )


if __name__ == "__main__":
    main()
