"""Ingest: snapshot the source into data/raw as Parquet shards (part-NNNNN.parquet), one record per document.

    python -m pipelines.stages.ingest            # what `dvc repro ingest` runs
    trainpipe ingest -S data.source='docs/**/*.txt'

Sources: "python-stdlib" (every .py file of the running interpreter's standard library, as
raw bytes: decoding is curate's job, so files in legacy encodings arrive as they are), or a
local file, folder or glob.
- A file or a glob names its files directly: text files (.txt, .py, .md, ...) become one record
  each with their raw bytes; .jsonl/.json, .parquet and .csv files are tables, read through
  Hugging Face `datasets`, one record per row, taking the text from data.text_field.
- A folder is a tree of documents: the files that data.include names and data.exclude does not
  (gitignore-style patterns on the path relative to the folder; an excluded folder is not
  walked), each one record of raw bytes, tables included (a stray .json is text, or left out by
  the default patterns, never a table without a text column). Binary files (a NUL byte in the
  first 8 KB) are skipped and counted.
The source is read as a stream: files one at a time in path order, a table's rows in batches, into
shards of data.shard_bytes on average (pipelines/core/shards.py), so memory holds one shard, whatever
the source's size. The size check against curate.gate.max_bytes runs first, on the files' sizes.
Under DVC, ingest depends on data/inputs/source.json, the manifest of the source's files that
the inputs stage writes on every repro: an added, removed or edited file re-runs ingest.
"""

import glob
import itertools
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipelines.core.data import write_json
from pipelines.core.errors import GateError, SourceError
from pipelines.core.params import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Params
from pipelines.core.shards import ShardWriter, clear_shards

STDLIB = "python-stdlib"
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BINARY_SNIFF_BYTES = 8000  # git's own test for a binary file: a NUL byte in its first 8000 bytes
TABLE_BATCH_ROWS = 10_000  # rows of a table file held at once while it is read
SKIPPED_EXAMPLES = 10  # skipped files named in ingest.json; the rest are counted


class Source(NamedTuple):
    root: Path  # what record names are relative to
    files: list[Path]
    folder: bool = False  # a folder source: every file is a document, tables included
    left_out: int = 0  # a folder's files that data.include / data.exclude leave out (in walked folders)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The .py files of this interpreter's standard library, installed packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        # not walked at all: site-packages can hold 25 times the stdlib's files (measured here)
        dirs[:] = [d for d in dirs if d != "site-packages"]
        files += [Path(folder, n) for n in names if n.endswith(".py") and Path(folder, n).is_file()]
    return root, files


def folder_files(root: Path, include: list[str], exclude: list[str]) -> tuple[list[Path], int]:
    """(files of the folder that include names and exclude does not, how many others were seen).

    Patterns follow .gitignore's rules (pathspec, as DVC's .dvcignore): `*.py` or `**/*.py` at
    any depth, `docs/*.md` from the folder's top, `build/` a folder. Excluded folders are pruned,
    not walked: a .git or .venv can hold many times the files of the source itself.
    """
    import pathspec

    included = pathspec.PathSpec.from_lines("gitignore", include)
    excluded = pathspec.PathSpec.from_lines("gitignore", exclude)
    files, left_out = [], 0
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not excluded.match_file((rel / d).as_posix() + "/")]
        for name in names:
            path, name_rel = Path(folder, name), (rel / name).as_posix()
            if not path.is_file():
                continue  # a broken link, a socket
            if included.match_file(name_rel) and not excluded.match_file(name_rel):
                files.append(path)
            else:
                left_out += 1
    return files, left_out


def resolve_source(
    source: str, include: list[str] = DEFAULT_INCLUDE, exclude: list[str] = DEFAULT_EXCLUDE
) -> Source:
    """Expand a source to its files; include/exclude apply to a folder source only (a file or a
    glob names its files itself). A source with no files is an error."""
    if source == STDLIB:
        return Source(*stdlib_files())
    path = Path(source).expanduser()
    if path.is_file():
        return Source(path.parent, [path])
    if path.is_dir():
        files, left_out = folder_files(path, include, exclude)
        if not files:
            left = f"; data.include/data.exclude left out all {left_out}" if left_out else ""
            raise SourceError(f"data.source {source!r}: no files found{left}")
        return Source(path, files, folder=True, left_out=left_out)
    if glob.has_magic(source):
        files = [Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()]
        if not files:
            raise SourceError(f"data.source {source!r}: no files found")
        return Source(Path("."), files)
    raise SourceError(f"data.source {source!r}: no such file, folder or glob match")


def check_source_size(source: str, found: Source, max_bytes: int | None) -> int:
    """The source's size on disk (table files whole), checked against curate.gate.max_bytes
    before a single file is read: a misconfigured source (a home folder, a data lake) stops here,
    not after it was loaded. The data gate checks the curated bytes against the same limit; the
    raw files are at least that large less what curation drops, so this is the gate's error early."""
    total = sum(file.stat().st_size for file in found.files)
    if max_bytes is not None and total > max_bytes:
        raise GateError(
            f"data.source {source!r}: {total:,} bytes in {len(found.files):,} files, more than "
            f"curate.gate.max_bytes ({max_bytes:,}): point data.source at less, or raise the limit"
        )
    return total


def is_binary(content: bytes) -> bool:
    return b"\0" in content[:BINARY_SNIFF_BYTES]


def iter_table_rows(path: Path, text_field: str) -> Iterator[dict]:
    """Rows of a jsonl/parquet/csv file as records, through Hugging Face datasets (offline).

    Streamed, batch by batch, straight from the file: `load_dataset` without streaming converts
    the file to an Arrow table under ~/.cache/huggingface/datasets, a raw, unscrubbed copy of the
    source outside DVC that nothing ever deletes. Streaming writes nothing there, and holds one
    batch of rows at a time."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    # datasets logs its own error line before raising; ours below names the file and says it once.
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    row = 0
    try:
        table = load_dataset(
            TABLE_FORMATS[path.suffix.lower()], data_files=str(path), split="train", streaming=True
        )
        columns = table.column_names  # None for json until a row is read
        for batch in table.iter(batch_size=TABLE_BATCH_ROWS):
            columns = columns or list(batch)
            if text_field not in batch:
                break
            for text in batch[text_field]:
                content = b"" if text is None else str(text).encode("utf-8")
                yield {"path": f"{path}#{row}", "content": content}
                row += 1
    except Exception as exc:  # datasets raises many types for a corrupt file
        raise SourceError(
            f"{path}: cannot be read as {path.suffix} ({exc.__class__.__name__}: {exc})"
        ) from None
    if columns is not None and text_field not in columns:
        raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)})")


def read_table_file(path: Path, text_field: str) -> list[dict]:
    """A table file's rows, all at once (iter_table_rows streams them)."""
    return list(iter_table_rows(path, text_field))


@dataclass
class Skipped:
    """What a source held that did not become a document."""

    left_out: int = 0  # a folder's files outside data.include / data.exclude
    binary: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "left_out": self.left_out,
            "binary": len(self.binary),
            "binary_examples": self.binary[:SKIPPED_EXAMPLES],
        }


def record_name(file: Path, found: Source) -> str:
    return file.relative_to(found.root).as_posix() if file.is_relative_to(found.root) else file.as_posix()


def iter_documents(found: Source, text_field: str, skipped: Skipped) -> Iterator[dict]:
    """Records {path, content: bytes} of the source, one file read at a time: files in path
    order, a table's rows in their order. Binary files of a folder are counted in skipped."""
    for file in sorted(found.files, key=lambda f: record_name(f, found)):
        name = record_name(file, found)
        if not found.folder and file.suffix.lower() in TABLE_FORMATS:
            yield from iter_table_rows(file, text_field)
            continue
        content = file.read_bytes()
        # A folder holds what its owner put there: an image or a compiled file named like text is
        # skipped, not a failed run. A file named directly goes to curate, which quarantines it.
        if found.folder and is_binary(content):
            skipped.binary.append(name)
            continue
        yield {"path": name, "content": content}


def open_source(
    source: str,
    text_field: str = "text",
    max_documents: int | None = None,
    include: list[str] = DEFAULT_INCLUDE,
    exclude: list[str] = DEFAULT_EXCLUDE,
    max_bytes: int | None = None,
) -> tuple[Iterator[dict], Skipped]:
    """(the source's records as a stream, what it skipped, filled in as the stream is read).
    A source larger on disk than max_bytes is a GateError here, before any file is read."""
    found = resolve_source(source, include, exclude)
    check_source_size(source, found, max_bytes)
    skipped = Skipped(left_out=found.left_out)
    return itertools.islice(iter_documents(found, text_field, skipped), max_documents), skipped


def no_documents(source: str, skipped: Skipped) -> SourceError:
    binary = f" ({len(skipped.binary)} binary files skipped)" if skipped.binary else ""
    return SourceError(f"data.source {source!r}: yielded no documents{binary}")


def collect_documents(source: str, **options) -> list[dict]:
    """open_source's records in a list (options: open_source's): for small sources and tests."""
    records, skipped = open_source(source, **options)
    records = list(records)
    if not records:
        raise no_documents(source, skipped)
    return records


def run(params: Params) -> dict:
    data = params.data
    raw_dir = Path(data.raw_dir)
    records, skipped = open_source(
        data.source,
        data.text_field,
        data.max_documents,
        data.include,
        data.exclude,
        max_bytes=params.curate.gate.max_bytes,
    )
    with ShardWriter(raw_dir, data.shard_bytes) as shards:
        shards.extend(records)
    if not shards.documents:
        clear_shards(raw_dir)
        raise no_documents(data.source, skipped)
    summary = {
        "source": data.source,
        "documents": shards.documents,
        "bytes": shards.bytes,
        "shards": shards.shards,
        "skipped": skipped.to_dict(),
    }
    write_json(raw_dir / "ingest.json", summary)
    return summary


def describe(summary: dict, params: Params) -> str:
    line = (
        f"ingest: {summary['documents']} documents, {summary['bytes'] / 1e6:.1f} MB from {summary['source']}"
        f" in {summary['shards']} shards"
    )
    skipped = summary["skipped"]
    if skipped["left_out"]:
        line += f"; {skipped['left_out']} files left out by data.include/data.exclude"
    if skipped["binary"]:
        examples = ", ".join(skipped["binary_examples"][:3])
        line += f"; {skipped['binary']} binary files skipped (e.g. {examples})"
    return line


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("ingest", run, describe, argv)


if __name__ == "__main__":
    main()
