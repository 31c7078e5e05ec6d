"""The optimizer: fused AdamW alone, or torch's Muon on the blocks' matrices beside AdamW on the
rest, stepped as one (Optimizers) along one learning-rate schedule; Muon's orthogonalization is
batched by shape and runs in the model's precision.

Pure torch, no I/O: pipelines/stages/train.py builds it with make_optimizer. Its code decides the
weights a run ends with, so this module is one of train's WEIGHT_MODULE_FILES and a dependency of
dvc.yaml's train stage.
"""

from collections import defaultdict

import torch
from torch.optim._muon import _adjust_lr  # torch is pinned: its Muon's own lr adjustment

from pipelines.core.model import GPT
from pipelines.core.params import TrainParams


class Optimizers:
    """One or two torch optimizers stepped as one: Muon on the blocks' matrices beside AdamW on
    the rest, or AdamW alone. Each group keeps its own peak learning rate ("peak_lr") and
    set_lr_scale moves them all along the schedule."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for group in self.param_groups:
            group["peak_lr"] = group["lr"]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)


def orthogonalize(
    updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int, eps: float, dtype
) -> list[torch.Tensor]:
    """torch's Muon orthogonalization (torch.optim._muon._zeropower_via_newtonschulz: Newton-Schulz,
    its quintic coefficients) in dtype, the matrices of one shape stacked into one batched matmul.
    One by one, a default step's 16 small matrices made 240 matmul calls and 15% of a compiled step
    on an AMX Xeon; stacked they make 45, in half the time, with the same bf16 bits as torch's
    (tests/test_model.py). A tall matrix is orthogonalized as its transpose, as torch's does."""
    a, b, c = coefficients
    tall = [u.size(0) > u.size(1) for u in updates]
    wide = [u.to(dtype).mT if t else u.to(dtype) for u, t in zip(updates, tall, strict=True)]
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, x in enumerate(wide):
        by_shape[tuple(x.shape)].append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(updates)
    for members in by_shape.values():
        x = torch.stack([wide[i] for i in members])
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, xi in zip(members, x, strict=True):
            out[i] = xi.mT if tall[i] else xi
    return out


class Muon(torch.optim.Muon):
    """torch's Muon (its state, defaults and learning-rate adjustment), with the orthogonalization
    batched by shape (orthogonalize) and in the model's precision: torch's own always runs it in
    bf16, which on a CPU without bf16 instructions took a slow fallback and made a step 4.2x as
    long; in fp32 a Muon step costs about 1.1x an AdamW step there."""

    def __init__(self, params, *, bf16: bool, **kwargs):
        super().__init__(params, **kwargs)
        self.dtype = torch.bfloat16 if bf16 else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            momentum, lr = group["momentum"], group["lr"]
            updates = []
            for grad, buf in zip(grads, buffers, strict=True):  # as torch's _single_tensor_muon
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            updates = orthogonalize(
                updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.dtype
            )
            for param, update in zip(params, updates, strict=True):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def make_optimizer(model: GPT, cfg: TrainParams, bf16: bool) -> Optimizers:
    """AdamW (the fused CPU/GPU kernel: one pass over each tensor instead of a dozen foreach
    ops) with weight decay on matrices only; with optimizer "muon", the blocks' matrices go to
    torch's Muon instead (Moonshot's lr adjustment, so that its updates have AdamW's scale),
    orthogonalizing in bf16 when the model trains in bf16 and in fp32 otherwise."""
    muon = cfg.optimizer == "muon"
    in_blocks = {id(p) for p in model.blocks.parameters()}
    matrices = [p for p in model.parameters() if p.dim() >= 2 and not (muon and id(p) in in_blocks)]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)]
    if muon:
        hidden = [p for p in model.blocks.parameters() if p.dim() >= 2]
        optimizers.append(
            Muon(
                hidden,
                bf16=bf16,
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    return Optimizers(optimizers)
