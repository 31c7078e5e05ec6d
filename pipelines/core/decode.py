"""Batched decoding: many sequences, each at its own position, stepped through the model together.

    cache = SlotCache(model.config, slots=64)
    logits = prefill(model, cache, slot=0, ids=[...])      # a new sequence joins in slot 0
    cache.begin_step(positions)                             # positions (A,): where each row stands
    logits = model.step_rows(tokens, positions, cache)      # (A, vocab): one token for every row
    tokens, errors = next_tokens(logits, rows)              # each row sampled with its own generator

The rows hold slots 0..A-1 of the cache, kept contiguous (move() puts the last row in a freed
slot), so a step reads the cache as a view, not a gather. A row's keys past its own position
belong to an earlier, longer occupant of the slot or to nothing: the step's attention mask hides
them, so a row's logits do not depend on its batch-mates.

The served model's code (pipelines/serving/completion.py) imports this module and travels with it:
it imports torch and nothing of the project but the model.
"""

import random
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipelines.core.model import GPT, GPTConfig

GOLDEN_64 = 0x9E3779B97F4A7C15  # splitmix64's increment: rows of one seed get well-spread seeds


def row_seed(seed: int, row: int) -> int:
    """The seed of a request's row `row`: row 0 keeps the request's seed, so a one-prompt request
    samples as it did before rows had seeds of their own."""
    return (seed + row * GOLDEN_64) % 2**64


class SlotCache:
    """Keys and values (n_layer, slots, nh, block_size, hs) of up to `slots` sequences."""

    pos = 1  # what attention reads as "a prefill" (pos 0) never holds here: rows go by attn_mask

    def __init__(self, config: GPTConfig, slots: int, dtype: torch.dtype = torch.float32, device="cpu"):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.attn_mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._length = 0
        self._rows = torch.arange(slots, device=device)

    def begin_step(self, positions: torch.Tensor) -> None:
        """Rows 0..A-1 each take one token at positions (A,): each attends to its own 0..position."""
        low, high = positions.aminmax()
        self._positions, self._length = positions, int(high) + 1
        if int(low) == self._length - 1:  # every row at one position: each attends to all L keys
            self.attn_mask = None
            return
        keys = torch.arange(self._length, device=positions.device)
        self.attn_mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (A, 1, 1, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's k, v (A, nh, 1, hs) at its position; return the rows' (A, nh, L, hs)."""
        rows = self._rows[: k.size(0)]
        self.k[layer][rows, :, self._positions] = k[:, :, 0]
        self.v[layer][rows, :, self._positions] = v[:, :, 0]
        rows, length = k.size(0), self._length
        return self.k[layer, :rows, :, :length], self.v[layer, :rows, :, :length]

    def move(self, src: int, dst: int) -> None:
        """Slot src's keys and values into slot dst (a row leaving makes room for the last)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class _SlotPrefill:
    """One slot seen as a KVCache from position 0, for GPT.hidden_states to prefill a prompt."""

    attn_mask = None

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot, self.pos = cache, slot, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end, s = self.pos + k.size(2), slice(self.slot, self.slot + 1)
        self.cache.k[layer, s, :, self.pos : end] = k
        self.cache.v[layer, s, :, self.pos : end] = v
        return self.cache.k[layer, s, :, :end], self.cache.v[layer, s, :, :end]


def prefill(model: GPT, cache: SlotCache, slot: int, ids: list[int]) -> torch.Tensor:
    """Run a prompt through the model into `slot`; the logits (1, vocab) of its last position."""
    idx = torch.tensor([ids], dtype=torch.long, device=cache.k.device)
    return model.lm_head(model.hidden_states(idx, _SlotPrefill(cache, slot))[:, -1, :])


@dataclass(frozen=True)
class Sampling:
    """How one row picks its next token: temperature 0 is greedy; top_k 0 means no limit."""

    temperature: float
    top_k: int
    generator: random.Random | None = None  # the row's own: one uniform draw per sampled token


def next_tokens(logits: torch.Tensor, rows: list[Sampling]) -> tuple[list[int], list[str | None]]:
    """The next token of every row of logits (A, vocab), and per row an error (None if fine).

    Rows that sample alike (temperature, top_k) are computed together, each drawing one uniform
    number from its own generator and inverting its own cumulative distribution: what a row
    draws depends on its logits and its generator alone, never on its batch-mates.
    """
    logits = logits.float()
    tokens: list[int] = [0] * len(rows)
    errors: list[str | None] = [None] * len(rows)
    groups: dict[tuple[float, int], list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault((row.temperature, row.top_k), []).append(r)
    for (temperature, top_k), members in groups.items():
        group = logits if len(members) == len(rows) else logits[torch.tensor(members, device=logits.device)]
        scaled = group / temperature if temperature > 0 else group
        finite = torch.isfinite(scaled).all(dim=-1).tolist()
        if not all(finite):
            raw_finite = torch.isfinite(group).all(dim=-1).tolist()
            for r, ok, raw_ok in zip(members, finite, raw_finite, strict=True):
                if not ok:
                    errors[r] = (
                        f"temperature {temperature} is too small: the scaled logits overflow"
                        if raw_ok
                        else "the model's logits are not finite (NaN or inf): its weights are broken"
                    )
        if temperature <= 0:
            picked = scaled.argmax(dim=-1)
        else:
            ids = None
            if top_k and top_k < scaled.size(-1):
                scaled, ids = torch.topk(scaled, top_k)  # (G, k)
            cdf = F.softmax(scaled, dim=-1).cumsum(dim=-1)
            draws = torch.tensor([rows[r].generator.random() for r in members], dtype=cdf.dtype)
            u = (draws.to(cdf.device) * cdf[:, -1])[:, None]
            # the first entry whose cumulative probability exceeds u: never one of probability 0
            choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
            picked = (ids.gather(-1, choice) if ids is not None else choice)[:, 0]
        for r, token in zip(members, picked.tolist(), strict=True):
            tokens[r] = token
    return tokens, errors
