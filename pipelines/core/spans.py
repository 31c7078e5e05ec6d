"""The spans file: where curate replaced a secret, as a length and a hash, never the text.

Curate writes one line per placeholder of the curated data (reports/scrubbed_spans.jsonl); the
memorization check (pipelines/core/memorization.py) reads it. Apart from that module so that
curate's workers need no torch to write it.
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

SPANS_FILE = "scrubbed_spans.jsonl"  # written by curate next to its reports; one span a line
SPAN_FIELDS = ("path", "offset", "kind", "length", "sha256")


def span_record(path: str, offset: int, kind: str, removed: str) -> dict:
    """One line of the spans file: where the placeholder stands and what it replaced, as a length
    and a hash; the removed text itself is never kept."""
    return {
        "path": path,
        "offset": offset,
        "kind": kind,
        "length": len(removed),
        "sha256": hashlib.sha256(removed.encode("utf-8")).hexdigest(),
    }


def write_spans(records: Iterable[dict], path: str | Path) -> Path:
    """The spans file, one JSON object a line in the order given (curate: path, then offset),
    written whole or not at all."""
    from pipelines.core.data import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps({k: record[k] for k in SPAN_FIELDS}, ensure_ascii=False) + "\n")
    return path


def read_spans(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
