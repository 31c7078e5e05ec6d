"""Ingest: snapshot the source into data/raw/documents.parquet, one record per document.

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
Under DVC, ingest depends on data/inputs/source.json, the manifest of the source's files that
the inputs stage writes on every repro: an added, removed or edited file re-runs ingest.
"""

import glob
import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

from pipelines.core.data import write_documents, write_json
from pipelines.core.errors import GateError, SourceError
from pipelines.core.params import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Params

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


def read_table_file(path: Path, text_field: str) -> list[dict]:
    """Rows of a jsonl/parquet/csv file as records, through Hugging Face datasets (offline).

    Streamed, batch by batch, straight from the file: `load_dataset` without streaming converts
    the file to an Arrow table under ~/.cache/huggingface/datasets, a raw, unscrubbed copy of the
    source outside DVC that nothing ever deletes. Streaming writes nothing there."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    # datasets logs its own error line before raising; ours below names the file and says it once.
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    records = []
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
                records.append({"path": f"{path}#{len(records)}", "content": content})
    except Exception as exc:  # datasets raises many types for a corrupt file
        raise SourceError(
            f"{path}: cannot be read as {path.suffix} ({exc.__class__.__name__}: {exc})"
        ) from None
    if columns is not None and text_field not in columns:
        raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)})")
    return records


def gather_documents(
    source: str,
    text_field: str = "text",
    max_documents: int | None = None,
    include: list[str] = DEFAULT_INCLUDE,
    exclude: list[str] = DEFAULT_EXCLUDE,
    max_bytes: int | None = None,
) -> tuple[list[dict], dict]:
    """(records {path, content: bytes} of every document, sorted by path; what was left out:
    {"left_out": a folder's files outside include/exclude, "binary": count, "binary_examples"}).
    A source larger on disk than max_bytes is a GateError before any file is read."""
    found = resolve_source(source, include, exclude)
    check_source_size(source, found, max_bytes)
    records, binary = [], []
    for file in sorted(found.files):
        name = file.relative_to(found.root).as_posix() if file.is_relative_to(found.root) else file.as_posix()
        if not found.folder and file.suffix.lower() in TABLE_FORMATS:
            records.extend(read_table_file(file, text_field))
            continue
        content = file.read_bytes()
        # A folder holds what its owner put there: an image or a compiled file named like text is
        # skipped, not a failed run. A file named directly goes to curate, which quarantines it.
        if found.folder and is_binary(content):
            binary.append(name)
            continue
        records.append({"path": name, "content": content})
    records.sort(key=lambda r: r["path"])
    if max_documents:
        records = records[:max_documents]
    if not records:
        skipped = f" ({len(binary)} binary files skipped)" if binary else ""
        raise SourceError(f"data.source {source!r}: yielded no documents{skipped}")
    return records, {
        "left_out": found.left_out,
        "binary": len(binary),
        "binary_examples": binary[:SKIPPED_EXAMPLES],
    }


def collect_documents(
    source: str,
    text_field: str = "text",
    max_documents: int | None = None,
    include: list[str] = DEFAULT_INCLUDE,
    exclude: list[str] = DEFAULT_EXCLUDE,
) -> list[dict]:
    """Records {path, content: bytes} for every document of the source, sorted by path."""
    return gather_documents(source, text_field, max_documents, include, exclude)[0]


def run(params: Params) -> dict:
    data = params.data
    records, skipped = gather_documents(
        data.source,
        data.text_field,
        data.max_documents,
        data.include,
        data.exclude,
        max_bytes=params.curate.gate.max_bytes,
    )
    write_documents(records, data.raw_dir)
    summary = {
        "source": data.source,
        "documents": len(records),
        "bytes": sum(len(r["content"]) for r in records),
        "skipped": skipped,
    }
    write_json(Path(data.raw_dir) / "ingest.json", summary)
    return summary


def describe(summary: dict, params: Params) -> str:
    line = (
        f"ingest: {summary['documents']} documents, {summary['bytes'] / 1e6:.1f} MB from {summary['source']}"
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
