"""A corrective fine-tune from the champion against a full retrain, side by side, on the default job
with a planted secret.

    .venv/bin/python benchmarks/finetune_bench.py [--planted 400] [--quick] [--keep DIR]

In a temporary copy of the project (its own MLflow database, DVC cache and Prefect home):
1. the corpus: the standard library's .py files (what `python-stdlib` ingests), copied into a
   folder, plus `--planted` modules: each a slice of a stdlib module with one line
   `CORP_TOKEN = "corp_live_<24 characters>"` in it, the same secret in all of them. No built-in
   scrub rule knows the format, so it reaches the curated data;
2. the champion: `trainpipe run` on that folder (drift off: it is not the stdlib alone). It is
   trained with the secret;
3. the fix: `curate.scrub_patterns={"corp_token": ...}`, then, one after the other on the same
   cleaned data, `trainpipe finetune` (from the champion) and `trainpipe run` (a full retrain).

It prints, for the champion, the fine-tune and the retrain: held-out bits per byte overall and per
slice, the memorization count (scrubbed spans whose removed text the model completes greedily
from its context), and device-seconds from the cost ledger (the train stage's, and the whole
run's). The fine-tune's curate run includes the re-curation the fix needs; the retrain's finds it
cached, so the train stage's seconds are the fair comparison. --quick runs a tiny model on a
slice of the corpus, to check the benchmark itself.
"""

import argparse
import ast
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.project_copy import BIN, copy_project, project_env  # noqa: E402

SECRET = "corp_live_" + "".join(random.Random(7).choices(string.ascii_letters + string.digits, k=24))
PATTERN = '{"corp_token": "corp_live_[A-Za-z0-9]{24}"}'
MODEL = "finetune-bench"
QUICK = [
    "data.max_documents=400",
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=100000",
    "tokenize.vocab_size=512",
    "train.max_steps=200",
    "train.batch_size=8",
    "train.block_size=128",
    "train.n_layer=2",
    "train.n_head=2",
    "train.n_embd=64",
    "train.compile=off",
    "finetune.max_steps=50",
    "evaluate.max_tokens=40000",
]


def build_corpus(folder: Path, planted: int) -> int:
    """The stdlib's .py files under folder/stdlib, and planted modules under folder/planted (each
    two stdlib functions or classes, so few are near-duplicates, with the secret assigned between
    them). The number of files written."""
    from pipelines.stages.ingest import STDLIB, resolve_source

    root, files, *_ = resolve_source(STDLIB, ["**/*.py"], [])
    for file in files:
        dest = folder / "stdlib" / file.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
    rng = random.Random(0)
    sources = sorted(f for f in files if f.stat().st_size > 4000)
    (folder / "planted").mkdir(parents=True)
    for i in range(planted):
        (folder / "planted" / f"service_{i:04d}.py").write_text(planted_module(rng, sources, SECRET))
    return len(files) + planted


def planted_module(rng: random.Random, sources: list, secret: str) -> str:
    """Valid Python: two top-level functions or classes of stdlib modules, with the secret
    assigned between them (a slice of lines would not parse, and curate drops what does not)."""
    parts = []
    while len(parts) < 2:
        text = sources[rng.randrange(len(sources))].read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        segments = [s for s in (ast.get_source_segment(text, n) for n in nodes) if s and 200 < len(s) < 3000]
        if segments:
            parts.append(segments[rng.randrange(len(segments))])
    return f'{parts[0]}\n\n\nCORP_TOKEN = "{secret}"\n\n\n{parts[1]}\n'


def trainpipe(proj: Path, env: dict, *args: str) -> float:
    started = time.perf_counter()
    run = subprocess.run([str(BIN / "trainpipe"), *args], cwd=proj, env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"trainpipe {' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def figures(proj: Path, env: dict, version: str) -> dict:
    """A registered version's scores and costs, as MLflow and its evaluate reports hold them."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = client.get_model_version(MODEL, version)
    metrics = client.get_run(found.run_id).data.metrics
    return {
        "version": version,
        "kind": found.tags.get("kind", "train"),
        "bpb": metrics.get("val_bits_per_byte"),
        "slices": {
            k.removeprefix("val_bpb_slice_"): v for k, v in metrics.items() if k.startswith("val_bpb_slice_")
        },
        "memorized": metrics.get("memorized_secrets"),
        "train_device_s": metrics.get("cost.train.device_s"),
        "run_device_s": metrics.get("cost.device_s"),
        "champion_after": client.get_model_version_by_alias(MODEL, "champion").version,
    }


CHECK_PARENT = """
import json
from pipelines.core.model_dir import load_model_dir
from pipelines.core.params import load_params
from pipelines.stages.evaluate import check_memorization
params = load_params("params.yaml")
model, tokenizer = load_model_dir(params.finetune.parent_dir)
print(json.dumps(check_memorization(params, model, tokenizer)["memorized_secrets"]))
"""


def champion_memorization(proj: Path, env: dict) -> int | None:
    """The champion's memorization count on the cleaned data's scrubbed spans: evaluate's check on
    the fine-tune's parent (data/parent holds the champion's weights)."""
    run = subprocess.run(
        [str(BIN / "python"), "-c", CHECK_PARENT], cwd=proj, env=env, capture_output=True, text=True
    )
    if run.returncode:
        print(f"(the champion's memorization count could not be measured: {run.stderr.strip()[-300:]})")
        return None
    return int(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", type=int, default=400, help="modules holding the secret (default 400)")
    parser.add_argument("--quick", action="store_true", help="a tiny model on a slice of the corpus")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="trainpipe-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    n_files = build_corpus(corpus, args.planted)
    overrides = [
        f"data.source={corpus}",
        'data.include=["**/*.py"]',
        "curate.gate.drift.enabled=false",
        f"publish.model_name={MODEL}",
        *(QUICK if args.quick else []),
    ]
    proj = copy_project(work / "proj", None, overrides)
    env = project_env(proj)
    print(f"corpus: {n_files} files ({args.planted} with the secret) in {corpus}; project in {proj}")
    wall = {"champion": trainpipe(proj, env, "run")}
    print(f"champion trained in {wall['champion']:.0f} s")
    fix = f"curate.scrub_patterns={PATTERN}"
    wall["finetune"] = trainpipe(proj, env, "finetune", "-S", fix)
    parent_memorized = champion_memorization(proj, env)
    wall["retrain"] = trainpipe(proj, env, "run", "-S", fix)
    rows = {
        name: figures(proj, env, v) for name, v in (("champion", "1"), ("finetune", "2"), ("retrain", "3"))
    }
    rows["champion"]["memorized"] = parent_memorized  # on the cleaned data's spans, as the others
    for name, row in rows.items():
        row["wall_s"] = wall[name]
    print_table(rows)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: dict) -> None:
    slices = sorted({s for row in rows.values() for s in row["slices"]})
    head = ["", "bpb", *(f"bpb {s}" for s in slices), "memorized", "train device-s", "run device-s", "wall s"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [
            f"{r['bpb']:.4f}",
            *(f"{r['slices'].get(s, float('nan')):.4f}" for s in slices),
            "-" if r["memorized"] is None else str(int(r["memorized"])),
            f"{r['train_device_s']:.0f}",
            f"{r['run_device_s']:.0f}",
            f"{r['wall_s']:.0f}",
        ]
        print(f"| {name} (v{r['version']}) | " + " | ".join(cells) + " |")
    ft, rt = rows["finetune"], rows["retrain"]
    print(
        f"\nfine-tune - retrain: {ft['bpb'] - rt['bpb']:+.4f} bpb (goal within 0.02); fine-tune's train "
        f"stage {ft['train_device_s'] / rt['train_device_s']:.0%} of the retrain's device-seconds "
        f"(goal at most 25%), whole run {ft['run_device_s'] / rt['run_device_s']:.0%}; champion after "
        f"all three: v{rt['champion_after']}"
    )


if __name__ == "__main__":
    main()
