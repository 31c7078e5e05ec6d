"""The training recipe's ablation: each row trains on this workspace's data/tokens with the train
stage's own code and scores the held-out split as the evaluate stage does.

    .venv/bin/python benchmarks/ablation.py                       # the rows below, in order
    .venv/bin/python benchmarks/ablation.py --rows baseline,rope  # some of them
    .venv/bin/python benchmarks/ablation.py --seeds 1337,7 --rows untied   # every change, two seeds

Needs data/tokens and data/curated (`dvc repro tokenize`). A row's overrides apply on top of
params.yaml's *old* recipe (BASELINE below) and of the rows before it, so each row adds one
change. Prints held-out bits per byte and training seconds; results also go to --out as JSON.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.core.environ import environ_set

# The recipe before issue 11: GPT-2's architecture, AdamW, 800 steps of 16 x 256 tokens.
BASELINE = [
    "train.positions=learned",
    "train.norm=layernorm",
    "train.mlp=gelu",
    "train.mlp_ratio=4",
    "train.tie_head=true",
    "train.qk_norm=false",
    "train.optimizer=adamw",
    "train.muon_lr=0.02",  # what the "muon" row trained with before the default became 0.003
    "train.lr=0.003",
    "train.min_lr=0.0003",
    "train.warmup_steps=50",
    "train.max_steps=800",
    "train.batch_size=16",
    "train.block_size=256",
    "train.n_layer=4",
    "train.n_head=4",
    "train.n_embd=192",
]
# name -> the overrides it adds to the rows before it
ROWS = {
    "baseline": [],
    "rope": ["train.positions=rope"],
    "rmsnorm": ["train.norm=rmsnorm"],
    "muon": ["train.optimizer=muon"],
    "relu2": ["train.mlp=relu2"],
    "untied": ["train.tie_head=false"],
}


@contextmanager
def tracking_in() -> Iterator[Path]:
    """A temporary folder whose own MLflow database takes the runs' logs, not the project's."""
    with tempfile.TemporaryDirectory() as tmp:
        with environ_set({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_RUN_ID": None}):
            yield Path(tmp)


def train_and_score(overrides: list[str], work: Path, track: bool = True) -> dict:
    """Train with the train stage's code into work/, then score the held-out split on the
    device it trained on (the evaluate stage's code; its score, on its device's precision)."""
    from pipelines.core.model_dir import load_model_dir
    from pipelines.core.params import load_params
    from pipelines.stages.device import pick_device, use_bf16
    from pipelines.stages.evaluate import score_texts, validation_texts
    from pipelines.stages.train import train_model

    params = load_params(
        overrides=overrides + [f"train.model_dir={work}/models", f"train.checkpoint_dir={work}/ckpt"]
    )
    summary = train_model(params, log=lambda *_: None, track=track)
    device = pick_device(params.train.device)
    start = time.perf_counter()
    model, tokenizer = load_model_dir(work / "models", device)
    scored = score_texts(model, tokenizer, validation_texts(params), bf16=use_bf16(params.train.bf16, device))
    bpb = scored["nll_bits"] / scored["bytes"]
    return {
        "val_bits_per_byte": bpb,
        "train_seconds": summary["train_seconds"],
        "score_seconds": time.perf_counter() - start,
        "tokens_per_s": summary["tokens_per_s"],
        "num_params": summary["num_params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names, in order")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds; each row runs once per seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="an override for every row (a quick proxy: --set train.max_steps=200)",
    )
    parser.add_argument("--out", default="reports/ablation.json", help="results as JSON")
    args = parser.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = []
    with tracking_in() as tmp:
        overrides = list(BASELINE)
        print(f"{'row':<10} {'seed':>5} {'bpb':>7} {'train s':>8} {'tokens/s':>9} {'params':>8}", flush=True)
        for name in ROWS:  # rows build on each other in ROWS order
            overrides += ROWS[name]
            if name not in names:
                continue
            for seed in map(int, args.seeds.split(",")):
                work = tmp / f"{name}-{seed}"
                r = train_and_score(overrides + args.set + [f"train.seed={seed}"], work)
                results.append({"row": name, "seed": seed, "overrides": list(overrides), **r})
                print(
                    f"{name:<10} {seed:>5} {r['val_bits_per_byte']:>7.4f} {r['train_seconds']:>8.1f} "
                    f"{r['tokens_per_s']:>9,.0f} {r['num_params'] / 1e6:>7.2f}M",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r["val_bits_per_byte"])
    if any(len(v) > 1 for v in by_row.values()):
        for row, values in by_row.items():
            print(f"{row}: median {statistics.median(values):.4f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
