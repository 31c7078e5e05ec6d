"""Continuous batching (pipelines/core/decode.py, scheduler.py): a row's output does not depend on
its batch-mates, requests join and leave between steps, and the bounds answer at once."""

import gc
import threading
import time
import weakref

import pytest
import torch

from pipelines.core.decode import SlotCache, prefill, row_seed
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.scheduler import (
    ContinuousBatcher,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    SamplingParams,
)

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, top_k=0, seed=0)
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, seed=11)
# mixed lengths: 1 to 40 tokens
PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((1, 5, 12, 40, 3, 27))]


def make_model(positions: str = "rope") -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=96, n_layer=2, n_head=2, n_embd=64, positions=positions)
    return GPT(config).eval()


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    return make_model(request.param)


def run(batcher: ContinuousBatcher, prompts, params, timeout_s: float = 60.0) -> list[list[int]]:
    return batcher.result(batcher.submit(prompts, params, timeout_s))


def test_greedy_rows_in_a_batch_are_token_for_token_each_row_alone(model):
    batcher = ContinuousBatcher(model, max_batch=8, max_queued=8)
    alone = [run(batcher, [p], GREEDY)[0] for p in PROMPTS]
    together = run(batcher, PROMPTS, GREEDY)
    assert together == alone
    assert batcher.rows_stepped / batcher.steps > 1  # they were stepped together
    # and each is what the reference generation (GPT.generate, one sequence) gives
    for prompt, out in zip(PROMPTS, alone, strict=True):
        ref = model.generate(torch.tensor([prompt]), GREEDY.max_new_tokens, temperature=0.0)
        assert ref[0, len(prompt) :].tolist() == out


def test_a_sampled_row_draws_the_same_whatever_else_is_in_the_batch(model):
    batcher = ContinuousBatcher(model, max_batch=16, max_queued=8)
    base = run(batcher, PROMPTS, SAMPLED)
    more = run(batcher, PROMPTS + [[3, 4, 5]] * 5, SAMPLED)[: len(PROMPTS)]
    assert more == base
    # row i of a request samples with row_seed(seed, i): alone, with that seed, it draws the same
    for row, prompt in enumerate(PROMPTS):
        alone = SamplingParams(**{**SAMPLED.__dict__, "seed": row_seed(SAMPLED.seed, row)})
        assert run(batcher, [prompt], alone)[0] == base[row]
    # rows of one request get their own generators: one prompt twice gives two draws
    twice = run(batcher, [PROMPTS[2], PROMPTS[2]], SAMPLED)
    assert twice[0] != twice[1]


def test_two_requests_in_flight_at_once_share_steps_and_answer_as_alone(model):
    batcher = ContinuousBatcher(model, max_batch=8, max_queued=8)
    alone = [run(batcher, [p], GREEDY)[0] for p in PROMPTS[:2]]
    steps_before = batcher.steps
    first = batcher.submit([PROMPTS[0]], GREEDY, 60)
    second = batcher.submit([PROMPTS[1]], GREEDY, 60)
    assert [batcher.result(first)[0], batcher.result(second)[0]] == alone
    assert batcher.steps - steps_before < 2 * (GREEDY.max_new_tokens - 1)  # not one after the other


def test_a_new_request_joins_the_next_step_and_a_short_one_returns_first(model):
    batcher = ContinuousBatcher(model, max_batch=8, max_queued=8)
    long = batcher.submit([PROMPTS[3]], SamplingParams(56, 0.0, 0, 0), 60)
    while batcher.steps < 3:  # the long one is decoding
        time.sleep(0.001)
    short = batcher.submit([PROMPTS[1]], SamplingParams(2, 0.0, 0, 0), 60)
    assert len(batcher.result(short)[0]) == 2
    assert not long.done.is_set()  # it returned while the long one still decodes
    assert len(batcher.result(long)[0]) == 56


def test_a_row_that_draws_the_stop_token_leaves_and_the_others_go_on(model):
    alone = run(ContinuousBatcher(model, 8, 8), PROMPTS, GREEDY)
    stop = alone[2][3]  # a token row 2 draws is the stop token now
    batcher = ContinuousBatcher(model, max_batch=8, max_queued=8, stop_token=stop)
    out = run(batcher, PROMPTS, GREEDY)
    for row, (seq, ref) in enumerate(zip(out, alone, strict=True)):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert seq == ref[:cut], row  # the stop token ends the row and is left out
    assert len(out[2]) <= 3 < len(alone[2])
    assert any(len(seq) == GREEDY.max_new_tokens for seq in out)  # rows that never drew it went on


def test_more_rows_than_slots_wait_for_one_and_still_answer_as_alone(model):
    batcher = ContinuousBatcher(model, max_batch=2, max_queued=8)
    assert run(batcher, PROMPTS, GREEDY) == [run(batcher, [p], GREEDY)[0] for p in PROMPTS]


def test_past_the_queue_bound_submit_refuses_at_once():
    model = make_model()
    batcher = ContinuousBatcher(model, max_batch=1, max_queued=1)
    long = SamplingParams(90, 0.0, 0, 0)
    running = batcher.submit([[1]], long, 60)
    while batcher.steps < 1:
        time.sleep(0.001)
    queued = batcher.submit([[2]], long, 60)  # waits for the one slot
    started = time.monotonic()
    with pytest.raises(QueueFull, match="1 requests already wait"):
        batcher.submit([[3]], long, 60)
    assert time.monotonic() - started < 0.5
    assert len(batcher.result(running)[0]) == 90 and len(batcher.result(queued)[0]) == 90


def test_a_request_past_its_time_limit_fails_and_frees_its_slot():
    model = make_model()
    batcher = ContinuousBatcher(model, max_batch=1, max_queued=4)
    late = batcher.submit([[1]], SamplingParams(90, 0.0, 0, 0), timeout_s=0.02)
    with pytest.raises(RequestTimeout):
        batcher.result(late)
    assert run(batcher, [[5, 6]], GREEDY)  # the slot is free again
    assert len(batcher._active) == 0


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_slot():
    model = make_model()
    batcher = ContinuousBatcher(model, max_batch=1, max_queued=4)
    gone = threading.Event()
    abandoned = batcher.submit([[1]], SamplingParams(90, 0.0, 0, 0), 60, cancelled=gone)
    while batcher.steps < 2:
        time.sleep(0.001)
    gone.set()
    with pytest.raises(RequestCancelled):
        batcher.result(abandoned)
    steps = batcher.steps
    assert run(batcher, [[5, 6]], GREEDY)
    assert batcher.steps - steps < 90  # it did not decode the abandoned one to its end first


def test_broken_weights_fail_the_request_with_one_line_and_the_loop_serves_on():
    model = make_model()
    batcher = ContinuousBatcher(model, max_batch=4, max_queued=4)
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits are not finite"):
        run(batcher, [[1, 2], [3]], SAMPLED)
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)
    assert len(run(batcher, [[1, 2]], GREEDY)[0]) == GREEDY.max_new_tokens  # the loop serves on


def test_the_loop_ends_when_idle_and_keeps_no_model_alive():
    model = make_model()
    batcher = ContinuousBatcher(model, max_batch=4, max_queued=4)
    run(batcher, PROMPTS[:3], GREEDY)
    deadline = time.monotonic() + 5
    while batcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher._thread is None
    gone = weakref.ref(model)
    del model, batcher
    gc.collect()
    assert gone() is None  # a swapped-out version is freed once its last request returned


def test_a_slot_freed_in_the_middle_takes_the_last_row_and_its_keys():
    """move() keeps the rows contiguous: the moved row's later tokens are still its own."""
    model = make_model()
    cache = SlotCache(model.config, slots=3)
    with torch.inference_mode():
        for slot, ids in enumerate(([1, 2, 3], [4, 5], [6, 7, 8, 9])):
            prefill(model, cache, slot, ids)
        cache.move(2, 0)  # row 0 leaves; the last row takes slot 0
        positions = torch.tensor([4])
        cache.begin_step(positions)
        stepped = model.step_rows(torch.tensor([10]), positions, cache)
        ref, _ = model(torch.tensor([[6, 7, 8, 9, 10]]))
    torch.testing.assert_close(stepped[0], ref[0, -1], rtol=1e-4, atol=1e-4)
