import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.core.model import GPT, GPTConfig, KVCache

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
# every architecture option away from GPT-2's at once
MODERN = dataclasses.replace(
    TINY, positions="rope", norm="rmsnorm", mlp="relu2", tie_head=False, qk_norm=True
)
ARCHS = pytest.mark.parametrize("config", [TINY, MODERN], ids=["gpt2", "modern"])


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5


@ARCHS
def test_attention_is_causal(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    a = torch.randint(0, config.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % config.vocab_size  # change only the future
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :7], lb[0, :7], atol=1e-5)
    assert not torch.allclose(la[0, 7:], lb[0, 7:])


def test_too_long_sequence_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        GPT(TINY)(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, TINY.vocab_size, (4, TINY.block_size))
    first = None
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3


def test_generate_is_seeded_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.tensor([[1, 2, 3]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model.generate(idx, 8, 1.0, 10, g1), model.generate(idx, 8, 1.0, 10, g2))
    greedy = model.generate(idx, 8, temperature=0)
    assert greedy.shape == (1, 11) and torch.equal(greedy, model.generate(idx, 8, temperature=0))
    # longer than block_size: the context is cropped, generation goes on
    assert model.generate(idx, TINY.block_size + 4, temperature=0).shape[1] == 3 + TINY.block_size + 4


PROMPTS = [[1], [5, 9, 2, 7], list(range(3, 13))]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, None), (1.0, None), (0.8, 10)])
@ARCHS
def test_kv_cache_matches_no_cache_token_for_token(prompt, temperature, top_k, config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.tensor([prompt])
    new_tokens = config.block_size - len(prompt)  # the cache fills to block_size exactly
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(11)
        outs.append(model.generate(idx, new_tokens, temperature, top_k, g, use_cache=use_cache))
    cached, reference = outs
    assert cached.shape == (1, config.block_size)
    assert cached.tolist() == reference.tolist()


@ARCHS
def test_kv_cache_past_block_size_continues_as_the_reference(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])  # a batch of two
    outs = [
        model.generate(idx, config.block_size + 5, 1.0, None, torch.Generator().manual_seed(3), use_cache=c)
        for c in (True, False)
    ]
    assert outs[0].shape == (2, 3 + config.block_size + 5)
    assert outs[0].tolist() == outs[1].tolist()


@ARCHS
def test_cached_logits_equal_the_full_forward(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    full, _ = model(idx)
    cache = KVCache(config)
    steps = [model.lm_head(model.hidden_states(idx[:, :5], cache))]
    for t in range(5, config.block_size):
        steps.append(model.lm_head(model.hidden_states(idx[:, t : t + 1], cache)))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model.hidden_states(idx[:, :1], cache)  # the cache is full


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_fails_loudly_on_nan_weights(use_cache):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        model.generate(torch.tensor([[1, 2]]), 4, temperature=0.8, use_cache=use_cache)


def test_generate_rejects_a_temperature_that_overflows_the_logits():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[1, 2]]), 4, temperature=1e-45)


def test_a_config_written_before_the_architecture_options_loads_as_gpt2():
    # config.json of a model trained before positions/norm/mlp/tie_head existed
    old = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
    model = GPT(GPTConfig(**old))
    assert model.wpe is not None and isinstance(model.ln_f, torch.nn.LayerNorm)
    assert model.lm_head.weight is model.wte.weight
    assert set(model.state_dict()) == set(GPT(TINY).state_dict())


def test_rope_tables_are_not_weights_and_an_untied_head_is_its_own():
    model = GPT(MODERN)
    assert "rope_cos" not in model.state_dict() and model.wpe is None
    assert model.lm_head.weight is not model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(qk_norm):
    torch.manual_seed(0)
    config = dataclasses.replace(MODERN, qk_norm=qk_norm)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    before, _ = model(idx)
    with torch.no_grad():
        for block in model.blocks:  # q's and k's rows of the fused projection, 10x
            block.attn.qkv.weight[: 2 * config.n_embd] *= 10
    after, _ = model(idx)
    assert torch.allclose(before, after, atol=1e-4) == qk_norm


def test_unknown_architecture_option_is_refused():
    with pytest.raises(ValueError, match="norm"):
        GPT(dataclasses.replace(TINY, norm="batchnorm"))


SHAPES = ((24, 96), (96, 24), (32, 32))  # two share a shape once the tall one is transposed


def muon_step(make, steps: int = 2) -> list[torch.Tensor]:
    """steps steps of a Muon that make() builds on fresh weights of SHAPES, seeded gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in SHAPES]
    opt = make(params)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
        opt.step()
    return [p.detach().clone() for p in params]


def test_muon_is_torchs_own_in_bf16_batched_by_shape_and_orthogonalizes_in_fp32_for_an_fp32_model():
    from pipelines.core.optim import Muon

    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    torchs = muon_step(lambda ps: torch.optim.Muon(ps, **kwargs))
    bf16 = muon_step(lambda ps: Muon(ps, bf16=True, **kwargs))
    fp32 = muon_step(lambda ps: Muon(ps, bf16=False, **kwargs))
    # the stacked matrices' bf16 matmuls give torch's one-by-one bits
    assert all(torch.equal(a, b) for a, b in zip(torchs, bf16, strict=True))
    # fp32's orthogonalization is torch's iteration without bf16's rounding: close, not equal
    for a, b in zip(torchs, fp32, strict=True):
        assert not torch.equal(a, b) and torch.allclose(a, b, atol=2e-3)
    # fp32's result is an (approximately) orthogonal update: singular values within Newton-Schulz's band
    sv = torch.linalg.svdvals(orthogonalized(torch.randn(24, 96)))
    assert sv.min() > 0.5 and sv.max() < 1.3


def orthogonalized(g: torch.Tensor) -> torch.Tensor:
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS

    from pipelines.core.optim import orthogonalize

    return orthogonalize([g], (DEFAULT_A, DEFAULT_B, DEFAULT_C), DEFAULT_NS_STEPS, 1e-7, torch.float32)[0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_round_trip_continues_bit_identically(optimizer):
    # what a checkpoint keeps of the optimizers is all a resumed run needs: 3 + 3 steps through a
    # save and load equal 6 straight steps, bit for bit
    from pipelines.core.optim import make_optimizer
    from pipelines.core.params import TrainParams

    cfg = TrainParams(optimizer=optimizer, n_layer=2, n_head=2, n_embd=32, block_size=16)
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(MODERN))
        return model, make_optimizer(model, cfg, bf16=False)

    def steps(model, opt, n):
        for _ in range(n):
            opt.set_lr_scale(0.5)
            _, loss = model(idx, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()

    straight, opt = fresh()
    steps(straight, opt, 6)
    first, opt = fresh()
    steps(first, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt = fresh()
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    steps(resumed, opt, 3)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(opt.optimizers) == (2 if optimizer == "muon" else 1)


def attention_grads(fn, q, k, v, dout) -> list[torch.Tensor]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(dout)
    return [t.grad.float() for t in (q, k, v)]


def test_cpu_bf16_attention_forward_is_the_flash_kernels_and_its_backward_as_close_to_fp32():
    from pipelines.core.model import CausalAttentionCPU

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 3, 64, 16, generator=g) for _ in range(4))
    bf = [t.bfloat16() for t in (q, k, v, dout)]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    assert torch.equal(CausalAttentionCPU.apply(*bf[:3]), sdpa(*bf[:3]))
    exact = attention_grads(sdpa, q, k, v, dout)
    kernels = attention_grads(sdpa, *bf)
    recomputed = attention_grads(CausalAttentionCPU.apply, *bf)
    for ref, kernel, ours in zip(exact, kernels, recomputed, strict=True):
        kernel_error = (kernel - ref).norm() / ref.norm()
        assert 0 < (ours - ref).norm() / ref.norm() < 2 * kernel_error  # bf16, but no worse than torch's


def test_compiled_bf16_training_on_a_cpu_takes_the_recomputing_backward_and_eager_does_not():
    from pipelines.core.model import CausalSelfAttention

    torch.manual_seed(0)
    ours = CausalSelfAttention(GPTConfig(n_embd=32, n_head=2))
    kernels = copy.deepcopy(ours)
    kernels.cpu_bf16_backward = False
    x = torch.randn(2, 16, 32)

    def input_grad(module, bf16: bool = True) -> torch.Tensor:
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            module(xi).float().square().sum().backward()
        return xi.grad

    assert torch.equal(input_grad(ours), input_grad(kernels))  # eager: the flash kernel both
    exact = input_grad(ours, bf16=False)
    compiled, compiled_kernels = input_grad(torch.compile(ours)), input_grad(torch.compile(kernels))
    assert not torch.equal(compiled, compiled_kernels)  # the recomputing backward ran
    for grad in (compiled, compiled_kernels):
        assert torch.allclose(grad, exact, rtol=0.05, atol=0.05)
