"""Shared data helpers: document tables on disk, the stable train/validation split, token arrays.

Layout written by the stages (the document tables are shards: pipelines/core/shards.py):
    data/raw/part-NNNNN.parquet      path (str), content (bytes, as ingested)
    data/curated/part-NNNNN.parquet  path (str), text (str, UTF-8, "\\n" newlines), sha256 (str), n_bytes (int)
    data/tokens/{train,val}.bin      flat uint16 token ids; meta.json; tokenizer.json
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

DOCUMENTS_FILE = "part-00000.parquet"  # a table written whole is shard 0 of its folder (core/shards.py)
TOKENIZER_FILE = "tokenizer.json"
TOKEN_DTYPE = np.uint16  # vocab_size is capped at 65535 by the schema
EOT = "<|endoftext|>"  # separates documents in the token stream


@cache
def _umask() -> int:
    """The process's umask, read without setting it where Linux allows (os.umask sets it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path, next to path, to write path's new content to; on leaving the block it is
    synced and renamed onto path, so a reader (or a crash) sees the old file or the new, never half.

    The name is unique (mkstemp), so two writers of one path never share it; if the block raises,
    the temporary file is removed and path is left as it was. mkstemp creates the file 0600, and
    it is only then given mode (default: what open() gives a new file under the umask), so a
    secret written with mode=0o600 is readable by no one else at any instant."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write data to path through atomic_path: all of it or, after a crash, the old file."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """atomic_write_bytes of text in UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: str | Path, obj, sort_keys: bool = True) -> None:
    """Write JSON atomically (atomic_write_text), so a crash never leaves half a report.

    sort_keys=False keeps obj's order: DVC shows metrics in the order of their file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sha256_file(*paths: str | Path) -> str:
    """One content hash over the files, read in chunks (weights and token arrays are large)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def is_validation(path: str, val_fraction: float) -> bool:
    """Held out iff a hash of the document's path falls below val_fraction.

    Depends on the path alone, so adding or removing other documents never moves a document
    between splits (the split is stable as the corpus changes).
    """
    digest = hashlib.sha1(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


# Dataset.to_parquet's layout (datasets 5.2: io/parquet.py and config.py), kept so that the bytes,
# and so DVC's hashes, are datasets' own: tests/integration/test_stages.py compares the two writers' files.
PARQUET_CDC = {"min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0}
PARQUET_ROW_GROUP_BYTES = 100 * 10**6
VALUE_DTYPES = {"string": "string", "binary": "binary", "int64": "int64", "double": "float64", "bool": "bool"}


def write_documents(records: list[dict], out_dir: str | Path, name: str = DOCUMENTS_FILE) -> Path:
    """Write records as Parquet, byte for byte as Hugging Face datasets writes them
    (`Dataset.from_list(records).to_parquet(path)`: its features in the schema metadata, row
    groups of at most 100 MB, content-defined chunking, snappy, dictionaries), with pyarrow alone:
    importing datasets costs a stage about a second, more than the write."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / name
    with atomic_path(out_path) as tmp:  # a killed writer leaves the whole file or none
        _write_table(records, tmp)
    return out_path


def _write_table(records: list[dict], tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records)
    dtypes = [VALUE_DTYPES.get(str(f.type)) for f in table.schema]
    if not records or None in dtypes:  # a nested or unusual column: datasets itself
        from datasets import Dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # one table write: a progress bar here is noise
        Dataset.from_list(records).to_parquet(str(tmp))
        return
    features = {
        f.name: {"dtype": dtype, "_type": "Value"} for f, dtype in zip(table.schema, dtypes, strict=True)
    }
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    rows_per_group = max(1, table.num_rows * PARQUET_ROW_GROUP_BYTES // table.nbytes) if table.nbytes else 1
    columns = table.schema.names
    with pq.ParquetWriter(
        tmp,
        schema=table.schema,
        use_content_defined_chunking=PARQUET_CDC,
        write_page_index=True,
        compression=dict.fromkeys(columns, "snappy"),
        use_dictionary=columns,
        column_encoding={},
    ) as writer:
        for start in range(0, table.num_rows, rows_per_group):
            writer.write_table(table.slice(start, rows_per_group))
        writer.add_key_value_metadata({"content_defined_chunking": json.dumps(PARQUET_CDC)})


def load_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a flat token array (no copy into RAM)."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
