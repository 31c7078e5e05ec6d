"""Throughput of each curate step, and of the whole stage, on the default corpus and on ten times it.

    .venv/bin/python benchmarks/curate_bench.py [--repeats 3] [--repeats-10x 1] [--skip-10x] [--steps-only]
    .venv/bin/python benchmarks/curate_bench.py --as-users-run-it [--repeats 3] [--baseline REV]

Corpus (a) is the Python standard library as ingest collects it; corpus (b) is (a) plus nine
edited copies of each document (path prefix copyK/, one identifier that occurs once renamed, one number
changed, one comment line inserted): near-duplicates, not exact ones, so near dedupe has work.
Each step runs single-process over the whole corpus; MB/s is raw input bytes over the step's
median time. End to end is `curate.run` (parquet in, gate, parquet out) in a temp folder,
in-process with imports warm, with curate.workers=2 and =1, and no registry to consult.

--as-users-run-it: the data gate as a user runs it, `dvc repro -f -s curate` in a copy of the
project (Python's start, the imports and DVC included; no registry, so no drift check), against
`xz -1 -T1` over the same raw bytes, the two taking turns --repeats times (and a copy of commit
REV's project with --baseline); medians and the ratio.
"""

import argparse
import hashlib
import keyword
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from project_copy import BIN, copy_project, project_env

from pipelines.core.data import write_documents, write_json
from pipelines.core.dedupe import NearDuplicates, shingle_hashes, signature
from pipelines.core.params import load_params
from pipelines.core.quality import decode_document, failing_filters
from pipelines.core.scrub import scrub_text
from pipelines.core.shards import iter_documents
from pipelines.stages import curate, inputs
from pipelines.stages import data_gate as gate
from pipelines.stages.ingest import collect_documents

PARAMS_PATH = Path(__file__).resolve().parents[1] / "params.yaml"
_IDENT_RE = re.compile(r"\b[A-Za-z_]\w{3,}\b")  # 4+ characters: never a string prefix like rb
_NUMBER_RE = re.compile(r"\b\d+\b")


def edit_copy(content: bytes, path: str, k: int) -> bytes:
    """Copy k of a document: an identifier used once renamed, a number changed, a comment line added."""
    text = content.decode("latin-1")  # round-trips any bytes (the edits are ASCII), whatever the encoding
    rng = random.Random(f"{path}#{k}")
    counts = Counter(_IDENT_RE.findall(text))
    if rare := sorted(n for n, c in counts.items() if c == 1 and not keyword.iskeyword(n)):
        name = rng.choice(rare)
        text = re.sub(rf"\b{name}\b", f"{name}_v{k}", text)
    if numbers := list(_NUMBER_RE.finditer(text)):
        m = rng.choice(numbers)
        text = text[: m.start()] + str(int(m.group()) + k) + text[m.end() :]
    lines = text.split("\n")
    i = rng.randrange(len(lines) + 1)
    while i > 0 and lines[i - 1].endswith("\\"):  # a comment may not follow a line continuation
        i -= 1
    lines.insert(i, f"# benchmark copy {k}")
    return "\n".join(lines).encode("latin-1")


def ten_times(records: list[dict]) -> list[dict]:
    copies = [
        {"path": f"copy{k}/{r['path']}", "content": edit_copy(r["content"], r["path"], k)}
        for k in range(1, 10)
        for r in records
    ]
    return sorted(records + copies, key=lambda r: r["path"])


def copy_similarity(records: list[dict], shingle_size: int) -> tuple[float, float]:
    """(median exact word-shingle Jaccard of copy vs original, share >= 0.85), every 10th document."""
    by_path = {r["path"]: r["content"] for r in records}
    scores = []
    for path in sorted(p for p in by_path if not p.startswith("copy"))[::10]:
        original = set(shingle_hashes(by_path[path].decode("utf-8", "replace"), shingle_size).tolist())
        for k in range(1, 10):
            copy = set(
                shingle_hashes(by_path[f"copy{k}/{path}"].decode("utf-8", "replace"), shingle_size).tolist()
            )
            scores.append(len(original & copy) / len(original | copy))
    return statistics.median(scores), sum(s >= 0.85 for s in scores) / len(scores)


def timed(fn, repeats: int):
    """(median seconds over repeats, result of the last call)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def time_steps(records: list[dict], rules, repeats: int, tmp: Path) -> tuple[dict[str, float], dict]:
    nd, times = rules.near_dedupe, {}
    times["decode"], texts = timed(lambda: [decode_document(r["content"])[0] for r in records], repeats)
    decoded = [(r["path"], t) for r, t in zip(records, texts, strict=True) if t is not None]
    times["scrub"], scrubbed = timed(lambda: [(p, scrub_text(t)[0]) for p, t in decoded], repeats)
    times["filters"], passed = timed(
        lambda: [(p, t) for p, t in scrubbed if not failing_filters(p, t, rules)], repeats
    )

    def exact_dedupe():
        first_with, unique, originals = {}, [], set()
        for p, t in passed:
            data = t.encode("utf-8")
            sha = hashlib.sha256(data).hexdigest()
            original = first_with.setdefault(sha, p)
            if original == p:
                unique.append({"path": p, "text": t, "sha256": sha, "n_bytes": len(data)})
            else:
                originals.add(original)
        return unique, originals

    times["exact dedupe (sha256)"], (unique, exact_originals) = timed(exact_dedupe, repeats)
    sign = lambda: {p: signature(t, nd.num_perm, nd.shingle_size) for p, t in passed}  # noqa: E731
    times["near: signatures"], sigs = timed(sign, repeats)  # curate signs all that pass, before exact dedupe

    def lsh_pass():
        near = NearDuplicates(nd.threshold, nd.num_perm)
        return [d for d in unique if near.offer(d["path"], sigs[d["path"]]) is None], near.clusters

    times["near: LSH pass"], (kept, near_clusters) = timed(lsh_pass, repeats)
    kept_texts, n = [d["text"] for d in kept], len(records)
    times["profile"], _ = timed(lambda: gate.merge_profiles([gate.text_profile(kept_texts)]), repeats)

    def suite():  # as curate.run does it; an expectation belongs to one suite: fresh ones each run
        frame = gate.gate_frame(kept)
        return gate.run_suite(frame, gate.gate_expectations(rules, n, frame["source"].nunique()), tmp)

    times["GE suite"], _ = timed(suite, repeats)
    clusters = exact_originals | set(near_clusters)  # kept path -> its copies, as curate counts them
    return times, (len(records), len(kept), len(passed) - len(unique), len(unique) - len(kept), len(clusters))


def cold_curate(params) -> dict:
    """curate.run analysing every shard, as a first run does: the last run's analysis removed."""
    shutil.rmtree(curate.analysis_cache(params).folder, ignore_errors=True)
    return curate.run(params)


def time_end_to_end(records: list[dict], repeats: int, tmp: Path) -> tuple[dict, dict]:
    write_documents(records, tmp / "data.raw_dir")
    keys = (
        "data.raw_dir",
        "data.curated_dir",
        "data.quarantine_dir",
        "data.inputs_dir",
        "curate.reports_dir",
    )
    times, timings = {}, {}
    for workers in (2, 1):
        params = load_params(PARAMS_PATH, [f"{k}={tmp / k}" for k in keys] + [f"curate.workers={workers}"])
        # the drift reference, as the inputs stage records it before curate runs
        reference = inputs.champion_reference(params)[0]
        write_json(Path(params.data.inputs_dir) / inputs.CHAMPION_FILE, reference)
        step = f"END TO END curate.run, workers={workers}"
        times[step], timings[step] = timed(lambda p=params: cold_curate(p)["timings"], repeats)
    return times, timings


def time_as_users_run_it(repeats: int, baseline: str | None) -> None:
    """`dvc repro -f -s curate` in project copies against `xz -1 -T1` over the raw bytes, in turns."""

    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-dvc-"))
    try:
        variants = {"this tree": None} | ({f"baseline {baseline}": baseline} if baseline else {})
        projects = {}
        for name, rev in variants.items():
            proj = copy_project(tmp / name.replace(" ", "-"), rev, [])
            env = project_env(proj)
            for cmd in (["repro", "ingest"], ["repro", "-f", "-s", "curate"]):  # inputs, ingest; a warm-up
                subprocess.run([str(BIN / "dvc"), *cmd], cwd=proj, env=env, check=True, capture_output=True)
            projects[name] = (proj, env)
        raw = tmp / "raw.bin"  # the documents' bytes, as curate reads them
        with raw.open("wb") as out:
            for row in iter_documents(proj / "data/raw", columns=["content"]):
                out.write(row["content"])
        commands = {"xz -1 -T1": (["xz", "-1", "-T1", "-c", str(raw)], tmp, None)}
        for name, (proj, env) in projects.items():
            commands[f"dvc repro -f -s curate, {name}"] = (
                [str(BIN / "dvc"), "repro", "-f", "-s", "curate"],
                proj,
                env,
            )
        times = {name: [] for name in commands}
        for i in range(repeats):
            for name, (cmd, cwd, env) in commands.items():
                # a forced curate analyses every shard, as a first run does: no analysis kept from the last
                shutil.rmtree(cwd / "data" / "curated.cache", ignore_errors=True)
                start = time.perf_counter()
                subprocess.run(
                    cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                times[name].append(time.perf_counter() - start)
            print(
                f"round {i + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                file=sys.stderr,
            )
        xz = statistics.median(times["xz -1 -T1"])
        print(f"\nThe data gate as users run it, against xz over the same {raw.stat().st_size / 1e6:.1f} MB")
        print(f"(median of {repeats}, taking turns; load average {os.getloadavg()[0]:.1f} at the end):\n")
        print("| command | median s | runs (s) | / xz |\n|---|---|---|---|")
        for name, runs in times.items():
            median = statistics.median(runs)
            print(f"| {name} | {median:.2f} | {', '.join(f'{t:.2f}' for t in runs)} | {median / xz:.1f}x |")
        ratio = statistics.median(times["dvc repro -f -s curate, this tree"]) / xz
        print(
            f"\ntarget: dvc repro -f -s curate <= 10x xz -1 -T1: {ratio:.1f}x {'PASS' if ratio <= 10 else 'FAIL'}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repeats on the default corpus (median)")
    parser.add_argument("--repeats-10x", type=int, default=1, help="repeats on the ten-times corpus")
    parser.add_argument("--skip-10x", action="store_true", help="only the default corpus")
    parser.add_argument("--steps-only", action="store_true", help="skip the end-to-end curate.run")
    parser.add_argument(
        "--as-users-run-it", action="store_true", help="only `dvc repro -f -s curate` against xz, in turns"
    )
    parser.add_argument("--baseline", metavar="REV", help="with --as-users-run-it: also commit REV's project")
    args = parser.parse_args()
    rules = load_params(PARAMS_PATH).curate
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    if args.as_users_run_it:
        return time_as_users_run_it(args.repeats, args.baseline)
    import great_expectations  # noqa: F401 -- its import is not the GE suite's time

    base = collect_documents("python-stdlib")
    corpora = {"default": (base, args.repeats)}
    if not args.skip_10x:
        corpora["10x"] = (ten_times(base), args.repeats_10x)
    results = {}
    with tempfile.TemporaryDirectory(prefix="curate-bench-mlflow-") as mlflow_tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{mlflow_tmp}/none.db"  # no file: drift not checked
        for name, (records, repeats) in corpora.items():
            print(f"timing {name}: {len(records)} documents, median of {repeats} ...", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
                times, counts = time_steps(records, rules, repeats, Path(tmp) / "steps")
                e2e, timings = ({}, {}) if args.steps_only else time_end_to_end(records, repeats, Path(tmp))
            mb = sum(len(r["content"]) for r in records) / 1e6
            results[name] = (mb, times | e2e, timings, (f"{mb:.1f}", *counts, f"{repeats} run(s)"))
    print_report(results)
    if not args.skip_10x:
        median, share = copy_similarity(corpora["10x"][0], rules.near_dedupe.shingle_size)
        print(
            f"10x copies vs originals (every 10th doc): median 5-gram Jaccard {median:.3f}, {share:.0%} >= 0.85"
        )


def print_report(results: dict) -> None:
    (mb, times, _, _), big = results["default"], results.get("10x")
    header = ["step", "default s", "default MB/s"] + (["10x s", "10x MB/s", "10x / default"] if big else [])
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for step, s in times.items():
        cells = [step, f"{s:.2f}", f"{mb / s:.1f}"]
        if big:
            cells += [f"{big[1][step]:.2f}", f"{big[0] / big[1][step]:.1f}", f"{big[1][step] / s:.1f}x"]
        print("| " + " | ".join(cells) + " |")
    header = ["corpus", "MB in", "docs in", "kept", "exact dupes", "near dupes", "clusters", "median of"]
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for name, (*_, row) in results.items():
        print(f"| {name} | " + " | ".join(map(str, row)) + " |")
    for name, (_, _, timings, _) in results.items():
        for step, figures in timings.items():
            print(f"{name}, {step}: curate's own timings, last run: {figures}")
    step = "END TO END curate.run, workers=2"
    if step in times:
        s = times[step]
        print(f"\ntarget: default corpus end to end <= 15 s: {s:.2f} s {'PASS' if s <= 15 else 'FAIL'}")
        if big:
            r = big[1][step] / s
            print(f"target: 10x corpus end to end <= 10x default: {r:.1f}x {'PASS' if r <= 10 else 'FAIL'}")


if __name__ == "__main__":
    main()
