"""What restart checks before it touches the workspace: which outputs of a recorded dvc.lock
the local DVC cache lacks (the end-to-end restarts are in tests/integration/test_e2e.py)."""

import hashlib
import json
from pathlib import Path

from pipelines.commands.restart import local_only_missing, missing_outputs


def put(cache: Path, md5: str, text: str = "x") -> None:
    path = cache / "files" / "md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def lock_of(*outs: tuple[str, str]) -> dict:
    return {"stages": {"s": {"outs": [{"path": p, "md5": m, "hash": "md5"} for p, m in outs]}}}


def test_missing_outputs_names_files_dirs_and_file_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workspace: output paths are relative to it
    entries = [{"md5": "aa" + "1" * 30, "relpath": "a"}, {"md5": "bb" + "2" * 30, "relpath": "b"}]
    put(tmp_path, "cc" + "3" * 30 + ".dir", json.dumps(entries))
    put(tmp_path, entries[0]["md5"])
    put(tmp_path, "dd" + "4" * 30)
    lock = lock_of(
        ("models", "cc" + "3" * 30 + ".dir"),  # one of its two files missing
        ("reports/metrics.json", "dd" + "4" * 30),  # present
        ("reports/samples.json", "ee" + "5" * 30),  # missing
        ("data/tokens", "ff" + "6" * 30 + ".dir"),  # not even its file list
    )
    assert missing_outputs(lock, tmp_path) == [
        "models (1 of 2 files)",
        "reports/samples.json",
        "data/tokens (its file list)",
    ]
    # a file the workspace already holds needs no cache object: checkout keeps it
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/samples.json").write_text("kept")
    assert (
        missing_outputs(lock_of(("reports/samples.json", hashlib.md5(b"kept").hexdigest())), tmp_path) == []
    )
    put(tmp_path, entries[1]["md5"])
    put(tmp_path, "ee" + "5" * 30)
    put(tmp_path, "ff" + "6" * 30 + ".dir", "[]")
    assert missing_outputs(lock, tmp_path) == []


def test_the_raw_snapshot_is_never_a_reason_to_refuse_but_is_reported(tmp_path, monkeypatch):
    """data/raw is never pushed (it may hold secrets): a fresh clone's cache lacks it, and restart
    goes on without it, saying so; every other output still has to be there."""
    monkeypatch.chdir(tmp_path)
    put(tmp_path, "dd" + "4" * 30)
    lock = {
        "stages": {
            "ingest": {"outs": [{"path": "data/raw", "md5": "ab" + "7" * 30 + ".dir", "hash": "md5"}]},
            "evaluate": {"outs": [{"path": "reports/metrics.json", "md5": "dd" + "4" * 30, "hash": "md5"}]},
        }
    }
    assert missing_outputs(lock, tmp_path) == []
    assert local_only_missing(lock, tmp_path) == ["data/raw (its file list)"]
    lock["stages"]["evaluate"]["outs"][0]["md5"] = "ee" + "5" * 30
    assert missing_outputs(lock, tmp_path) == ["reports/metrics.json"]
