"""Throughput of each curate step, and of the whole stage, on the default corpus and on ten times it.

    .venv/bin/python benchmarks/curate_bench.py [--repeats 3] [--repeats-10x 1] [--skip-10x] [--steps-only]

Corpus (a) is the Python standard library as ingest collects it; corpus (b) is (a) plus nine
edited copies of each document (path prefix copyK/, one rare identifier renamed, one number
changed, one comment line inserted): near-duplicates, not exact ones, so near dedupe has work.
Each step runs single-process over the whole corpus; MB/s is raw input bytes over the step's
median time. End to end is `curate.run` (parquet in, gate, parquet out) in a temp folder,
in-process with imports warm, with curate.workers=2 and =1, and no registry to consult.
"""

import argparse
import hashlib
import keyword
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pipelines import curate, gate
from pipelines.data import write_documents
from pipelines.dedupe import NearDuplicates, shingles, signature
from pipelines.errors import GateError
from pipelines.ingest import collect_documents
from pipelines.params import load_params
from pipelines.quality import decode_document, failing_filters
from pipelines.scrub import scrub_text

PARAMS_PATH = Path(__file__).resolve().parents[1] / "params.yaml"
_IDENT_RE = re.compile(r"\b[A-Za-z_]\w{3,}\b")  # 4+ characters: never a string prefix like rb
_NUMBER_RE = re.compile(r"\b\d+\b")


def edit_copy(content: bytes, path: str, k: int) -> bytes:
    """Copy k of a document: one rare identifier renamed, one number changed, one comment line added."""
    encoding = "utf-8"
    try:
        text = content.decode(encoding)
    except UnicodeDecodeError:
        encoding = "latin-1"  # round-trips any bytes; the edits are ASCII
        text = content.decode(encoding)
    rng = random.Random(f"{path}#{k}")
    counts = Counter(_IDENT_RE.findall(text))
    rare = sorted(n for n, c in counts.items() if c <= 3 and not keyword.iskeyword(n))
    if rare:
        name = rng.choice(rare)
        text = re.sub(rf"\b{name}\b", f"{name}_v{k}", text)
    numbers = list(_NUMBER_RE.finditer(text))
    if numbers:
        m = rng.choice(numbers)
        text = text[: m.start()] + str(int(m.group()) + k) + text[m.end() :]
    lines = text.split("\n")
    i = rng.randrange(len(lines) + 1)
    while i > 0 and lines[i - 1].endswith("\\"):  # a comment may not follow a line continuation
        i -= 1
    lines.insert(i, f"# benchmark copy {k}")
    return "\n".join(lines).encode(encoding)


def ten_times(records: list[dict]) -> list[dict]:
    copies = [
        {"path": f"copy{k}/{r['path']}", "content": edit_copy(r["content"], r["path"], k)}
        for r in records
        for k in range(1, 10)
    ]
    return sorted(records + copies, key=lambda r: r["path"])


def copy_similarity(records: list[dict], shingle_size: int) -> tuple[float, float]:
    """(median exact word-shingle Jaccard of copy vs original, share >= 0.85), every 10th document."""
    by_path = {r["path"]: r["content"] for r in records}
    scores = []
    for path in sorted(p for p in by_path if not p.startswith("copy"))[::10]:
        original = shingles(by_path[path].decode("utf-8", "replace"), shingle_size)
        for k in range(1, 10):
            copy = shingles(by_path[f"copy{k}/{path}"].decode("utf-8", "replace"), shingle_size)
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
    """Each per-document and corpus step of curate_documents, profile and gate, one process, in order."""
    nd = rules.near_dedupe
    times: dict[str, float] = {}
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
    # curate signs every document that passed the filters, before exact dedupe
    times["near: signatures"], sigs = timed(
        lambda: {p: signature(t, nd.num_perm, nd.shingle_size) for p, t in passed}, repeats
    )

    def lsh_pass():
        near = NearDuplicates(nd.threshold, nd.num_perm)
        return [d for d in unique if near.offer(d["path"], sigs[d["path"]]) is None], near.clusters

    times["near: LSH pass"], (kept, near_clusters) = timed(lsh_pass, repeats)
    times["profile"], _ = timed(
        lambda: gate.merge_profiles([gate.text_profile([d["text"] for d in kept])]), repeats
    )
    expectations = gate.gate_expectations(rules, len(records))
    times["GE suite"], _ = timed(lambda: gate.run_suite(gate.gate_frame(kept), expectations, tmp), repeats)
    counts = {
        "docs in": len(records),
        "kept": len(kept),
        "exact dupes": len(passed) - len(unique),
        "near dupes": len(unique) - len(kept),
        "clusters": len(exact_originals | set(near_clusters)),  # as curate counts them
    }
    return times, counts


def time_end_to_end(records: list[dict], repeats: int, tmp: Path) -> dict[str, tuple[float, dict]]:
    raw_dir = tmp / "raw"
    write_documents(records, raw_dir)
    out = {}
    for workers in (2, 1):
        overrides = [
            f"data.raw_dir={raw_dir}",
            f"data.curated_dir={tmp / 'curated'}",
            f"data.quarantine_dir={tmp / 'quarantine'}",
            f"curate.reports_dir={tmp / 'reports'}",
            f"curate.workers={workers}",
        ]
        params = load_params(PARAMS_PATH, overrides)

        def run_stage(params=params):
            try:
                return curate.run(params)["timings"]
            except GateError as exc:
                print(f"  (gate failed, timing kept: {exc})")
                return {}

        out[f"curate.run, workers={workers}"] = timed(run_stage, repeats)
    return out


def bench_corpus(records: list[dict], rules, repeats: int, steps_only: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        times, counts = time_steps(records, rules, repeats, Path(tmp) / "steps")
        e2e = {} if steps_only else time_end_to_end(records, repeats, Path(tmp))
    return {"mb": sum(len(r["content"]) for r in records) / 1e6, "times": times, "e2e": e2e, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repeats on the default corpus (median)")
    parser.add_argument("--repeats-10x", type=int, default=1, help="repeats on the ten-times corpus")
    parser.add_argument("--skip-10x", action="store_true", help="only the default corpus")
    parser.add_argument("--steps-only", action="store_true", help="skip the end-to end curate.run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="curate-bench-mlflow-") as mlflow_tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{mlflow_tmp}/none.db"  # absent: drift not checked
        run_benchmarks(args)


def run_benchmarks(args) -> None:
    rules = load_params(PARAMS_PATH).curate
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    import great_expectations  # noqa: F401 -- import time is not the GE suite's time

    base = collect_documents("python-stdlib")
    corpora = {"default": (base, args.repeats)}
    if not args.skip_10x:
        corpora["10x"] = (ten_times(base), args.repeats_10x)
    results, sims = {}, {}
    for name, (records, repeats) in corpora.items():
        print(
            f"{name}: {len(records)} documents, {sum(len(r['content']) for r in records) / 1e6:.1f} MB, median of {repeats} repeat(s) ...",
            file=sys.stderr,
        )
        results[name] = bench_corpus(records, rules, repeats, args.steps_only)
        if name == "10x":
            sims[name] = copy_similarity(records, rules.near_dedupe.shingle_size)

    names = list(results)
    print(
        "\n| step | "
        + " | ".join(f"{n} s | {n} MB/s" for n in names)
        + (" | 10x/default time |" if len(names) > 1 else " |")
    )
    print("|---" * (1 + 2 * len(names) + (len(names) > 1)) + "|")
    default = results["default"]
    for step in [*default["times"], *default["e2e"]]:
        cells = []
        for n in names:
            s = results[n]["times"].get(step) or results[n]["e2e"][step][0]
            cells.append(f"{s:.2f} | {results[n]['mb'] / s:.1f}")
        ratio = ""
        if len(names) > 1:
            s0 = default["times"].get(step) or default["e2e"][step][0]
            s1 = results["10x"]["times"].get(step) or results["10x"]["e2e"][step][0]
            ratio = f" | {s1 / s0:.1f}x"
        print(f"| {step} | " + " | ".join(cells) + ratio + " |")

    print("\n| corpus | MB in | docs in | kept | exact dupes | near dupes | clusters | repeats |")
    print("|---" * 8 + "|")
    for n in names:
        c, r = results[n]["counts"], corpora[n][1]
        print(f"| {n} | {results[n]['mb']:.1f} | " + " | ".join(str(v) for v in c.values()) + f" | {r} |")
    for n, (median, share) in sims.items():
        print(
            f"\n{n} copies vs originals (every 10th document): median word-5-gram Jaccard {median:.3f}, {share:.0%} >= 0.85"
        )

    if default["e2e"]:
        for name, (s, timings) in default["e2e"].items():
            print(f"default {name}: {s:.2f} s; curate's own timings of the last run: {timings}")
        e2e_default = default["e2e"]["curate.run, workers=2"][0]
        ok = "PASS" if e2e_default <= 15 else "FAIL"
        print(f"\ntarget: default corpus end to end (workers=2) <= 15 s: {e2e_default:.2f} s {ok}")
        if "10x" in results:
            e2e_10x = results["10x"]["e2e"]["curate.run, workers=2"][0]
            ratio = e2e_10x / e2e_default
            ok = "PASS" if ratio <= 10 else "FAIL"
            print(f"target: 10x corpus <= 10x the default's time: {e2e_10x:.2f} s = {ratio:.1f}x {ok}")


if __name__ == "__main__":
    main()
