import math

import pytest
import torch

from pipelines.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    a = torch.randint(0, TINY.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % TINY.vocab_size  # change only the future
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
