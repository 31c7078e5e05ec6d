"""The GPU path, measured in one run (benchmarks/gpu_check.sh runs this):

1. the device's bf16 matmul peak (large square matmuls, as train_bench.py);
2. training tokens/s of the GPU profile below, and its MFU against that peak;
3. held-out bits per byte after a fixed training budget (default 10 minutes): the steps that
   fit the budget at the measured speed, trained and scored by the train stage's own code on
   this workspace's data/tokens (`dvc repro tokenize` first).

Without CUDA it runs its CPU fallback: a tiny profile and a budget of seconds, so that the
script runs in `make test` and cannot rot. Extra -S overrides apply on top of the profile.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.ablation import tracking_in, train_and_score
from benchmarks.train_bench import Setting, matmul_peak
from pipelines.core.data import read_json
from pipelines.core.params import load_params

# One large GPU (sized for an H200, 141 GB): a 12 x 768 model over 1024-token contexts, 64
# sequences a step, bf16 autocast, torch.compile, and flash attention (SDPA picks it for bf16
# and a head size of 128). Also the documented set of -S overrides in the README.
GPU_PROFILE = [
    "train.device=cuda",
    "train.bf16=on",
    "train.compile=on",
    "train.n_layer=12",
    "train.n_head=6",
    "train.n_embd=768",
    "train.block_size=1024",
    "train.batch_size=64",
    "train.checkpoint_every=1000",
]
CPU_FALLBACK = [
    "train.device=cpu",
    "train.compile=off",
    "train.n_layer=1",
    "train.n_head=2",
    "train.n_embd=32",
    "train.block_size=32",
    "train.batch_size=4",
    "train.warmup_steps=2",
]


def flash_attention_runs(model, x, y) -> bool:
    """Whether the model's attention runs on the flash SDPA kernel alone (bf16, this head size):
    with only that backend allowed, PyTorch raises instead of falling back to another."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, y)
        return True
    except RuntimeError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-s", type=float, default=None, help="training budget (default 600 on CUDA, 20 on CPU)"
    )
    parser.add_argument(
        "-S", "--set", action="append", default=[], help="a params override on top of the profile"
    )
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    budget = args.budget_s or (600.0 if gpu else 20.0)
    overrides = (GPU_PROFILE if gpu else CPU_FALLBACK) + args.set
    params = load_params(overrides=overrides)
    cfg, meta = params.train, Path(params.data.tokens_dir) / "meta.json"
    if not meta.exists():
        raise SystemExit(
            f"gpu_check: no {meta}: run `dvc repro tokenize` first (it trains on this workspace's data)"
        )
    vocab = read_json(meta)["vocab_size"]
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(
            f"no CUDA device: the CPU fallback (tiny profile, {budget:.0f} s budget), torch {torch.__version__}"
        )
    peak = matmul_peak(torch.bfloat16, device, sizes=(4096, 8192) if gpu else (256, 512))

    setting = Setting(
        "profile", cfg, device, bf16=cfg.bf16 != "off", compile=cfg.compile == "on", vocab=vocab
    )
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    start = time.perf_counter()
    setting.time(x, y, 3)  # warm-up, and compiling
    warmup_s = time.perf_counter() - start
    step_s = statistics.median(setting.time(x, y, 5) for _ in range(3))
    tokens_per_s = cfg.batch_size * cfg.block_size / step_s
    mfu = tokens_per_s * setting.model.flops_per_token() / 1e9 / peak
    steps = max(1, int(budget / step_s))
    flash = flash_attention_runs(setting.model, x, y) if gpu else None

    with tracking_in() as work:
        # no MLflow: a GPU machine need not carry it for a benchmark
        result = train_and_score(overrides + [f"train.max_steps={steps}"], work, track=False)
    print(f"{'bf16 matmul peak':<28} {peak:>10,.0f} GFLOP/s")
    print(f"{'model':<28} {setting.model.num_params() / 1e6:>10.1f} M params, {cfg.n_layer} x {cfg.n_embd}")
    print(f"{'warm-up (and compile)':<28} {warmup_s:>10.1f} s")
    print(f"{'training':<28} {tokens_per_s:>10,.0f} tokens/s")
    print(f"{'MFU (of the measured peak)':<28} {mfu:>10.1%}")
    if flash is not None:
        print(f"{'flash SDPA':<28} {'runs' if flash else 'refused: another SDPA kernel ran':>10}")
    print(f"{'budget':<28} {budget:>10.0f} s = {steps} steps of {cfg.batch_size} x {cfg.block_size}")
    print(f"{'trained in':<28} {result['train_seconds']:>10.1f} s ({result['tokens_per_s']:,.0f} tokens/s)")
    print(f"{'held-out bits per byte':<28} {result['val_bits_per_byte']:>10.4f}")


if __name__ == "__main__":
    main()
