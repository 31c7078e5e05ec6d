"""Evaluation slices: named parts of the validation set, chosen by patterns on each document's path,
scored apart by evaluate and gated apart by the promotion gate.

    evaluate.slices in params.yaml       # name -> gitignore-style patterns, e.g. tests: [test/, tests/]

A slice's patterns follow .gitignore's rules (pathspec, as data.include does), matched against the
document's path as curated holds it (relative to the source folder: `test/test_os.py`); the last
pattern that matches decides, so a `!pattern` takes documents back out. A document can be in
several slices, or in none: slices are views of the validation set, not a partition of it.

Evaluate writes each slice's bits per byte (reports/slices.json: the DVC metrics, and the MLflow
metrics val_bpb_slice_<name>). The gate (pipelines.commands.promotion) bootstraps challenger minus
champion on each slice's documents (paired_bootstrap, the gate's resamples and seed) and
slice_verdict decides: a slice of at least publish.slice_min_documents documents whose whole 95%
interval lies above +publish.slice_tolerance (its lower bound: surely worse by more than the
tolerance) blocks the promotion; a smaller slice is reported, not gated.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipelines.core.bootstrap import BpbDelta, paired_bootstrap

SLICES_FILE = "slices.json"  # evaluate's DVC metrics of the slices, apart from metrics.json
# a slice's name goes into metric names (MLflow, DVC): letters, digits, '_' and '-'
SLICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"
BPB_METRIC = "val_bpb_slice_"  # + name: the slice's held-out bits per byte
DOCUMENTS_METRIC = "val_documents_slice_"  # + name: how many scored documents it holds
UNSLICED_METRIC = "val_documents_in_no_slice"
SLICES_TAG = "bpb_delta_slices"  # the challenger's version tag: each slice's interval and verdict, as JSON
# The patterns that make a test file in the Python ecosystem (the stdlib's test/, ctypes/test/,
# idlelib/idle_test/, a package's tests/, pytest's test_*.py and *_test.py)
TEST_PATTERNS = ["test/", "tests/", "idle_test/", "test_*.py", "*_test.py"]
DEFAULT_SLICES = {
    "tests": TEST_PATTERNS,
    "modules": ["*.py", "*.pyi", *(f"!{p}" for p in TEST_PATTERNS)],
    "prose": ["*.md", "*.rst", "*.txt"],
}


def slice_members(paths: Sequence[str], slices: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """{slice name: the indices of the paths it holds}, in the order of slices and of paths."""
    import pathspec

    members = {}
    for name, patterns in slices.items():
        spec = pathspec.PathSpec.from_lines("gitignore", patterns)
        members[name] = [i for i, path in enumerate(paths) if spec.match_file(path)]
    return members


def slice_metrics(documents: Sequence[Mapping], slices: Mapping[str, Sequence[str]]) -> dict:
    """evaluate's per-slice figures from its per-document records (path, bits, bytes): each slice's
    bits per byte (none for a slice without documents), then each one's document count, then the
    count of documents in no slice. The same names in reports/slices.json and in MLflow."""
    members = slice_members([d["path"] for d in documents], slices)
    bpb = {}
    for name, idx in members.items():
        n_bytes = sum(int(documents[i]["bytes"]) for i in idx)
        if n_bytes:
            bpb[BPB_METRIC + name] = sum(float(documents[i]["bits"]) for i in idx) / n_bytes
    counts = {DOCUMENTS_METRIC + name: len(idx) for name, idx in members.items()}
    in_some = set().union(*members.values()) if members else set()
    return {**bpb, **counts, UNSLICED_METRIC: len(documents) - len(in_some)}


def slice_verdict(delta: BpbDelta | None, documents: int, tolerance: float, min_documents: int) -> str:
    """'blocks': surely worse by more than the tolerance (the interval's lower bound above
    +tolerance) on a slice of at least min_documents documents; 'passes': gated, and not that;
    'too small': fewer documents, reported only; 'empty': no document."""
    if delta is None or documents == 0:
        return "empty"
    if documents < min_documents:
        return "too small"
    return "blocks" if delta.low > tolerance else "passes"


@dataclass(frozen=True)
class SliceCheck:
    """One slice in the promotion gate: challenger minus champion on its documents."""

    name: str
    documents: int
    delta: BpbDelta | None  # None: the slice holds none of the scored documents
    verdict: str  # slice_verdict's

    @property
    def blocks(self) -> bool:
        return self.verdict == "blocks"

    def text(self) -> str:
        """'slice tests: +0.0300 bpb [+0.0200, +0.0400] on 36 documents'."""
        if self.delta is None:
            return f"slice {self.name}: no documents"
        return f"slice {self.name}: {self.delta.text()} on {self.documents} documents"

    def record(self) -> dict:
        found = {"documents": self.documents, "verdict": self.verdict}
        if self.delta is not None:
            found |= {"delta": self.delta.delta, "low": self.delta.low, "high": self.delta.high}
        return found


def check_slices(
    paths: Sequence[str],
    bits: Sequence[float],
    baseline_bits: Sequence[float],
    doc_bytes: Sequence[int],
    slices: Mapping[str, Sequence[str]],
    *,
    resamples: int,
    seed: int,
    tolerance: float,
    min_documents: int,
    vs: str | None = None,
) -> list[SliceCheck]:
    """The paired bootstrap of bits (challenger) minus baseline_bits (champion) on each slice's
    documents, with the seed and resamples of the whole set's, and each slice's verdict."""
    checks = []
    for name, idx in slice_members(paths, slices).items():
        delta = None
        if idx:
            delta = paired_bootstrap(
                [bits[i] for i in idx],
                [baseline_bits[i] for i in idx],
                [doc_bytes[i] for i in idx],
                resamples,
                seed,
                vs=vs,
            )
        checks.append(
            SliceCheck(name, len(idx), delta, slice_verdict(delta, len(idx), tolerance, min_documents))
        )
    return checks


def slice_tags(checks: Sequence[SliceCheck], tolerance: float, min_documents: int, vs: str) -> dict[str, str]:
    """The version tag that keeps the slices' part of the gate: its rule and each slice's record."""
    record = {
        "vs": vs,
        "tolerance": tolerance,
        "min_documents": min_documents,
        "slices": {c.name: c.record() for c in checks},
    }
    return {SLICES_TAG: json.dumps(record, separators=(",", ":"))}


def read_slice_tags(tags: Mapping[str, str]) -> dict | None:
    """What slice_tags kept on a version, or None (no tag: a first version, or one gated before slices)."""
    try:
        found = json.loads(tags[SLICES_TAG])
    except (KeyError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("slices"), dict) else None


VERDICT_TEXT = {
    "blocks": "surely worse by more than the tolerance: blocks",
    "passes": "passes",
    "too small": "reported, not gated",
    "empty": "not gated",
}


def slice_lines(record: Mapping) -> list[str]:
    """What read_slice_tags gives, a line a slice: its interval of challenger minus champion and
    its verdict, for `trainpipe publish` and `trainpipe run`."""
    lines = []
    for name, found in record["slices"].items():
        verdict = VERDICT_TEXT.get(found.get("verdict"), str(found.get("verdict")))
        if "delta" not in found:
            lines.append(f"slice {name}: no documents, {verdict}")
            continue
        delta = BpbDelta(found["delta"], found["low"], found["high"], found["documents"], 0)
        lines.append(f"slice {name}: {delta.text()} on {found['documents']} documents, {verdict}")
    return lines
