"""Train: a GPT-style code-completion model on data/tokens, resumable from checkpoints/.

    python -m pipelines.stages.train             # what `dvc repro train` runs
    trainpipe train -S train.max_steps=200
    trainpipe train -S train.nproc_per_node=2   # 2 processes under torchrun (pipelines/adapters/ranks.py)

Device chosen at run time (cuda, then mps, then cpu) with bf16 autocast where the device
supports it (pipelines/stages/device.py); AdamW, or Muon beside it (pipelines/core/optim.py).
Every train.checkpoint_every steps a full checkpoint (weights, optimizer, torch RNG
state, step, config, data version, code version) is written atomically to checkpoints/<key>/, one
folder per config and data, the last two kept (pipelines/adapters/checkpoint.py); a train started while an
intact checkpoint of the same code, config and data exists resumes from it, and from the one before
when the newest is truncated. Once the model is written the run's checkpoint folder is removed: a
finished run's checkpoints never stand in for a later run. The batch of step i is a function of
(seed, i) alone, so a resumed run sees the same data as an uninterrupted one. A non-finite loss or
gradient stops the run before anything of that step is saved.
With train.nproc_per_node above 1 the stage re-runs itself under torchrun: each rank trains a
DistributedDataParallel copy on its slice of step i's batch (the global batch, and so the tokens
seen, are those of one process); rank 0 alone reads and writes checkpoints, the model and MLflow.
Writes models/: model.safetensors, config.json, tokenizer.json, train.json. train.json describes
the weights and how they were made (steps, loss history, device, sizes), nothing about this one run:
the step it resumed from, its seconds and speed go to its usage report (pipelines/core/usage.py), so
byte-identical weights always make a byte-identical models/ and one DVC hash.
A fine-tune (finetune.parent_version set, `trainpipe finetune`) starts from the weights the parent
stage pinned in data/parent, on the parent's architecture, for finetune.max_steps steps of its own
learning-rate schedule with a fresh optimizer; the parent's version and weights sha256 are part of
the checkpoint fingerprint, and train.json names them.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import pipelines.adapters.checkpoint
import pipelines.adapters.ranks
import pipelines.core.data
import pipelines.core.model
import pipelines.core.optim
import pipelines.stages.device
from pipelines.adapters.checkpoint import CODE, load_checkpoint, remove_run, run_dir, save_checkpoint
from pipelines.adapters.ranks import (
    from_rank0,
    in_torchrun,
    join_ranks,
    launch_ranks,
    leave_ranks,
    mean_over_ranks,
)
from pipelines.core.data import TOKENIZER_FILE, load_tokens, read_json, sha256_file, write_json
from pipelines.core.errors import DivergenceError, TrainpipeError
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.model_dir import WEIGHTS_FILE, save_model_dir
from pipelines.core.optim import make_optimizer
from pipelines.core.params import Params, TrainParams
from pipelines.core.usage import note_work
from pipelines.stages.device import (
    compile_decision,
    deterministic_kernels,
    pick_device,
    reuse_freed_memory,
    use_bf16,
)
from pipelines.stages.parent import read_parent

# Fields that do not change the weights a run ends with: a checkpoint stays valid across them.
NON_MODEL_FIELDS = {
    "device",
    "checkpoint_every",
    "log_every",
    "checkpoint_dir",
    "model_dir",
    "system_metrics",
    "reports_dir",
}
# The modules whose code decides the weights a run ends with (dvc.yaml lists them as train's deps).
WEIGHT_MODULE_FILES = (
    __file__,
    pipelines.core.model.__file__,
    pipelines.adapters.checkpoint.__file__,
    pipelines.core.data.__file__,
    pipelines.adapters.ranks.__file__,
    pipelines.core.optim.__file__,
    pipelines.stages.device.__file__,  # precision and compilation: bf16 or fp32, compiled or eager kernels
)


def get_batch(
    data: np.ndarray,
    step: int,
    seed: int,
    B: int,
    T: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
):
    """Random windows for one step; depends on (seed, step) only, never on process history.
    Across `world` processes, rank r takes the r-th of `world` equal slices of the same B windows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - T - 1, (B,), generator=g).tolist()
    ix = ix[rank * B // world : (rank + 1) * B // world]
    x = torch.from_numpy(np.stack([data[i : i + T].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + T].astype(np.int64) for i in ix]))
    return x.to(device), y.to(device)


def lr_at(step: int, cfg: TrainParams) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def model_config(cfg: TrainParams, vocab_size: int) -> GPTConfig:
    """The model a train config builds."""
    return GPTConfig(
        vocab_size,
        cfg.block_size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.dropout,
        positions=cfg.positions,
        norm=cfg.norm,
        mlp=cfg.mlp,
        mlp_ratio=cfg.mlp_ratio,
        tie_head=cfg.tie_head,
        qk_norm=cfg.qk_norm,
    )


def data_version(tokens_dir: Path) -> str:
    """Content hash of what training reads: the training tokens and the tokenizer."""
    return sha256_file(tokens_dir / "train.bin", tokens_dir / TOKENIZER_FILE)[:16]


def code_version() -> dict:
    """The code that decides the weights: a hash of each module's bytes (a comment-only edit
    counts as a change: it may retrain, never reuse other code's checkpoint), and the versions
    of torch and numpy (batches pass through numpy)."""
    files = {
        "/".join(Path(f).parts[-3:]): sha256_file(f)[:16] for f in WEIGHT_MODULE_FILES
    }  # pipelines/<layer>/<module>.py
    # str(): torch.__version__ is a TorchVersion, which weights-only loading refuses
    return files | {"torch": str(torch.__version__), "numpy": np.__version__}


def run_fingerprint(
    cfg: TrainParams, model_cfg: GPTConfig, bf16: bool, compiled: bool = False, parent: dict | None = None
) -> dict:
    """The config, precision, compilation, code and starting weights (a fine-tune's parent: its
    version and weights sha256; None from random weights) a checkpoint must match to be resumed from.
    Precision and compilation are what train.bf16 and train.compile resolved to here: "auto" is
    bf16 on one CPU and fp32 on another, compiled where inductor builds and eager where it does
    not, and compiled kernels sum in another order than eager ones."""
    fields = {k: v for k, v in cfg.model_dump().items() if k not in NON_MODEL_FIELDS}
    precision = "bf16" if bf16 else "fp32"
    return {
        "train": fields,
        "model": model_cfg.to_dict(),
        "precision": precision,
        "compiled": compiled,
        "parent": parent,
        CODE: code_version(),
    }


def training_schedule(params: Params) -> TrainParams:
    """train's settings with a fine-tune's steps and learning rates in place of a full run's.
    Muon's peak scales with AdamW's, as the two share one schedule (optimizer.set_lr_scale)."""
    cfg, ft = params.train, params.finetune
    if not ft.parent_version:
        return cfg
    return cfg.model_copy(
        update={
            "max_steps": ft.max_steps,
            "lr": ft.lr,
            "min_lr": ft.min_lr,
            "warmup_steps": ft.warmup_steps,
            "muon_lr": cfg.muon_lr * ft.lr / cfg.lr,
        }
    )


def load_parent(model: GPT, params: Params) -> None:
    """Start from the pinned parent's weights (read_parent checked their sha256, and that train's
    settings build the parent's architecture)."""
    from safetensors.torch import load_model

    load_model(model, str(Path(params.finetune.parent_dir) / WEIGHTS_FILE))


def checkpoint_state(model, optimizer, step: int, fingerprint: dict, version: str, history: list) -> dict:
    """Everything needed to continue: weights, optimizer, step, history, config, data, code and
    the torch RNG state (the only generator training draws from; python's and numpy's are unused).
    Tensors and plain data only, so that it loads with weights_only=True."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "history": history,
        "fingerprint": fingerprint,
        "data_version": version,
        "rng": {"torch": torch.get_rng_state()},
    }


def check_gradients(model: GPT, cfg: TrainParams, step: int) -> None:
    """Clip the gradient norm to train.grad_clip (0: no clipping); stop when it is not finite,
    before the optimizer turns it into NaN weights that a checkpoint would keep."""
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    norm_value = norm.item()  # sync point
    if not math.isfinite(norm_value):
        raise DivergenceError(
            f"gradient norm became {norm_value} at step {step}: training stopped, no model written "
            f"(try a lower train.lr than {cfg.lr})"
        )


# Summary keys that belong to this run, not to the weights: kept out of models/train.json.
RUN_FACTS = ("resumed_from_step", "tokens_per_s", "train_seconds")
TRAINING_REPORT = "training.json"


def write_model(model_dir: Path, model: GPT, tokens_dir: Path, summary: dict) -> None:
    save_model_dir(model_dir, model, tokens_dir / TOKENIZER_FILE)
    write_json(model_dir / "train.json", {k: v for k, v in summary.items() if k not in RUN_FACTS})


def write_training_report(reports_dir: Path, summary: dict) -> None:
    """reports/training.json, a DVC metric: this run's speed. Nothing downstream reads it, so its
    run-to-run noise changes no other stage's input (unlike a timing in models/)."""
    report = {
        "train_tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "resumed_from_step": summary["resumed_from_step"],
    }
    write_json(reports_dir / TRAINING_REPORT, report, sort_keys=False)


def start_tracking(params: Params):
    """Log to the flow's MLflow run when MLFLOW_RUN_ID names one, else to a new run. With
    train.system_metrics, MLflow samples CPU, memory, disk and network (and GPUs it can read)
    every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) in a thread of this process, from here to
    the run's end: the metrics cover training, and a resumed run continues their steps."""
    import mlflow

    system_metrics = params.train.system_metrics
    if os.environ.get("MLFLOW_RUN_ID"):  # MLflow resumes the run named by the environment
        return mlflow.start_run(log_system_metrics=system_metrics)
    from pipelines.adapters.registry import set_training_experiment

    set_training_experiment(params.publish.experiment)
    return mlflow.start_run(run_name="train", log_system_metrics=system_metrics)


def log_curve_before(history: list) -> None:
    """A resumed run's curve up to its checkpoint (train_loss and lr of the checkpoint's history),
    for the steps the active MLflow run lacks: a run that resumes another's checkpoint shows its
    whole curve, and a flow's retry (the same MLflow run) logs no step twice."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.adapters.registry import last_logged_step, log_step_metrics

    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    last = last_logged_step(client, run_id, "train_loss")
    log_step_metrics(
        client, run_id, [(step, {"train_loss": loss, "lr": lr}) for step, loss, lr in history if step > last]
    )


def train_model(params: Params, log=print, track: bool = True) -> dict:
    """Train to train.max_steps, resuming from a checkpoint of the same code, config and data;
    in a rank of a torchrun run (pipelines/adapters/ranks.py), train the rank's slice of each step.
    track=False logs nothing to MLflow: for benchmarks on a machine that has no MLflow."""
    from tqdm import tqdm

    cfg = training_schedule(params)
    parent = read_parent(params)
    parent_key = {k: parent[k] for k in ("version", "weights_sha256")} if parent["version"] else None
    tokens_dir, model_dir = Path(params.data.tokens_dir), Path(cfg.model_dir)
    meta = read_json(tokens_dir / "meta.json")
    data = load_tokens(tokens_dir / "train.bin")
    if len(data) <= cfg.block_size + 1:
        raise TrainpipeError(f"{tokens_dir}/train.bin holds {len(data)} tokens; need more than block_size")
    rank, world, device = join_ranks(cfg, pick_device(cfg.device))
    main_process = rank == 0  # it alone reads and writes checkpoints, the model and MLflow
    tracking = main_process and track
    log = log if main_process else lambda *_: None
    if tracking:
        import mlflow  # seconds of imports, spared the other ranks
    reuse_freed_memory(device)
    bf16 = use_bf16(cfg.bf16, device)
    compiled, why_eager = compile_decision(cfg.compile, device, world)
    if why_eager:
        log(f"train: eager, not compiled: inductor cannot build CPU kernels here ({why_eager})")
    model_cfg = model_config(cfg, meta["vocab_size"])
    fingerprint = run_fingerprint(cfg, model_cfg, bf16, compiled, parent_key)
    version = data_version(tokens_dir)

    torch.manual_seed(cfg.seed)  # seed once: the initial weights, the same on every rank
    model = GPT(model_cfg)
    if parent_key:
        load_parent(model, params)
        log(
            f"train: fine-tune of version {parent['version']} (weights sha256 {parent['weights_sha256'][:12]}): "
            f"{cfg.max_steps} steps, peak lr {cfg.lr:g}, a fresh optimizer"
        )
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, bf16)
    ckpt_dir = run_dir(cfg.checkpoint_dir, fingerprint, version)
    state, ckpt_path, notes = (
        load_checkpoint(ckpt_dir, fingerprint, version) if main_process else (None, None, [])
    )
    if world > 1:
        state = from_rank0(state)  # every rank resumes from what rank 0 read
        backend = "nccl" if device.type == "cuda" else "gloo"
        log(f"train: {world} processes ({backend}), {torch.get_num_threads()} threads each")
    for note in notes:
        log(f"train: {note}")
    start_step, history = 0, []  # history: [step, train loss, lr] every log_every steps
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
    # the module that steps: DDP averages the ranks' gradients in backward; `model` is what is saved
    net = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    if compiled:
        net = torch.compile(net)
        log(f"train: torch.compile for {device.type}: its first steps compile (tens of seconds on a CPU)")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.block_size

    with (
        start_tracking(params) if tracking else nullcontext(),
        deterministic_kernels(compiled, device),
    ):
        if tracking:
            mlflow.log_params(
                # as set (the flow logged the same): a fine-tune's schedule is finetune.*'s
                {f"train.{k}": v for k, v in params.train.model_dump().items()}
                | {f"finetune.{k}": v for k, v in params.finetune.model_dump().items()}
                | {"data_version": version}
            )
            if start_step:
                log_curve_before(history)
        model.train()
        t0, timed_tokens, loss_value = time.perf_counter(), 0, float("nan")
        bar = tqdm(
            range(start_step, cfg.max_steps),
            initial=start_step,
            total=cfg.max_steps,
            desc="train",
            unit="step",
            disable=None if main_process else True,
            file=sys.stderr,
        )
        for step in bar:
            lr = lr_at(step, cfg)
            optimizer.set_lr_scale(lr / cfg.lr)
            # dropout noise depends on the step (and the rank), not the history
            torch.manual_seed((cfg.seed + step) * world + rank)
            x, y = get_batch(data, step, cfg.seed, cfg.batch_size, cfg.block_size, device, rank, world)
            with autocast:
                _, loss = net(x, y)
            loss_value = mean_over_ranks(loss, world)  # sync point
            if not math.isfinite(loss_value):
                raise DivergenceError(
                    f"loss became {loss_value} at step {step}: training stopped, no model written "
                    f"(try a lower train.lr than {cfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # sync point across ranks: DDP's all-reduce of the gradients
            check_gradients(model, cfg, step)
            optimizer.step()
            timed_tokens += tokens_per_step
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                tok_s = timed_tokens / (time.perf_counter() - t0)
                history.append([done, loss_value, lr])
                if bar.disable and done % max(cfg.log_every, cfg.max_steps // 10) == 0:  # no TTY: log lines
                    log(
                        f"train: step {done}/{cfg.max_steps} loss {loss_value:.3f} lr {lr:.2e} {tok_s:,.0f} tokens/s"
                    )
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                if tracking:
                    mlflow.log_metrics(
                        {"train_loss": loss_value, "lr": lr, "tokens_per_s": tok_s},
                        step=done,
                        synchronous=False,
                    )
            if main_process and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps):
                state = checkpoint_state(model, optimizer, done, fingerprint, version, history)
                ckpt_path = save_checkpoint(ckpt_dir, state, keep=ckpt_path)  # the previous one stays
        bar.close()
        elapsed = time.perf_counter() - t0
        summary = {
            "steps": cfg.max_steps,
            "resumed_from_step": start_step,
            "final_train_loss": history[-1][1] if history else None,  # also right when resumed at the end
            "tokens_seen": cfg.max_steps * tokens_per_step,
            "tokens_per_s": timed_tokens / elapsed if timed_tokens else None,
            "train_seconds": elapsed,
            "device": device.type,
            "processes": world,
            "bf16": bf16,
            "compiled": compiled,
            "num_params": model.num_params(),
            "flops_per_token": model.flops_per_token(),
            "data_version": version,
            "vocab_size": meta["vocab_size"],
            "kind": "finetune" if parent_key else "train",
            "parent": parent_key,
            "history": history,
        }
        if tracking:
            mlflow.log_metrics({"train_seconds": elapsed, "num_params": summary["num_params"]})
    if main_process:
        # for the cost ledger: what this run spent of the model's tokens, and how fast
        note_work(**{k: summary[k] for k in ("steps", "tokens_seen", "flops_per_token", *RUN_FACTS)})
        write_model(model_dir, model, tokens_dir, summary)
        remove_run(ckpt_dir)  # the model is the result now; a later run must not resume this one
    return summary


def run(params: Params) -> dict | None:
    """Train in this process, or, with train.nproc_per_node above 1 outside torchrun, under
    torchrun. The summary comes back from the process that prints it: one process, or rank 0."""
    if params.train.nproc_per_node > 1 and not in_torchrun():
        return launch_ranks(params)  # rank 0 printed the summary
    try:
        summary = train_model(params)
    finally:
        leave_ranks()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    write_training_report(Path(params.train.reports_dir), summary)  # the stage's, not train_model's
    return summary


def describe(s: dict, params: Params) -> str:
    speed = f"{s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "nothing left to train"
    loss = f"{s['final_train_loss']:.3f}" if s["final_train_loss"] is not None else "n/a"
    processes = f" in {s['processes']} processes" if s.get("processes", 1) > 1 else ""
    parent = f" (fine-tune of version {s['parent']['version']})" if s.get("parent") else ""
    return (
        f"train: {s['steps']} steps{parent} on {s['device']}{' (bf16)' if s['bf16'] else ''}{processes}, "
        f"final loss {loss}, {speed}, {s['train_seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("train", run, describe, argv)


if __name__ == "__main__":
    main()
