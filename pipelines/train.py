"""Train: a GPT-style code-completion model on data/tokens, resumable from checkpoints/.

    python -m pipelines.train             # what `dvc repro train` runs
    trainpipe train -S train.max_steps=200

Device chosen at run time (cuda, then mps, then cpu) with bf16 autocast where the device
supports it. Every train.checkpoint_every steps a full checkpoint (weights, optimizer, torch RNG
state, step, config, data version, code version) is written atomically to checkpoints/<key>/, one
folder per config and data, the last two kept (pipelines/checkpoint.py); a train started while an
intact checkpoint of the same code, config and data exists resumes from it, and from the one before
when the newest is truncated. Once the model is written the run's checkpoint folder is removed: a
finished run's checkpoints never stand in for a later run. The batch of step i is a function of
(seed, i) alone, so a resumed run sees the same data as an uninterrupted one. A non-finite loss or
gradient stops the run before anything of that step is saved.
Writes models/: model.safetensors, config.json, tokenizer.json, train.json.
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import pipelines.checkpoint
import pipelines.data
import pipelines.model
from pipelines.checkpoint import CODE, load_checkpoint, remove_run, run_dir, save_checkpoint
from pipelines.data import TOKENIZER_FILE, load_tokens, read_json, sha256_file, write_json
from pipelines.errors import DivergenceError, TrainpipeError
from pipelines.model import GPT, GPTConfig
from pipelines.params import Params, TrainParams

# Fields that do not change the weights a run ends with: a checkpoint stays valid across them.
NON_MODEL_FIELDS = {"device", "checkpoint_every", "log_every", "checkpoint_dir", "model_dir"}
# The modules whose code decides the weights a run ends with (dvc.yaml lists them as train's deps).
WEIGHT_MODULE_FILES = (
    __file__,
    pipelines.model.__file__,
    pipelines.checkpoint.__file__,
    pipelines.data.__file__,
)


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
    return device.type == "cpu"  # bf16 matmul is ~4x fp32 on current x86 CPUs (STACK-NOTES)


def get_batch(data: np.ndarray, step: int, seed: int, B: int, T: int, device: torch.device):
    """Random windows for one step; depends on (seed, step) only, never on process history."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - T - 1, (B,), generator=g).tolist()
    x = torch.from_numpy(np.stack([data[i : i + T].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + T].astype(np.int64) for i in ix]))
    return x.to(device), y.to(device)


def lr_at(step: int, cfg: TrainParams) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainParams) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def data_version(tokens_dir: Path) -> str:
    """Content hash of what training reads: the training tokens and the tokenizer."""
    return sha256_file(tokens_dir / "train.bin", tokens_dir / TOKENIZER_FILE)[:16]


def code_version() -> dict:
    """The code that decides the weights: a hash of each module's bytes (a comment-only edit
    counts as a change: it may retrain, never reuse other code's checkpoint), and the versions
    of torch and numpy (batches pass through numpy)."""
    files = {f"pipelines/{Path(f).name}": sha256_file(f)[:16] for f in WEIGHT_MODULE_FILES}
    # str(): torch.__version__ is a TorchVersion, which weights-only loading refuses
    return files | {"torch": str(torch.__version__), "numpy": np.__version__}


def run_fingerprint(cfg: TrainParams, model_cfg: GPTConfig) -> dict:
    """The config and code a checkpoint must match to be resumed from."""
    fields = {k: v for k, v in cfg.model_dump().items() if k not in NON_MODEL_FIELDS}
    return {"train": fields, "model": model_cfg.to_dict(), CODE: code_version()}


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


def write_model(model_dir: Path, model: GPT, tokens_dir: Path, summary: dict) -> None:
    from safetensors.torch import save_model

    model_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    shutil.copyfile(tokens_dir / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)
    write_json(model_dir / "train.json", summary)


def start_tracking(params: Params):
    """Log to the flow's MLflow run when MLFLOW_RUN_ID names one, else to a new run."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run()  # MLflow resumes the run named by the environment
    mlflow.set_experiment(params.publish.experiment)
    return mlflow.start_run(run_name="train")


def train_model(params: Params, log=print) -> dict:
    import mlflow
    from tqdm import tqdm

    cfg = params.train
    tokens_dir, model_dir = Path(params.data.tokens_dir), Path(cfg.model_dir)
    meta = read_json(tokens_dir / "meta.json")
    data = load_tokens(tokens_dir / "train.bin")
    if len(data) <= cfg.block_size + 1:
        raise TrainpipeError(f"{tokens_dir}/train.bin holds {len(data)} tokens; need more than block_size")
    device = pick_device(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)
    model_cfg = GPTConfig(
        meta["vocab_size"], cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout
    )
    fingerprint, version = run_fingerprint(cfg, model_cfg), data_version(tokens_dir)

    torch.manual_seed(cfg.seed)  # seed once: the initial weights
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    ckpt_dir = run_dir(cfg.checkpoint_dir, fingerprint, version)
    state, ckpt_path, notes = load_checkpoint(ckpt_dir, fingerprint, version)
    for note in notes:
        log(f"train: {note}")
    start_step, history = 0, []  # history: [step, train loss, lr] every log_every steps
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.block_size

    with start_tracking(params):
        mlflow.log_params({f"train.{k}": v for k, v in cfg.model_dump().items()} | {"data_version": version})
        model.train()
        t0, timed_tokens, loss_value = time.perf_counter(), 0, float("nan")
        bar = tqdm(
            range(start_step, cfg.max_steps),
            initial=start_step,
            total=cfg.max_steps,
            desc="train",
            unit="step",
            disable=None,
            file=sys.stderr,
        )
        for step in bar:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(cfg.seed + step)  # dropout noise depends on the step, not the history
            x, y = get_batch(data, step, cfg.seed, cfg.batch_size, cfg.block_size, device)
            with autocast:
                _, loss = model(x, y)
            loss_value = loss.item()  # sync point
            if not math.isfinite(loss_value):
                raise DivergenceError(
                    f"loss became {loss_value} at step {step}: training stopped, no model written "
                    f"(try a lower train.lr than {cfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
                mlflow.log_metrics(
                    {"train_loss": loss_value, "lr": lr, "tokens_per_s": tok_s}, step=done, synchronous=False
                )
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
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
            "bf16": bf16,
            "num_params": model.num_params(),
            "flops_per_token": model.flops_per_token(),
            "data_version": version,
            "vocab_size": meta["vocab_size"],
            "history": history,
        }
        mlflow.log_metrics({"train_seconds": elapsed, "num_params": summary["num_params"]})
    write_model(model_dir, model, tokens_dir, summary)
    remove_run(ckpt_dir)  # the model is the result now; a later run must not resume this one
    return summary


def run(params: Params) -> dict:
    return train_model(params)


def describe(s: dict, params: Params) -> str:
    speed = f"{s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "nothing left to train"
    loss = f"{s['final_train_loss']:.3f}" if s["final_train_loss"] is not None else "n/a"
    return (
        f"train: {s['steps']} steps on {s['device']}{' (bf16)' if s['bf16'] else ''}, "
        f"final loss {loss}, {speed}, {s['train_seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.entry import stage_main

    stage_main("train", run, describe, argv)


if __name__ == "__main__":
    main()
