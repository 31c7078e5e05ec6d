"""Continuous batching: one decode loop steps every active sequence of every request together.

    batcher = ContinuousBatcher(model, max_batch=64, max_queued=64, stop_token=eot_id)
    request = batcher.submit([ids_a, ids_b], Limits(...), SamplingParams(...), timeout_s=60)
    outputs = batcher.result(request)      # [new ids of a, new ids of b]; blocks this thread only

Iteration-level scheduling, as in Orca and vLLM: callers (the scoring server's request threads)
queue sequences; a loop thread admits queued sequences into free slots between two steps (each
runs its prompt through the model alone, the prefill, and draws its first token), then steps
every admitted sequence by one token. A sequence that draws the stop token or its last token
leaves at once: its request returns as soon as its last sequence has, and its slot takes the
next queued one. Nothing waits for a batch to drain.

Bounds: at most max_batch sequences in a step; at most max_queued requests waiting for a slot
(beyond, submit raises QueueFull at once); a request past its deadline, or whose `cancelled`
event is set (its client has gone), leaves at the next step and frees its slots.

The loop thread runs only while there is work, and a batcher belongs to one model: when the
endpoint swaps versions, the old version's sequences finish on it, its loop ends, and nothing
keeps the old weights alive.
"""

import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pipelines.core.decode import Sampling, SlotCache, next_tokens, prefill, row_seed
from pipelines.core.model import GPT


class QueueFull(Exception):
    """Too many requests wait for a slot: try again later."""


class RequestTimeout(Exception):
    """The request ran past its deadline."""


class RequestCancelled(Exception):
    """The request was abandoned (its client has gone) before it finished."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int


class Request:
    """The sequences of one call: done once each has finished, or the first error."""

    def __init__(self, rows: int, deadline: float, cancelled: threading.Event | None):
        self.outputs: list[list[int] | None] = [None] * rows
        self.deadline = deadline
        self.cancelled = cancelled or threading.Event()
        self.remaining = rows
        self.error: Exception | None = None
        self.done = threading.Event()

    def abandoned(self, now: float) -> Exception | None:
        if self.error is not None:
            return self.error
        if self.cancelled.is_set():
            return RequestCancelled("the request was cancelled: its client has gone")
        if now >= self.deadline:
            return RequestTimeout("the request ran past its time limit")
        return None


@dataclass(eq=False)
class Sequence:
    request: Request
    row: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    new: list[int] = field(default_factory=list)
    position: int = 0  # where the next token fed to the model stands


class ContinuousBatcher:
    def __init__(
        self, model: GPT, max_batch: int, max_queued: int, stop_token: int | None = None, threads: int = 1
    ):
        self.model = model
        # torch's intra-op threads in the loop. One by default: from any thread but the main one,
        # PyTorch's OpenMP pays about 0.1 ms per parallel region (pytorch/pytorch#37259), and a
        # step is over a hundred small ops: 2 threads made a step 3-4x slower on a 2-core host.
        self.threads = threads
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.stop_token = stop_token
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._thread: threading.Thread | None = None
        self._active: list[Sequence] = []  # row i holds slot i; the loop thread alone touches it
        self._cache: SlotCache | None = None
        self.steps = 0  # decode steps taken, and rows stepped in them: the mean batch is their ratio
        self.rows_stepped = 0

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        timeout_s: float,
        cancelled: threading.Event | None = None,
    ) -> Request:
        """Queue one request's prompts (token ids, each short enough to leave room for
        max_new_tokens in the context); QueueFull when max_queued requests already wait."""
        request = Request(len(prompts), time.monotonic() + timeout_s, cancelled)
        sequences = [
            Sequence(
                request,
                row,
                ids,
                params.max_new_tokens,
                Sampling(params.temperature, params.top_k, random.Random(row_seed(params.seed, row))),
            )
            for row, ids in enumerate(prompts)
        ]
        with self._lock:
            # queued: the requests with a row that the next admission leaves waiting
            free = max(0, self.max_batch - len(self._active))
            queued = len({id(s.request) for s in itertools.islice(self._waiting, free, None)})
            if len(self._waiting) + len(sequences) > free and queued >= self.max_queued:
                raise QueueFull(f"{queued} requests already wait for a slot")
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
                self._thread.start()
        return request

    def result(self, request: Request) -> list[list[int]]:
        """Wait for the request's new token ids (stop tokens left out), or raise its error."""
        if not request.done.wait(max(0.0, request.deadline - time.monotonic()) + 5.0):
            request.cancelled.set()  # the loop is stuck in one long step: give up on it
            raise RequestTimeout("the request ran past its time limit")
        if request.error is not None:
            raise request.error
        return [out or [] for out in request.outputs]

    # --- the loop thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        inherited = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except Exception as exc:  # a failing model fails what it holds; the next submit starts afresh
            with self._lock:
                self._thread = None
                waiting, self._waiting = list(self._waiting), deque()
            for seq in waiting + self._active:
                self._finish(seq, exc)
            self._active = []
        finally:  # the setting is process-wide for threads started later: leave it as found
            torch.set_num_threads(inherited)

    def _iterate(self) -> bool:
        """Admit what fits, then one step; False (the loop ends) when there is nothing to do."""
        now = time.monotonic()
        for seq in [s for s in self._active if s.request.abandoned(now)]:
            self._leave(seq, seq.request.abandoned(now))
        admitted = []
        with self._lock:
            for seq in [s for s in self._waiting if s.request.abandoned(now)]:
                self._waiting.remove(seq)
                self._finish(seq, seq.request.abandoned(now))
            while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
            if not self._active and not admitted:
                self._thread = None
                return False
        for seq in admitted:
            self._join(seq)
        if self._active:
            self._step()
        return True

    def _slots(self) -> SlotCache:
        if self._cache is None:
            weight = self.model.lm_head.weight
            self._cache = SlotCache(self.model.config, self.max_batch, weight.dtype, weight.device)
        return self._cache

    def _join(self, seq: Sequence) -> None:
        """The prefill: the prompt into the next free slot, and the sequence's first token."""
        slot = len(self._active)
        logits = prefill(self.model, self._slots(), slot, seq.prompt)
        tokens, errors = next_tokens(logits, [seq.sampling])
        self._active.append(seq)
        seq.position = len(seq.prompt)
        self._advance([seq], tokens, errors)

    def _step(self) -> None:
        cache, rows = self._slots(), self._active
        device = cache.k.device
        tokens = torch.tensor([s.new[-1] for s in rows], dtype=torch.long, device=device)
        positions = torch.tensor([s.position for s in rows], dtype=torch.long, device=device)
        cache.begin_step(positions)
        logits = self.model.step_rows(tokens, positions, cache)
        self.steps += 1
        self.rows_stepped += len(rows)
        for s in rows:
            s.position += 1
        new, errors = next_tokens(logits, [s.sampling for s in rows])
        self._advance(list(rows), new, errors)

    def _advance(self, rows: list[Sequence], tokens: list[int], errors: list[str | None]) -> None:
        """Append each row's token; rows that stop or fail leave."""
        for seq, token, error in zip(rows, tokens, errors, strict=True):
            if error is not None:
                self._leave(seq, ValueError(error))
                continue
            seq.new.append(token)
            if token == self.stop_token or len(seq.new) >= seq.max_new_tokens:
                self._leave(seq, None)

    def _leave(self, seq: Sequence, error: Exception | None) -> None:
        """Free the sequence's slot (the last row moves into it) and hand over its result."""
        slot, last = self._active.index(seq), len(self._active) - 1
        if slot != last:
            self._slots().move(last, slot)
            self._active[slot] = self._active[last]
        self._active.pop()
        self._finish(seq, error)

    def _finish(self, seq: Sequence, error: Exception | None) -> None:
        request = seq.request
        if error is not None:
            if request.error is None:
                request.error = error
                request.done.set()  # the caller returns now; its other rows leave at the next step
            return
        request.outputs[seq.row] = [t for t in seq.new if t != self.stop_token]
        request.remaining -= 1
        if request.remaining == 0 and request.error is None:
            request.done.set()
