"""Training throughput against this machine's own matmul peak, measured in one run.

    .venv/bin/python benchmarks/train_bench.py [--steps 10] [--repeats 3] [--compile] [--profile]

1. The peak: the best of several large square matmuls, bf16 and fp32, on this device now; the
   default's precision again before each repeat of step 2 (a shared host's speed moves).
2. Optimizer steps of the default config (params.yaml) on random tokens, one row per setting,
   the settings interleaved repeat by repeat so that a noisy neighbour slows them alike. Each row:
   median tokens/s, model FLOP/s (nanoGPT's 6N + 12·L·H·Q·T per token) and its share of the
   peak of the default's precision (bf16, or fp32 on a CPU without bf16 instructions, where the
   bf16 rows are left out), each repeat's steps against the peak measured just before them. "default" is exactly what the train stage runs (pipelines.stages.train),
   compiled where train.compile resolves to it (auto: CUDA, or a CPU where inductor builds), with
   "default, eager" beside it, and on a bf16 CPU "default, flash backward": compiled, with the
   flash kernel's own attention backward instead of pipelines.core.model.CausalAttentionCPU's; with
   the Muon default, "default with AdamW only" (eager) shows what Muon's orthogonalization costs
   a step (work the model-FLOPs count leaves out).
3. The ceiling: the step's own linear-layer matmuls alone (forward, and backward's two per
   layer), at the model's shapes (batch x block rows), in the default's precision, timed one by one. Even with every
   other op free of cost, a step could not beat their FLOP/s; against the peak it says how far
   the model's width lets it go on this CPU.
4. --profile: where a default step's time goes (torch.profiler), by kind of work.

--compile adds a torch.compile row where the default trains eager (train.compile off, or no C++ compiler).
Every row runs in the memory the train stage steps in (pipelines.stages.device.reuse_freed_memory: freed
memory kept for the next step); --fresh-memory leaves glibc's default, as before, for a side-by-side
run in a second process (the setting holds for a whole process, so one run cannot interleave both).
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pipelines.core.model import GPT
from pipelines.core.optim import make_optimizer
from pipelines.core.params import load_params
from pipelines.stages.device import (
    deterministic_kernels,
    pick_device,
    reuse_freed_memory,
    use_bf16,
    use_compile,
)
from pipelines.stages.train import model_config

PEAK_SIZES = (1024, 1536, 2048, 3072, 4096)  # 2048 alone measured 91 GFLOP/s on a day 1024 gave 189
VOCAB = 4096


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5, sizes=PEAK_SIZES) -> float:
    """The best GFLOP/s of an n x n by n x n matmul over a few large n."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            (a @ b).sum().item()  # .item(): wait for the device
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def linear_shapes(model: torch.nn.Module, rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul a training step runs in the model's linear layers: the forward
    x @ W.T, and backward's grad_x = grad_y @ W and grad_W = grad_y.T @ x. Attention's own
    batched matmuls (inside SDPA) are left out."""
    shapes = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            n_out, n_in = layer.weight.shape
            shapes += [(rows, n_in, n_out), (rows, n_out, n_in), (n_out, rows, n_in)]
    return shapes


def matmul_ceiling(shapes, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of the given matmuls run one after another in dtype: total FLOPs over the sum of
    each shape's best time."""
    flops, seconds = 0.0, 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        (a @ b).sum().item()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - start)
        flops, seconds = flops + 2 * m * k * n, seconds + best
    return flops / seconds / 1e9


class Setting:
    """A model and optimizer under one setting, stepping exactly as the train stage does:
    autocast forward, zero_grad, backward, clip the gradient norm, optimizer step."""

    def __init__(
        self,
        name: str,
        cfg,
        device,
        bf16: bool,
        foreach_adamw: bool = False,
        compile: bool = False,
        flash_backward: bool = False,
        vocab=VOCAB,
    ):
        self.name, self.bf16, self.grad_clip = name, bf16, cfg.grad_clip
        torch.manual_seed(0)
        self.model = GPT(model_config(cfg, vocab)).to(device)
        if flash_backward:  # the flash kernel's own backward, as before CausalAttentionCPU
            for block in self.model.blocks:
                block.attn.cpu_bf16_backward = False
        if foreach_adamw:  # the optimizer before issue 11: torch's default (foreach) AdamW
            params = [p for p in self.model.parameters()]
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
        else:
            self.optimizer = make_optimizer(self.model, cfg, bf16)
        self.net = torch.compile(self.model) if compile else self.model
        self.compiled, self.device = compile, device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, x, y) -> None:
        with record_function("forward"), self.autocast:
            _, loss = self.net(x, y)
        loss.item()  # the train stage's divergence check syncs here too
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
            self.optimizer.step()

    def time(self, x, y, steps: int) -> float:
        with deterministic_kernels(self.compiled, self.device):  # as the train stage steps
            start = time.perf_counter()
            for _ in range(steps):
                self.step(x, y)
            return (time.perf_counter() - start) / steps


KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
)


def kind_of(event) -> str:
    node = event
    while node is not None:  # work inside the optimizer range is the optimizer's, whatever the op
        if node.name == "optimizer":
            return "optimizer (clip + step)"
        node = node.cpu_parent
    for kind, names in KINDS:
        if any(n in event.name for n in names):
            return kind
    return "element-wise and other"


def profile_step(setting: Setting, x, y, steps: int = 3) -> None:
    # In the mode the timed steps ran in: outside it a compiled model's guards fail and it compiles
    # again, inside the profile (a compiled default's profile was 2.7 s of "element-wise" a step).
    with (
        deterministic_kernels(setting.compiled, setting.device),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        for _ in range(steps):
            setting.step(x, y)
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name not in ("forward", "backward", "optimizer"):
            by_kind[kind_of(event)] += event.self_cpu_time_total / 1e3 / steps  # ms per step
    total = sum(by_kind.values())
    print(f"\nwhere a step of '{setting.name}' goes (torch.profiler, {steps} steps, CPU self time):")
    print(f"{'kind':<26} {'ms/step':>8} {'share':>6}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<26} {ms:>8.1f} {ms / total:>6.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per setting (median reported)")
    parser.add_argument(
        "--compile", action="store_true", help="add a torch.compile row where the default is eager"
    )
    parser.add_argument("--profile", action="store_true", help="profile the default setting by kind of work")
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="glibc's default allocation (fresh pages for large tensors), not the train stage's reuse",
    )
    parser.add_argument("-S", "--set", action="append", default=[], help="a params override, as trainpipe -S")
    args = parser.parse_args()
    cfg = load_params(overrides=args.set).train
    device = pick_device(cfg.device)
    reused = False if args.fresh_memory else reuse_freed_memory(device)
    bf16 = use_bf16(cfg.bf16, device)
    # The default's own precision is the peak it is held to: bf16 where the device multiplies
    # bf16 (train.bf16 auto), fp32 on a CPU without bf16 instructions (there bf16 is ~140x slower).
    precision = "bf16" if bf16 else "fp32"
    # without bf16 instructions one 4,096 square in bf16 takes minutes: a 512 square tells the speed
    bf16_sizes = PEAK_SIZES if bf16 or device.type != "cpu" else (512,)
    peak = {
        "bf16": matmul_peak(torch.bfloat16, device, sizes=bf16_sizes),
        "fp32": matmul_peak(torch.float32, device),
    }
    settings = [Setting("fp32, foreach AdamW", cfg, device, bf16=False, foreach_adamw=True)]
    if bf16:
        settings.append(Setting("bf16, foreach AdamW", cfg, device, bf16=True, foreach_adamw=True))
    if cfg.optimizer == "muon":  # beside it: what Muon's orthogonalization costs a step
        settings.append(
            Setting("default with AdamW only", cfg.model_copy(update={"optimizer": "adamw"}), device, bf16)
        )
    compiled = use_compile(
        cfg.compile, device
    )  # as the train stage decides: auto compiles where inductor builds
    settings.append(default := Setting("default", cfg, device, bf16=bf16, compile=compiled))
    if compiled:  # beside it, what compiling gains
        settings.append(Setting("default, eager", cfg, device, bf16=bf16))
        if bf16 and device.type == "cpu":  # ... and what CausalAttentionCPU's backward gains
            settings.append(
                Setting("default, flash backward", cfg, device, bf16=bf16, compile=True, flash_backward=True)
            )
    elif args.compile:
        settings.append(Setting("default + torch.compile", cfg, device, bf16=bf16, compile=True))
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    for s in settings:
        start = time.perf_counter()
        s.time(x, y, 2)  # warm-up (and compiling)
        s.warmup_s = time.perf_counter() - start
    times: dict[str, list[float]] = {s.name: [] for s in settings}
    dtype = torch.bfloat16 if bf16 else torch.float32
    # The default's peak again before each repeat: a shared host's speed moves by a third within
    # an hour (fp32 106-154 GFLOP/s on the AVX2 CPU), so each repeat's steps are held to the peak
    # measured beside them, not to one taken minutes before.
    repeat_peaks: list[float] = []
    for _ in range(args.repeats):
        repeat_peaks.append(matmul_peak(dtype, device, repeats=2, sizes=bf16_sizes if bf16 else PEAK_SIZES))
        for s in settings:
            times[s.name].append(s.time(x, y, args.steps))
    flops = settings[-1].model.flops_per_token()
    tokens = cfg.batch_size * cfg.block_size
    ceiling = matmul_ceiling(linear_shapes(settings[-1].model, tokens), device, dtype)
    print(
        f"device {device.type}, {torch.get_num_threads()} threads; {settings[0].model.num_params() / 1e6:.2f} M "
        f"params, {cfg.n_layer} layers x {cfg.n_embd}, batch {cfg.batch_size} x {cfg.block_size}, "
        f"{flops / 1e6:.1f} MFLOP/token; {args.steps} steps x {args.repeats} repeats, medians; "
        f"freed memory {'reused, as the train stage' if reused else 'returned (glibc default)'}"
    )
    print(
        f"matmul peak: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s; the default runs {precision}; "
        f"{precision} again before each repeat: {min(repeat_peaks):.0f}-{max(repeat_peaks):.0f} GFLOP/s, the ratios below are to each repeat's own"
    )
    if not bf16 and device.type == "cpu":
        print(
            "bf16 rows left out: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so train.bf16 auto is fp32"
        )
    print(
        f"ceiling: the step's linear-layer matmuls alone, {precision} at the model's shapes: {ceiling:.0f} GFLOP/s, "
        f"{ceiling / statistics.median(repeat_peaks):.0%} of the repeats' median {precision} peak"
    )
    print(
        f"{'setting':<26} {'s/step':>7} {'tokens/s':>9} {'GFLOP/s':>8} {f'of {precision} peak':>13} {'warm-up s':>10}"
    )
    for s in settings:
        med = statistics.median(times[s.name])
        gflops = tokens / med * flops / 1e9
        share = statistics.median(
            tokens / t * flops / 1e9 / p for t, p in zip(times[s.name], repeat_peaks, strict=True)
        )
        print(
            f"{s.name:<26} {med:>7.3f} {tokens / med:>9,.0f} {gflops:>8.1f} {share:>13.0%} "
            f"{s.warmup_s:>10.1f}"
        )
    if args.profile:
        profile_step(default, x, y)


if __name__ == "__main__":
    main()
