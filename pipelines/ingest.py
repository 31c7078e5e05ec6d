"""Ingest: snapshot the source into data/raw/documents.parquet, one record per document.

    python -m pipelines.ingest            # what `dvc repro ingest` runs
    trainpipe ingest -S data.source='docs/**/*.txt'

Sources: "python-stdlib" (every .py file of the running interpreter's standard library, as
raw bytes: decoding is curate's job, so files in legacy encodings arrive as they are), or a
local file, folder or glob. Text files (.txt, .py, .md, ...) become one record each with their
raw bytes; .jsonl/.json, .parquet and .csv files are read through Hugging Face `datasets`,
one record per row, taking the text from the column named by data.text_field.
Under DVC, ingest depends on data/inputs/source.json, the manifest of the source's files that
the inputs stage writes on every repro: an added, removed or edited file re-runs ingest.
"""

import glob
import os
import sysconfig
from pathlib import Path

from pipelines.data import write_documents, write_json
from pipelines.errors import SourceError
from pipelines.params import Params

STDLIB = "python-stdlib"
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The .py files of this interpreter's standard library, installed packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        # not walked at all: site-packages can hold 25 times the stdlib's files (measured here)
        dirs[:] = [d for d in dirs if d != "site-packages"]
        files += [Path(folder, n) for n in names if n.endswith(".py") and Path(folder, n).is_file()]
    return root, files


def resolve_source(source: str) -> tuple[Path, list[Path]]:
    """Expand a source to (root for relative names, files). A source with no files is an error."""
    if source == STDLIB:
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        root = path
    elif glob.has_magic(source):
        files = [Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()]
        root = Path(".")
    else:
        raise SourceError(f"data.source {source!r}: no such file, folder or glob match")
    if not files:
        raise SourceError(f"data.source {source!r}: no files found")
    return root, files


def read_table_file(path: Path, text_field: str) -> list[dict]:
    """Rows of a jsonl/parquet/csv file as records, through Hugging Face datasets (offline)."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    # datasets logs its own error line before raising; ours below names the file and says it once.
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        table = load_dataset(TABLE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a corrupt file
        raise SourceError(
            f"{path}: cannot be read as {path.suffix} ({exc.__class__.__name__}: {exc})"
        ) from None
    if text_field not in table.column_names:
        raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    records = []
    for i, text in enumerate(table[text_field]):
        content = b"" if text is None else str(text).encode("utf-8")
        records.append({"path": f"{path}#{i}", "content": content})
    return records


def collect_documents(source: str, text_field: str = "text", max_documents: int | None = None) -> list[dict]:
    """Records {path, content: bytes} for every document of the source, sorted by path."""
    root, files = resolve_source(source)
    records = []
    for file in sorted(files):
        if file.suffix.lower() in TABLE_FORMATS:
            records.extend(read_table_file(file, text_field))
        else:
            name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.as_posix()
            records.append({"path": name, "content": file.read_bytes()})
    records.sort(key=lambda r: r["path"])
    if max_documents:
        records = records[:max_documents]
    if not records:
        raise SourceError(f"data.source {source!r}: yielded no documents")
    return records


def run(params: Params) -> dict:
    records = collect_documents(params.data.source, params.data.text_field, params.data.max_documents)
    write_documents(records, params.data.raw_dir)
    summary = {
        "source": params.data.source,
        "documents": len(records),
        "bytes": sum(len(r["content"]) for r in records),
    }
    write_json(Path(params.data.raw_dir) / "ingest.json", summary)
    return summary


def describe(summary: dict, params: Params) -> str:
    return (
        f"ingest: {summary['documents']} documents, {summary['bytes'] / 1e6:.1f} MB from {summary['source']}"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.entry import stage_main

    stage_main("ingest", run, describe, argv)


if __name__ == "__main__":
    main()
