"""Document tables as numbered Parquet shards: how the data stages hold a corpus larger than memory.

    data/raw/part-00000.parquet, part-00001.parquet, ...        ingest: path, content (bytes)
    data/curated/part-00000.parquet, ...                         curate: path, text, sha256, n_bytes, scrubbed

A shard holds data.shard_bytes of content on average; the order of the documents is the order of
the shards, then of the rows in each. Where a shard ends is drawn from each document's own path
and size (ends_shard), not from a running total: a changed, added or removed file moves the
boundaries around it only, so the other shards come out byte for byte as in the last run, and
curate reuses its analysis of them. Curate writes shard i of its outputs from shard i of ingest's, so
a document keeps its place, and readers stream the rows batch by batch (iter_documents): no stage
holds more than a shard's rows at once. Each shard is written to a temporary name and renamed, so a
killed writer leaves either the whole shard or none.
"""

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.core.data import write_documents

SHARD_GLOB = "part-*.parquet"
_SHARD_RE = re.compile(r"part-(\d{5})\.parquet")
READ_BATCH_ROWS = 256  # rows decoded at once while a shard is streamed
MAX_SHARD_FACTOR = 3  # a shard ends at this many times shard_bytes whatever its documents draw


def ends_shard(path: str, size: int, shard_bytes: int) -> bool:
    """Whether a shard ends after this document: a draw from a hash of its path, true with a chance
    of size / shard_bytes, so that shards hold shard_bytes on average (about 5% reach the cap of
    MAX_SHARD_FACTOR times it). The same document always draws the same."""
    draw = int.from_bytes(hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return draw < size * 2**64 / shard_bytes


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_shards(folder: str | Path) -> list[Path]:
    """The folder's shards in order (part-00000 first); none for a folder that does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD_RE.fullmatch(p.name))


def clear_shards(folder: str | Path) -> None:
    """Remove every shard (and half-written temporary file) of a folder, before it is rewritten:
    a run with fewer shards must not leave the last run's extra ones for readers to find."""
    for path in list_shards(folder):
        path.unlink()
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".part-*.tmp"):
            tmp.unlink()


def write_shard(records: list[dict], folder: str | Path, index: int) -> Path:
    """Shard `index` of a folder: write_documents' Parquet layout, renamed into place when whole."""
    return write_documents(records, folder, name=shard_name(index))


def iter_documents(
    folder: str | Path, columns: list[str] | None = None, batch_rows: int = READ_BATCH_ROWS
) -> Iterator[dict]:
    """Every row of a folder's shards as a dict, in order, a batch of rows at a time."""
    import pyarrow.parquet as pq

    for path in list_shards(folder):
        with pq.ParquetFile(path) as shard:
            for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()


def read_shard(path: str | Path, columns: list[str] | None = None) -> list[dict]:
    """One whole shard's rows: what a worker holds at once."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as shard:
        return shard.read(columns=columns).to_pylist()


def read_documents(folder: str | Path, columns: list[str] | None = None) -> list[dict]:
    """A whole folder's rows in a list: for small tables and tests; stages stream iter_documents."""
    if not list_shards(folder):
        raise FileNotFoundError(f"{folder} holds no {SHARD_GLOB}: run the stage that writes it first")
    return list(iter_documents(folder, columns))


class ShardWriter:
    """Records in, shards of shard_bytes on average out (counted on the given field, cut where
    ends_shard draws on the "path" field), in order.

    with ShardWriter(folder, 4_000_000) as shards:
        for record in records:
            shards.add(record)
    """

    def __init__(self, folder: str | Path, shard_bytes: int, size_field: str = "content"):
        self.folder = Path(folder)
        self.shard_bytes = shard_bytes
        self.size_field = size_field
        self.shards = 0
        self.documents = 0
        self.bytes = 0
        self._pending: list[dict] = []
        self._pending_bytes = 0

    def __enter__(self) -> "ShardWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        clear_shards(self.folder)
        return self

    def add(self, record: dict) -> None:
        size = len(record[self.size_field] or b"")
        self._pending.append(record)
        self._pending_bytes += size
        self.documents += 1
        self.bytes += size
        if (
            ends_shard(record["path"], size, self.shard_bytes)
            or self._pending_bytes >= MAX_SHARD_FACTOR * self.shard_bytes
        ):
            self.flush()

    def extend(self, records: Iterable[dict]) -> None:
        for record in records:
            self.add(record)

    def flush(self) -> None:
        if self._pending:
            write_shard(self._pending, self.folder, self.shards)
            self.shards += 1
            self._pending, self._pending_bytes = [], 0

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.flush()
