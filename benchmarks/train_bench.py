"""Training throughput of the default model on this machine: fp32 against bf16 autocast.

    .venv/bin/python benchmarks/train_bench.py [--steps 20] [--repeats 3]

Times optimizer steps of the default config (params.yaml) on random tokens, after warm-up,
side by side in one run, and prints the median tokens/s and model FLOP/s of each setting.
FLOPs per token follow nanoGPT's estimate (6N + 12·L·H·Q·T).
"""

import argparse
import statistics
import time

import torch

from pipelines.model import GPT, GPTConfig
from pipelines.params import load_params
from pipelines.train import make_optimizer, pick_device


def time_steps(model, optimizer, x, y, steps: int, bf16: bool, device) -> float:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # sync point
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per setting (median reported)")
    args = parser.parse_args()
    cfg = load_params().train
    device = pick_device(cfg.device)
    model_cfg = GPTConfig(4096, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    tokens = cfg.batch_size * cfg.block_size * args.steps
    print(
        f"device {device.type}, {torch.get_num_threads()} threads, {model.num_params() / 1e6:.2f} M params, "
        f"batch {cfg.batch_size}x{cfg.block_size}, {args.steps} steps x {args.repeats} repeats"
    )
    print(f"{'setting':<8} {'tokens/s':>10} {'GFLOP/s':>9} {'s/step':>8}")
    for bf16 in (False, True):
        time_steps(model, optimizer, x, y, 3, bf16, device)  # warm-up
        times = [time_steps(model, optimizer, x, y, args.steps, bf16, device) for _ in range(args.repeats)]
        med = statistics.median(times)
        tok_s = tokens / med
        print(
            f"{'bf16' if bf16 else 'fp32':<8} {tok_s:>10,.0f} {tok_s * model.flops_per_token() / 1e9:>9.1f} "
            f"{med / args.steps:>8.3f}"
        )


if __name__ == "__main__":
    main()
