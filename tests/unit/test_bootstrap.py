"""The promotion gate's paired bootstrap on hand-computed cases, and its interval as version tags."""

import math

import numpy as np
import pytest

from pipelines.core import bootstrap
from pipelines.core.bootstrap import DELTA_TAGS, BpbDelta, paired_bootstrap, read_bpb_delta


def test_identical_scores_give_a_zero_interval():
    bits = [120.0, 33.5, 410.25, 7.0]
    delta = paired_bootstrap(bits, bits, [50, 20, 200, 3], resamples=2000, seed=0)
    assert (delta.delta, delta.low, delta.high) == (0.0, 0.0, 0.0)
    assert (delta.documents, delta.resamples) == (4, 2000)
    assert delta.text() == "+0.0000 bpb [+0.0000, +0.0000]"


def test_a_constant_shift_in_bits_per_byte_gives_an_interval_of_that_one_point():
    # the challenger is 0.25 bits per byte better on every document: every resample says so
    doc_bytes = [100, 250, 40, 900, 10]
    champion = [2.0 * n for n in doc_bytes]
    challenger = [1.75 * n for n in doc_bytes]
    delta = paired_bootstrap(challenger, champion, doc_bytes, resamples=2000, seed=3)
    assert delta.delta == pytest.approx(-0.25)
    assert delta.low == pytest.approx(-0.25) and delta.high == pytest.approx(-0.25)
    assert delta.text() == "-0.2500 bpb [-0.2500, -0.2500]"


def test_two_documents_by_hand():
    # Challenger minus champion: -10 bits on a 10-byte document, 0 on a 90-byte one.
    # All docs: -10 / 100 = -0.1 (bytes weigh; a mean of per-document ratios would say -0.5).
    # The four equally likely resamples: (0, 0) -20/20 = -1, (1, 1) 0/180 = 0, and (0, 1), (1, 0)
    # -10/100 = -0.1. A quarter of the resamples sit at each end, so the 2.5th and 97.5th
    # percentiles are -1 and 0.
    delta = paired_bootstrap([5.0, 90.0], [15.0, 90.0], [10, 90], resamples=2000, seed=0)
    assert delta.delta == pytest.approx(-0.1)
    assert (delta.low, delta.high) == (pytest.approx(-1.0), pytest.approx(0.0))


def test_the_interval_is_the_percentiles_of_the_paired_resamples():
    # the same draws, written out: documents resampled with replacement, one index set for both
    rng = np.random.default_rng(11)
    bits, base, n = rng.uniform(50, 150, 30), rng.uniform(50, 150, 30), rng.integers(20, 80, 30)
    idx = np.random.default_rng(5).integers(0, 30, size=(2000, 30))
    stats = bits[idx].sum(1) / n[idx].sum(1) - base[idx].sum(1) / n[idx].sum(1)
    delta = paired_bootstrap(bits, base, n, resamples=2000, seed=5)
    assert (delta.low, delta.high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), rel=1e-12)
    assert delta.delta == pytest.approx(bits.sum() / n.sum() - base.sum() / n.sum(), rel=1e-12)


def test_drawing_in_chunks_does_not_change_the_interval(monkeypatch):
    # a large validation set is resampled a few rows at a time, to bound memory
    rng = np.random.default_rng(4)
    bits, base, n = rng.uniform(50, 150, 30), rng.uniform(50, 150, 30), rng.integers(20, 80, 30)
    whole = paired_bootstrap(bits, base, n, resamples=2000, seed=5)
    monkeypatch.setattr(bootstrap, "_MAX_DRAWS", 30 * 7)  # 7 resamples at a time
    assert paired_bootstrap(bits, base, n, resamples=2000, seed=5) == whole


def test_the_interval_matches_the_normal_approximation_on_many_documents():
    # 400 documents of equal size, differences with mean 0 and sd 1 bit per byte: the interval
    # is about +-1.96 sd / sqrt(400) = +-0.098 around the mean difference
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 1, 400)
    delta = paired_bootstrap(100 + diff, np.full(400, 100.0), np.ones(400), resamples=4000, seed=1)
    half = 1.96 * diff.std() / math.sqrt(400)
    assert delta.low == pytest.approx(delta.delta - half, abs=0.15 * half)
    assert delta.high == pytest.approx(delta.delta + half, abs=0.15 * half)


def test_the_same_seed_gives_the_same_interval_and_another_seed_nearly_so():
    rng = np.random.default_rng(2)
    bits, base, n = rng.uniform(50, 150, 40), rng.uniform(50, 150, 40), rng.integers(20, 80, 40)
    first = paired_bootstrap(bits, base, n, resamples=2000, seed=9)
    assert paired_bootstrap(bits, base, n, resamples=2000, seed=9) == first
    other = paired_bootstrap(bits, base, n, resamples=2000, seed=10)
    assert other != first and other.delta == first.delta
    assert other.low == pytest.approx(first.low, abs=0.1 * (first.high - first.low))
    assert first.low < first.delta < first.high


@pytest.mark.parametrize(
    ("bits", "base", "doc_bytes"),
    [([1.0], [1.0, 2.0], [1, 2]), ([1.0, 2.0], [1.0, 2.0], [1]), ([], [], [])],
)
def test_unpaired_or_empty_scores_are_refused(bits, base, doc_bytes):
    with pytest.raises(ValueError, match="per-document scores"):
        paired_bootstrap(bits, base, doc_bytes, resamples=2000, seed=0)


def test_an_interval_round_trips_through_version_tags():
    delta = BpbDelta(-0.004, -0.011, 0.003, documents=87, resamples=2000, vs="4")
    tags = delta.tags()
    assert set(tags) == set(DELTA_TAGS.values())
    assert tags["bpb_delta_vs"] == "4" and tags["bpb_delta_high"] == "0.003"
    assert read_bpb_delta({**tags, "other": "x"}) == delta
    assert delta.text() == "-0.0040 bpb [-0.0110, +0.0030]"


@pytest.mark.parametrize(
    "tags",
    [
        {},  # a first version, or one published before the interval
        {**BpbDelta(-0.1, -0.2, 0.0, 5, 2000, "1").tags(), "bpb_delta_low": "not a number"},
        {k: v for k, v in BpbDelta(-0.1, -0.2, 0.0, 5, 2000, "1").tags().items() if k != "bpb_delta_high"},
        {**BpbDelta(-0.1, -0.2, 0.0, 5, 2000, "1").tags(), "bpb_delta": "nan"},
    ],
)
def test_tags_without_a_whole_interval_read_as_none(tags):
    assert read_bpb_delta(tags) is None
