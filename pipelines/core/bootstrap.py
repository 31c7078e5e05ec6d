"""The promotion gate's statistics: a paired bootstrap of the difference in bits per byte between
two models scored on the same documents, and the version tags that keep its interval.

No command of its own: publish calls it (`trainpipe publish`, the flow's last step), and anything
that shows a version (`trainpipe status`, `history`) reads the interval back with read_bpb_delta.

Documents are resampled with replacement, the same resample for both models (paired), and each
resample's statistic is sum(bits)/sum(bytes) of the challenger minus the same of the champion: the
aggregate bits per byte, not a mean of per-document ratios, so a short file weighs what its bytes
weigh. The interval is the 2.5th and 97.5th percentiles of the resampled differences.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
# version tags of the challenger: the difference, its interval, and what it was measured against
DELTA_TAGS = {
    "delta": "bpb_delta",
    "low": "bpb_delta_low",
    "high": "bpb_delta_high",
    "vs": "bpb_delta_vs",
    "documents": "bpb_delta_documents",
    "resamples": "bpb_delta_resamples",
}
_MAX_DRAWS = 1 << 22  # document indices drawn at once: bounds memory on a large validation set


@dataclass(frozen=True)
class BpbDelta:
    """Challenger minus champion in bits per byte, on all documents, with its 95% interval."""

    delta: float
    low: float
    high: float
    documents: int
    resamples: int
    vs: str | None = None  # the champion version it was measured against

    def text(self) -> str:
        """'-0.0040 bpb [-0.0110, +0.0030]': the interval kept whole on one line."""
        return f"{_signed(self.delta)} bpb [{_signed(self.low)}, {_signed(self.high)}]"

    def tags(self) -> dict[str, str]:
        values = {k: getattr(self, k) for k in DELTA_TAGS}
        return {tag: str(values[k]) if k == "vs" else repr(values[k]) for k, tag in DELTA_TAGS.items()}


def _signed(value: float) -> str:
    return f"{value + 0.0:+.4f}"  # + 0.0: -0.0 reads +0.0000


def paired_bootstrap(
    bits: Sequence[float],
    baseline_bits: Sequence[float],
    doc_bytes: Sequence[int],
    resamples: int,
    seed: int,
    vs: str | None = None,
) -> BpbDelta:
    """bits and baseline_bits: each document's bits under the two models, in the same order;
    doc_bytes: each document's UTF-8 bytes. Deterministic for a given seed."""
    a, b = np.asarray(bits, dtype=np.float64), np.asarray(baseline_bits, dtype=np.float64)
    n_bytes = np.asarray(doc_bytes, dtype=np.float64)
    if not (len(a) == len(b) == len(n_bytes)) or len(a) == 0:
        raise ValueError(f"per-document scores of unequal or no length: {len(a)}, {len(b)}, {len(n_bytes)}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    diff = a - b
    total = n_bytes.sum()
    delta = a.sum() / total - b.sum() / total
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    rows = max(1, _MAX_DRAWS // len(diff))
    for start in range(0, resamples, rows):
        idx = rng.integers(0, len(diff), size=(min(rows, resamples - start), len(diff)))
        stats[start : start + len(idx)] = diff[idx].sum(axis=1) / n_bytes[idx].sum(axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return BpbDelta(float(delta), float(low), float(high), len(diff), resamples, vs)


def read_bpb_delta(tags: Mapping[str, str]) -> BpbDelta | None:
    """The interval a version's tags keep, or None: a first version, one published before the gate
    had intervals, or tags that are not whole."""
    try:
        values = {k: tags[tag] for k, tag in DELTA_TAGS.items()}
        found = BpbDelta(
            delta=float(values["delta"]),
            low=float(values["low"]),
            high=float(values["high"]),
            documents=int(values["documents"]),
            resamples=int(values["resamples"]),
            vs=values["vs"] or None,
        )
    except (KeyError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (found.delta, found.low, found.high)):
        return None
    return found
