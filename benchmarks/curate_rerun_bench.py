"""What a re-run of curate costs after one source file changed, against a first run (no cache).

    .venv/bin/python benchmarks/curate_rerun_bench.py [--repeats 3] [--workers 2]

The default corpus (the standard library's .py files) copied to a temporary folder and ingested
as a folder source. Per repeat, in turns: curate with no data/curated.cache (a first run); curate
again with nothing changed; one file (json/decoder.py) edited, ingest, curate. `curate.run` in
this process, timed around the call; medians of the repeats in a table.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.core.data import write_json  # noqa: E402
from pipelines.core.params import load_params  # noqa: E402
from pipelines.core.shards import list_shards  # noqa: E402
from pipelines.stages import curate, ingest, inputs  # noqa: E402

EDITED = "json/decoder.py"


def timed_curate(params) -> tuple[float, int]:
    start = time.perf_counter()
    summary = curate.run(params)
    return time.perf_counter() - start, summary["timings"]["shards_reused"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three runs (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="curate.workers (default 2)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-rerun-bench-"))
    try:
        source = ingest.resolve_source(ingest.STDLIB)
        src = tmp / "src"
        for path in source.files:
            target = src / path.relative_to(source.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        params = load_params(
            tmp / "none.yaml",
            overrides=[
                f"data.source={src}",
                "data.include=['**/*.py']",
                "data.exclude=[]",
                f"curate.workers={args.workers}",
                *(f"data.{k}={tmp / k}" for k in ("raw_dir", "curated_dir", "quarantine_dir", "inputs_dir")),
                f"curate.reports_dir={tmp / 'reports'}",
            ],
        )
        write_json(Path(params.data.inputs_dir) / inputs.CHAMPION_FILE, inputs.champion_reference(params)[0])
        original = (src / EDITED).read_text()
        runs = {"first run (no cache)": [], "nothing changed": [], f"{EDITED} edited": []}
        for i in range(args.repeats):
            (src / EDITED).write_text(original)
            ingest.run(params)
            shards = len(list_shards(params.data.raw_dir))
            shutil.rmtree(curate.analysis_cache(params).folder, ignore_errors=True)
            runs["first run (no cache)"].append((*timed_curate(params), shards))
            runs["nothing changed"].append((*timed_curate(params), shards))
            (src / EDITED).write_text(original + f"\n\ndef edited_{i}():\n    return {i}\n")
            ingest.run(params)
            runs[f"{EDITED} edited"].append((*timed_curate(params), len(list_shards(params.data.raw_dir))))
            print(
                f"round {i + 1}: " + ", ".join(f"{name} {r[-1][0]:.1f} s" for name, r in runs.items()),
                file=sys.stderr,
            )
        print(
            f"\ncurate on the default corpus ({shards} raw shards), {args.workers} workers, medians of {args.repeats}:\n"
        )
        print("| run | curate s | shards analysed | shards reused |\n|---|---:|---:|---:|")
        for name, r in runs.items():
            seconds = statistics.median(t for t, _, _ in r)
            reused = statistics.median(n for _, n, _ in r)
            total = statistics.median(s for _, _, s in r)
            print(f"| {name} | {seconds:.1f} | {total - reused:.0f} | {reused:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
