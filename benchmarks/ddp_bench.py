"""Training throughput across processes on this machine: 1 process against 2 under torchrun.

    .venv/bin/python benchmarks/ddp_bench.py [--steps 10] [--repeats 3] [--bf16 auto|on|off]

Times optimizer steps of the default config (params.yaml) on random tokens, after warm-up, with the
training step of pipelines/stages/train.py (its batch slices, DDP's gradient all-reduce, the loss
all-reduce, clipping): one process with the machine's threads, one process with one thread, and
train.nproc_per_node processes (default 2) under torchrun with cores // N threads each, as
`trainpipe train -S train.nproc_per_node=N` runs them. Each run is a fresh process (group); the
settings take turns, run by run, so that other load on the machine falls on all of them alike.
Prints the median tokens/s and steps/s of each setting; start-up time is not counted.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

RESULT = "RESULT "  # rank 0's line on stdout that the parent reads


def worker(args) -> None:
    """One timed run, in this process or as one rank of a torchrun group."""
    import numpy as np
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pipelines.adapters.ranks import join_ranks, leave_ranks, mean_over_ranks
    from pipelines.core.model import GPT, GPTConfig
    from pipelines.core.optim import make_optimizer
    from pipelines.core.params import load_params
    from pipelines.stages.device import pick_device, use_bf16
    from pipelines.stages.train import check_gradients, get_batch

    cfg = load_params(overrides=[f"train.nproc_per_node={int(os.environ.get('WORLD_SIZE', '1'))}"]).train
    rank, world, device = join_ranks(cfg, pick_device(cfg.device))
    bf16 = use_bf16(args.bf16, device)
    data = np.random.default_rng(0).integers(0, 4096, 1_000_000, dtype=np.uint16)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(4096, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)).to(device)
    optimizer = make_optimizer(model, cfg, bf16)
    net = DistributedDataParallel(model) if world > 1 else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def steps(first: int, count: int) -> float:
        start = time.perf_counter()
        for step in range(first, first + count):
            x, y = get_batch(data, step, cfg.seed, cfg.batch_size, cfg.block_size, device, rank, world)
            with autocast:
                _, loss = net(x, y)
            mean_over_ranks(loss, world)  # sync point, as in training
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_gradients(model, cfg, step)
            optimizer.step()
        return time.perf_counter() - start

    steps(0, 2)  # warm-up
    seconds = steps(2, args.steps)
    if rank == 0:
        tokens = cfg.batch_size * cfg.block_size * args.steps
        result = {"tokens_per_s": tokens / seconds, "steps_per_s": args.steps / seconds, "bf16": bf16}
        result |= {"threads": torch.get_num_threads(), "params": model.num_params()}
        print(RESULT + json.dumps(result), flush=True)
    leave_ranks()


def one_run(nproc: int, threads: int | None, args) -> dict:
    """A fresh process (nproc 1) or torchrun group; rank 0's result."""
    from pipelines.adapters.ranks import threads_per_rank

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("OMP_NUM_THREADS", None)
    if threads or nproc > 1:
        env["OMP_NUM_THREADS"] = str(threads or threads_per_rank(nproc))
    script = [str(Path(__file__).resolve()), "--worker", f"--steps={args.steps}", f"--bf16={args.bf16}"]
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    )
    done = subprocess.run([sys.executable, *launcher, *script], env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode or not lines:
        sys.exit(f"ddp_bench: a run of {nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 of warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median reported)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the multi-process setting")
    parser.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="as train.bf16")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from pipelines.adapters.ranks import threads_per_rank
    from pipelines.core.params import load_params

    cores = threads_per_rank(1)
    settings = {
        f"1 process x {cores} threads": (1, None),
        "1 process x 1 thread": (1, 1),
        f"{args.nproc} processes x {threads_per_rank(args.nproc)} thread(s)": (args.nproc, None),
    }
    runs = {name: [] for name in settings}
    for _ in range(args.repeats):  # settings take turns: background load falls on all alike
        for name, (nproc, threads) in settings.items():
            runs[name].append(one_run(nproc, threads, args))
    cfg = load_params().train
    first = next(iter(runs.values()))[0]
    print(
        f"{cores} cores, {first['params'] / 1e6:.2f} M params, batch {cfg.batch_size}x{cfg.block_size} "
        f"(global), {'bf16' if first['bf16'] else 'fp32'}, {args.steps} steps x {args.repeats} runs per setting"
    )
    base = statistics.median(r["tokens_per_s"] for r in runs[next(iter(runs))])
    print(f"{'setting':<28} {'tokens/s':>10} {'steps/s':>8} {'vs first':>9}   runs (tokens/s)")
    for name, results in runs.items():
        tok_s = statistics.median(r["tokens_per_s"] for r in results)
        steps_s = statistics.median(r["steps_per_s"] for r in results)
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results)
        print(f"{name:<28} {tok_s:>10,.0f} {steps_s:>8.3f} {tok_s / base:>8.2f}x   {each}")


if __name__ == "__main__":
    main()
