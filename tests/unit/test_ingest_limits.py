"""Ingest weighs the source before it reads it: a source larger than curate.gate.max_bytes stops
the run with the data gate's error, naming both sizes, and not one file is read."""

import json
from pathlib import Path

import pytest

from pipelines.core.errors import GateError
from pipelines.core.params import load_params
from pipelines.stages import ingest


@pytest.fixture
def no_reads(monkeypatch):
    """Every way ingest reads a file fails the test."""

    def read(*args, **kwargs):
        raise AssertionError("ingest read a file before checking the source's size")

    monkeypatch.setattr(Path, "read_bytes", read)
    monkeypatch.setattr(ingest, "read_table_file", read)


def sources(root: Path) -> dict[str, str]:
    (root / "docs").mkdir(parents=True)
    for i in range(3):
        (root / "docs" / f"{i}.txt").write_text("x" * 400)
    (root / "t.jsonl").write_text("".join(json.dumps({"text": "y" * 300}) + "\n" for _ in range(4)))
    return {"folder": str(root / "docs"), "glob": f"{root}/docs/*.txt", "table": str(root / "t.jsonl")}


@pytest.mark.parametrize("kind", ["folder", "glob", "table", "stdlib"])
def test_a_source_over_max_bytes_fails_before_any_file_is_read(tmp_path, kind, no_reads):
    source = ingest.STDLIB if kind == "stdlib" else sources(tmp_path / "src")[kind]
    params = load_params(
        tmp_path / "none.yaml",
        [
            f"data.source={source}",
            f"data.raw_dir={tmp_path / 'raw'}",
            "curate.gate.min_bytes=1",
            "curate.gate.max_bytes=1000",
        ],
    )
    with pytest.raises(GateError) as exc:
        ingest.run(params)
    message = str(exc.value)
    assert "curate.gate.max_bytes" in message and "1,000" in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "raw").exists()


def test_a_source_within_max_bytes_is_ingested(tmp_path):
    source = sources(tmp_path / "src")["folder"]
    params = load_params(
        tmp_path / "none.yaml",
        [
            f"data.source={source}",
            f"data.raw_dir={tmp_path / 'raw'}",
            "curate.gate.min_bytes=1",
            "curate.gate.max_bytes=1200",
        ],
    )
    assert ingest.run(params)["bytes"] == 1200
