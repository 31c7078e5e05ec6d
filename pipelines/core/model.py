"""A GPT-style decoder for code completion (after nanoGPT). Knows nothing of files or logging.

model = GPT(GPTConfig(vocab_size=4096))
logits, loss = model(idx, targets)
out = model.generate(idx, max_new_tokens=64, temperature=0.8, top_k=50)   # with a KV cache

The served model's code (pipelines/serving/completion.py) imports this module and travels with it: it
imports torch and nothing else of the project.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    # The defaults below are the first architecture's (GPT-2's), so that a config.json written
    # before these fields existed loads as the model it was. params.yaml picks today's recipe.
    positions: str = "learned"  # "learned" (an embedding per position) or "rope" (rotary, in q and k)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (no mean, no bias)
    mlp: str = "gelu"  # "gelu" or "relu2" (squared ReLU, as in the nanoGPT speedrun)
    mlp_ratio: int = 4  # hidden width of the MLP, in multiples of n_embd
    tie_head: bool = True  # the output head shares the token embedding's weights
    qk_norm: bool = False  # RMS-normalize each head's q and k before attention (bounds its logits)

    def to_dict(self) -> dict:
        return asdict(self)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


def rotary_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_size / 2) of RoPE's angles, position p, pair i: p / 10000^(2i/hs)."""
    hs = config.n_embd // config.n_head
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, nh, T, hs) with cos, sin (T, hs / 2): each half-pair turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalAttentionCPU(torch.autograd.Function):
    """Causal attention of bf16 q, k, v (B, nh, T, hs) on a CPU: torch's flash kernel forward,
    and a backward that recomputes the probabilities from its log-sum-exp with batched matmuls.
    The flash kernel's own bf16 backward ran at about 110 GFLOP/s on an AMX Xeon, 6x its
    forward's time and twice its fp32 backward's; compiled, this one took a layer's attention
    from 17 to 11 ms there (benchmarks/train_bench.py). Scores are recomputed in fp32, where
    the kernel keeps them: the gradients stay as close to fp32's as its own. Used only where
    inductor compiles training (CausalSelfAttention.use_cpu_bf16_backward): eager, the
    element-wise work unfused, it is slower than the kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        T, scale = q.size(-2), q.size(-1) ** -0.5
        dout = dout.to(q.dtype)
        scores = q.float() @ k.float().transpose(-1, -2)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = torch.where(causal, torch.exp(scores * scale - lse.unsqueeze(-1)), 0.0)
        dv = probs.to(q.dtype).transpose(-1, -2) @ dout
        dprobs = (dout @ v.transpose(-1, -2)).float()
        rowdot = (dout.float() * out.float()).sum(-1, keepdim=True)  # sum_j P_ij dP_ij
        dscores = (probs * (dprobs - rowdot) * scale).to(q.dtype)
        return dscores @ k, dscores.transpose(-1, -2) @ q, dv


class KVCache:
    """Keys and values of the positions seen so far, per layer, so that a generation step runs
    only its new token through the model. Filled from position 0: one prefill of the prompt,
    then one token per step, up to block_size positions."""

    attn_mask = None  # every row stands at the same position: a step attends to all that is cached

    def __init__(self, config: GPTConfig):
        self.config = config
        self.pos = 0  # positions filled
        self.k: torch.Tensor | None = None  # (n_layer, B, nh, block_size, hs)
        self.v: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions pos..pos+T; return all of the layer's so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            shape = (self.config.n_layer, B, nh, self.config.block_size, hs)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # CausalAttentionCPU where it applies; benchmarks/train_bench.py turns it off for a row
        self.cpu_bf16_backward = True

    def use_cpu_bf16_backward(self, q: torch.Tensor, cache: KVCache | None) -> bool:
        """CausalAttentionCPU's backward where it is faster: training in bf16 on a CPU, under
        torch.compile, causal over the whole sequence, no dropout. Everywhere else (eager, fp32,
        CUDA, generation, scoring) the same forward kernel runs through F.scaled_dot_product_attention."""
        return (
            self.cpu_bf16_backward
            and torch.compiler.is_compiling()
            and q.requires_grad  # training: no_grad (scoring) leaves it False
            and q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and cache is None
            and not (self.training and self.dropout > 0)
        )

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # no weights: q . k / sqrt(hs) stays within +-sqrt(hs) whatever the step size
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:  # cos, sin of this call's positions: rotated before k enters the cache
            q, k = rotate(q, *rope), rotate(k, *rope)
        causal, mask = True, None
        if cache is not None:
            # k, v: (B, nh, pos + T, hs). The prefill (pos 0) is causal like training; a step
            # (T == 1) attends to every cached position in its past: all of them for a KVCache,
            # the row's own for a batch whose rows stand at different positions (its mask).
            causal, mask = cache.pos == 0, cache.attn_mask
            k, v = cache.update(layer, k, v)
        if self.use_cpu_bf16_backward(q, cache):
            y = CausalAttentionCPU.apply(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.positions not in ("learned", "rope") or config.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown positions {config.positions!r} or norm {config.norm!r}")
        if config.mlp not in ("gelu", "relu2"):
            raise ValueError(f"unknown mlp {config.mlp!r}")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # RoPE's tables are buffers, not weights: not saved (persistent=False), rebuilt from the config
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        if config.positions == "rope":
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final layer's normalized states (B, T, C) of idx, which follows the cache's positions."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if start and T != 1:
            raise ValueError(f"after the prefill, a KV cache takes one token at a time, got {T}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, rope)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step of rows that stand at different positions: the logits (A, vocab) of
        tokens (A,), row r's token at positions[r], against the keys and values the cache holds
        for its row (pipelines.core.decode.SlotCache: its attn_mask hides other rows' futures)."""
        x = self.wte(tokens[:, None])  # (A, 1, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)[:, None, :]
        else:  # each row's angles, broadcast over heads: (A, 1, 1, hs / 2)
            rope = (self.rope_cos[positions][:, None, None, :], self.rope_sin[positions][:, None, None, :])
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, rope)
        return self.lm_head(self.ln_f(x)[:, -1, :])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (nanoGPT's estimate_mfu)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy.

        With use_cache the prompt runs through the model once (the prefill) and each step runs
        only the newest token against cached keys and values, with logits at the last position
        only. Without it, every step runs the whole context again: the reference, which the
        cache matches token for token under the same generator. A cache cannot follow a window
        that slides past block_size (every position shifts), so once the sequence outgrows
        block_size the steps are the reference's; a caller that wants the fast path throughout
        keeps prompt + max_new_tokens within block_size.

        Raises ValueError when the logits are not finite (broken weights, NaN or inf), rather
        than sampling garbage, or when temperature is so small that the scaled logits overflow.
        """
        block_size = self.config.block_size
        cache = KVCache(self.config) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block_size:
                new = idx if cache.pos == 0 else idx[:, -1:]  # the prefill, then one token
                logits = self.lm_head(self.hidden_states(new, cache)[:, -1, :])  # (B, vocab)
            else:
                logits, _ = self(idx[:, -block_size:])
                logits = logits[:, -1, :]
            next_id = _next_token(logits.float(), temperature, top_k, generator)
            idx = torch.cat((idx, next_id), dim=1)
            if stop_token is not None and bool((next_id == stop_token).all()):
                break
        return idx


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, vocab). Sampling draws among
    the top_k only: the distribution of masking the others, without drawing over the vocabulary."""
    scaled = logits / temperature if temperature > 0 else logits
    # One sum checks every value (a NaN or inf anywhere makes it NaN or inf) with one sync.
    if not math.isfinite(scaled.sum().item()):
        if not math.isfinite(logits.sum().item()):
            raise ValueError("the model's logits are not finite (NaN or inf): its weights are broken")
        raise ValueError(f"temperature {temperature} is too small: the scaled logits overflow")
    if temperature <= 0:
        return scaled.argmax(dim=-1, keepdim=True)
    if top_k and top_k < scaled.size(-1):
        top, top_ids = torch.topk(scaled, top_k)  # (B, k)
        choice = torch.multinomial(F.softmax(top, dim=-1), num_samples=1, generator=generator)
        return top_ids.gather(-1, choice)
    return torch.multinomial(F.softmax(scaled, dim=-1), num_samples=1, generator=generator)
