"""Device and precision for training: which device trains (cuda, then mps, then cpu), whether in
bf16 autocast, whether under torch.compile, and the process settings a step runs in (freed memory
kept on a CPU, deterministic kernels for a model compiled for a CPU).

The train stage's policy (pipelines/stages/train.py), also asked by evaluate for the precision it
scores in and by benchmarks/ for the settings they time. What it decides changes the weights a run
ends with (bf16 or fp32, compiled or eager kernels), so this module is one of train's
WEIGHT_MODULE_FILES and a dependency of dvc.yaml's train stage. It lives in stages/, not core/:
cpu_compile_problem runs inductor (a C++ compiler and its cache on disk) and reuse_freed_memory
changes this process's malloc through libc.
"""

import ctypes
import functools
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipelines.core.errors import TrainpipeError


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise TrainpipeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_multiplies_bf16()


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). With them a bf16
    matmul ran 2-4x fp32 (a Zen 4 EPYC: 400 against 175 GFLOP/s); without them (an AVX2-only
    EPYC) torch takes a slow fallback path: 0.86 against 122 GFLOP/s, 140x slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_compile(setting: str, device: torch.device, world: int = 1) -> bool:
    """auto: torch.compile on CUDA, and on a CPU where inductor builds its kernels (a C++ compiler
    and Python's headers: cpu_compile_problem) for a run of one process. There it trains in
    deterministic mode (deterministic_kernels): on the AVX2 CPU a compiled default step was
    1.05-1.16x an eager one in the interleaved bench, to the same score (README). A run of several
    CPU processes (torchrun, gloo) stays eager: compiled, it is unmeasured."""
    return compile_decision(setting, device, world)[0]


def compile_decision(setting: str, device: torch.device, world: int = 1) -> tuple[bool, str]:
    """use_compile's answer and, where auto would have compiled for this CPU but inductor cannot
    build here, why not ("" otherwise): the train stage logs it."""
    if setting != "auto":
        return setting == "on", ""
    if device.type == "cuda":
        return True, ""
    if device.type != "cpu" or world != 1:
        return False, ""
    problem = cpu_compile_problem()
    return not problem, problem


@functools.cache
def cpu_compile_problem() -> str:
    """Why inductor cannot compile for this CPU ("" when it can), found by compiling one tiny
    function: the C++ compiler, its flags and Python's headers all take part, as in training.
    Once per process: 10.5 s the first time, 4.5 s with inductor's cache, mostly inductor's imports."""
    try:
        torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)(torch.ones(8))
    except Exception as exc:  # noqa: BLE001 -- whatever failed, train.compile auto trains eager
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first_line}"
    return ""


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def reuse_freed_memory(device: torch.device) -> bool:
    """Keep the memory a CPU training step frees for the next step, for the rest of this process.
    glibc serves every allocation over 32 MB with its own mmap and returns it on free, so each step's
    logits (batch x block x vocab in fp32: 67 MB by default) and their gradient land on fresh pages
    that the kernel faults in and zeroes on first touch. On the AVX2 CPU the lm_head matmul ran at
    60 GFLOP/s into fresh memory against 97 into reused, a 67 MB torch.zeros took 37 ms against 5,
    and a compiled default step was 1.12-1.15x faster with it (medians of 7 and 5 pairs of
    processes, benchmarks/memory_bench.py; README). So: no mmap for malloc, and up to 1 GiB of
    freed heap kept rather than trimmed. The weights are the same: only where tensors live changes.
    Returns whether it applied (a CPU and glibc; elsewhere a no-op)."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@contextmanager
def deterministic_kernels(compiled: bool, device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms, for as long as the block runs, where a model compiled for
    a CPU steps in it. Inductor's CPU kernels otherwise split some work across threads differently
    from run to run: two compiled runs of the same steps ended in different weights (README, the
    bench), so a resumed run would not be the run that was not stopped. Eager CPU training needs
    none of it."""
    before = torch.are_deterministic_algorithms_enabled()
    if compiled and device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
