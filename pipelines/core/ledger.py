"""The cost ledger: device time priced by the device that was held, the work of training, and
what a million generated tokens cost. Pure functions, no I/O.

The flow prices its stages' process reports (pipelines/core/usage.py) and logs the figures as metrics
of its MLflow run (`cost.*`); publish keeps a run's and the cumulative figures on each version it
registers; `trainpipe status` shows the champion's (pipelines/commands/status.py).

How a stage is counted, from the reports of its processes:
- device_s: the wall seconds of the stage's own process, from its start (imports included) to
  its exit, summed over attempts (a retried stage pays for each try); a stage DVC skipped ran no
  process and spent 0;
- money: a process that held a GPU pays cost.gpu_hour_usd for its seconds, one GPU each (a
  torchrun rank holds one); the stage's process on the CPU pays cost.cpu_hour_usd for the
  machine; torchrun ranks on the CPU add nothing, their launcher already holds the machine.
  Seconds are kept by kind (cpu_s, gpu_s), so the same seconds can be priced at other rates;
- peak memory: the largest process's peak RSS, and the largest torch.cuda.max_memory_allocated.
"""

import math
from dataclasses import asdict, dataclass

from pipelines.core.params import CostParams
from pipelines.core.usage import stage_work

SECONDS_PER_HOUR = 3600.0
MB = 1_000_000
# The run metrics publish sums over the runs since the champion (pipelines/registry.ledger_runs).
RUN_CPU_S, RUN_GPU_S, RUN_USD = "cost.cpu_s", "cost.gpu_s", "cost.usd"


@dataclass
class StageCost:
    stage: str
    ran: bool  # whether any process of it ran in this flow run (DVC skipped it otherwise)
    device: str  # "cuda" when a process of it held a GPU, else "cpu"
    device_s: float
    cpu_s: float
    gpu_s: float
    usd: float
    peak_rss_mb: float | None
    cuda_peak_mb: float | None
    attempts: int


def price(cpu_s: float, gpu_s: float, rates: CostParams) -> float:
    """USD for machine-seconds on the CPU and GPU-seconds."""
    return (cpu_s * rates.cpu_hour_usd + gpu_s * rates.gpu_hour_usd) / SECONDS_PER_HOUR


def _mb(values: list) -> float | None:
    found = [v for v in values if v is not None]
    return max(found) / MB if found else None


def price_stage(stage: str, records: list[dict], rates: CostParams) -> StageCost:
    """One stage's cost from the reports of its processes (none: DVC skipped it)."""
    mine = [r for r in records if r["stage"] == stage]
    main = [r for r in mine if r.get("rank") is None]  # the stage's own process, once per attempt
    gpu_s = sum(r["seconds"] for r in mine if r["device"] == "cuda")
    cpu_s = sum(r["seconds"] for r in main if r["device"] != "cuda")
    return StageCost(
        stage=stage,
        ran=bool(mine),
        device="cuda" if gpu_s else "cpu",
        device_s=sum(r["seconds"] for r in main),
        cpu_s=cpu_s,
        gpu_s=gpu_s,
        usd=price(cpu_s, gpu_s, rates),
        peak_rss_mb=_mb([r.get("peak_rss_bytes") for r in mine]),
        cuda_peak_mb=_mb([r.get("cuda_peak_bytes") for r in mine]),
        attempts=len(main),
    )


def train_work(works: list[dict]) -> dict:
    """The tokens and FLOPs this run's training spent, from what train noted in its usage reports
    (pipelines/usage.stage_work): a train resumed at step k spent only steps k to the end,
    (steps - k) / steps of the tokens the model has seen. None noted (train skipped, restored by
    DVC, or failed before its end): nothing counted."""
    tokens, flops, seen = 0, 0.0, None
    for work in works:
        steps, start = int(work["steps"]), int(work.get("resumed_from_step") or 0)
        spent = int(work["tokens_seen"]) * (steps - start) // steps if steps else 0
        tokens, flops, seen = (
            tokens + spent,
            flops + float(work["flops_per_token"]) * spent,
            int(work["tokens_seen"]),
        )
    return {"tokens": tokens, "flops": flops, "model_tokens_seen": seen}


def run_ledger(stages: list[str], records: list[dict], rates: CostParams) -> dict:
    """The whole run's ledger: each stage (every one listed, 0 for those that did not run), the
    totals, training's tokens and FLOPs, and the rates used."""
    costs = [price_stage(stage, records, rates) for stage in stages]
    work = train_work(stage_work(records, "train"))
    return {
        "stages": [asdict(c) for c in costs],
        "device_s": sum(c.device_s for c in costs),
        "cpu_s": sum(c.cpu_s for c in costs),
        "gpu_s": sum(c.gpu_s for c in costs),
        "usd": sum(c.usd for c in costs),
        "peak_rss_mb": max((c.peak_rss_mb for c in costs if c.peak_rss_mb is not None), default=None),
        "train_tokens": work["tokens"],
        "train_flops": work["flops"],
        "model_tokens_seen": work["model_tokens_seen"],
        "cpu_hour_usd": rates.cpu_hour_usd,
        "gpu_hour_usd": rates.gpu_hour_usd,
    }


def ledger_metrics(ledger: dict) -> dict[str, float]:
    """The ledger as MLflow metrics: cost.<stage>.{device_s,usd,peak_rss_mb,cuda_peak_mb} and the
    run's cost.{device_s,cpu_s,gpu_s,usd,peak_rss_mb,train_tokens,train_flops}."""
    metrics: dict[str, float] = {}
    for c in ledger["stages"]:
        prefix = f"cost.{c['stage']}"
        metrics[f"{prefix}.device_s"] = c["device_s"]
        metrics[f"{prefix}.usd"] = c["usd"]
        for key in ("peak_rss_mb", "cuda_peak_mb"):
            if c[key] is not None:
                metrics[f"{prefix}.{key}"] = c[key]
    for key in ("device_s", "cpu_s", "gpu_s", "usd", "peak_rss_mb", "train_tokens", "train_flops"):
        if ledger[key] is not None:
            metrics[f"cost.{key}"] = float(ledger[key])
    return metrics


def usd_per_million_tokens(tokens_per_s: float, device: str, rates: CostParams) -> float:
    """What generating a million tokens costs at tokens_per_s on device, one request at a time."""
    hour_usd = rates.gpu_hour_usd if device == "cuda" else rates.cpu_hour_usd
    return hour_usd / SECONDS_PER_HOUR * 1_000_000 / tokens_per_s


def payback_million_tokens(training_usd: float, usd_per_mtok: float) -> float | None:
    """How many million tokens served cost as much to generate as the training did."""
    return training_usd / usd_per_mtok if usd_per_mtok > 0 else None


def format_usd(value: float) -> str:
    """$1,234.50, $0.0123, $0.000412: cents for a dollar or more, else three significant digits."""
    if value >= 1:
        return f"${value:,.2f}"
    if value <= 0:
        return "$0"
    decimals = 2 - math.floor(math.log10(value))
    return f"${value:.{decimals}f}"


def ledger_summary(ledger: dict) -> str:
    """One line for `trainpipe run`: what this run cost and what training spent."""
    ran = [c for c in ledger["stages"] if c["ran"]]
    on_gpu = f" ({ledger['gpu_s']:,.1f} GPU-seconds)" if ledger["gpu_s"] else ""
    work = (
        f"; training {ledger['train_tokens']:,} tokens, {ledger['train_flops']:.3g} FLOPs"
        if ledger["train_tokens"]
        else ""
    )
    return (
        f"{format_usd(ledger['usd'])} for {ledger['device_s']:,.1f} device-seconds{on_gpu} over "
        f"{len(ran)} stage{'s' if len(ran) != 1 else ''} that ran{work}"
    )


def ledger_markdown(ledger: dict, outcomes: dict[str, str] | None = None) -> list[str]:
    """The ledger as a markdown section for the flow's Prefect artifact; outcomes (stage: what
    the flow recorded, e.g. "skipped") say why a stage that ran no process spent nothing."""
    lines = [
        "## Cost",
        "",
        "| stage | device | device-seconds | peak RSS MB | CUDA peak MB | USD |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in ledger["stages"]:
        if not c["ran"]:
            why = (outcomes or {}).get(c["stage"], "not reached")
            lines.append(f"| {c['stage']} | {why} | 0 | | | $0 |")
            continue
        cuda = f"{c['cuda_peak_mb']:,.0f}" if c["cuda_peak_mb"] is not None else ""
        rss = f"{c['peak_rss_mb']:,.0f}" if c["peak_rss_mb"] is not None else ""
        tries = f" ({c['attempts']} attempts)" if c["attempts"] > 1 else ""
        lines.append(
            f"| {c['stage']} | {c['device']} | {c['device_s']:,.1f}{tries} | {rss} | {cuda} | {format_usd(c['usd'])} |"
        )
    lines += [
        f"| **run** | | {ledger['device_s']:,.1f} | | | **{format_usd(ledger['usd'])}** |",
        "",
        f"training: {ledger['train_tokens']:,} tokens, {ledger['train_flops']:.3g} FLOPs this run"
        + (
            f" (the model has seen {ledger['model_tokens_seen']:,} tokens)"
            if ledger["model_tokens_seen"]
            else ""
        ),
        f"rates: ${ledger['cpu_hour_usd']:g} a CPU-machine hour, ${ledger['gpu_hour_usd']:g} a GPU hour "
        "(`cost.*` in params.yaml)",
        "",
    ]
    return lines
