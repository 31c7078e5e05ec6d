"""What keeping freed memory (pipelines.stages.device.reuse_freed_memory) gains a training step, side by side.

    .venv/bin/python benchmarks/memory_bench.py [--pairs 5] [--steps 5] [--repeats 5]

The setting holds for a whole process, so one process cannot interleave it with glibc's default:
each pair runs the default step (params.yaml, as the train stage steps it: compiled where
train.compile resolves to it) in two fresh processes one after the other, glibc's default first,
and prints each one's median s/step, its peak RSS and the pair's ratio; the median ratio last.
"""

import argparse
import resource
import statistics
import subprocess
import sys

import torch

from pipelines.core.params import load_params
from pipelines.stages.device import pick_device, reuse_freed_memory, use_bf16, use_compile


def one_process(args) -> None:
    """Time the default step in this process and print "s/step peak_rss_mb"."""
    from train_bench import VOCAB, Setting  # beside this file

    cfg = load_params(overrides=args.set).train
    device = pick_device(cfg.device)
    if args.reuse:
        reuse_freed_memory(device)
    bf16 = use_bf16(cfg.bf16, device)
    setting = Setting("default", cfg, device, bf16=bf16, compile=use_compile(cfg.compile, device))
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    setting.time(x, y, 2)  # warm-up (and compiling)
    median = statistics.median(setting.time(x, y, args.steps) for _ in range(args.repeats))
    print(f"{median:.4f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="pairs of processes (default, reused)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per process (median reported)")
    parser.add_argument("-S", "--set", action="append", default=[], help="a params override, as trainpipe -S")
    parser.add_argument("--one", choices=["fresh", "reused"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        args.reuse = args.one == "reused"
        return one_process(args)

    def child(kind: str) -> tuple[float, float]:
        command = [sys.executable, __file__, "--one", kind, "--steps", str(args.steps)]
        command += ["--repeats", str(args.repeats)] + [f"--set={s}" for s in args.set]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
        return float(out[-2]), float(out[-1])

    print(
        f"default step, {args.steps} steps x {args.repeats} repeats per process, medians; {args.pairs} pairs"
    )
    print(f"{'pair':>4} {'glibc default s/step':>21} {'reused s/step':>14} {'ratio':>6} {'peak RSS MB':>15}")
    ratios = []
    for pair in range(1, args.pairs + 1):
        (fresh, fresh_rss), (reused, reused_rss) = child("fresh"), child("reused")
        ratios.append(fresh / reused)
        print(
            f"{pair:>4} {fresh:>21.3f} {reused:>14.3f} {ratios[-1]:>5.2f}x {fresh_rss:>7.0f}/{reused_rss:<7.0f}"
        )
    print(f"median ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
