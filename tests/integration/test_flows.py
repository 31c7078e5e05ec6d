"""The DVC runner: its parsing of what dvc prints, on real pipes; the inputs check and `dvc status`
in the flow's own process, against the `dvc` command on a real project; Prefect's temporary server."""

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tracked_copy
from test_catalogue import good_corpus, module

from pipelines.adapters.dvc_repo import (
    KEPT_HEAD_CHUNKS,
    KEPT_TAIL_CHUNKS,
    _pump,
    describe_changes,
    failure_reason,
    stage_exit_code,
)


class Sink:
    def __init__(self):
        self.buffer = io.BytesIO()

    def flush(self):
        pass


def pump(data: bytes, drop_hints: bool) -> bytes:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    sink, keep = Sink(), []
    with os.fdopen(r, "rb") as src:
        _pump(src, sink, keep, drop_hints)
    assert b"".join(keep) == data  # the tail kept for error messages is the raw output
    return sink.buffer.getvalue()


def test_pump_drops_dvc_hints_but_keeps_stage_output():
    out = (
        b"Running stage 'train':\n> python -m pipelines.stages.train\ntrain: step 10/20\nUpdating lock file 'dvc.lock'\n\n"
        b"To track the changes with git, run:\n\n\tgit add dvc.lock\n\nTo enable auto staging, run:\n\n"
        b"\tdvc config core.autostage true\nUse `dvc push` to send your updates to remote storage.\n"
    )
    assert pump(out, True) == (
        b"Running stage 'train':\n> python -m pipelines.stages.train\ntrain: step 10/20\nUpdating lock file 'dvc.lock'\n"
    )
    assert pump(out, False) == out


def test_a_stage_that_prints_thousands_of_progress_lines_is_still_seen_to_run():
    """The 20x corpus's curate printed a line per shard; keeping only the output's tail lost DVC's
    "Running stage", and the flow reported a stage that ran as skipped."""
    r, w = os.pipe()
    lines = [b"Running stage 'curate':\n"] + [f"  {i}/5000 shards analysed\n".encode() for i in range(5000)]
    lines.append(b"ERROR: failed to reproduce 'curate': exited with 3\n")

    def write():
        with os.fdopen(w, "wb", buffering=0) as fh:
            for line in lines:
                fh.write(line)
                time.sleep(0.0002)  # a chunk a line, as a stage that flushes each line gives

    writer = threading.Thread(target=write)
    writer.start()
    keep = []
    with os.fdopen(r, "rb") as src:
        _pump(src, None, keep, drop_hints=True)
    writer.join()
    kept = b"".join(keep)
    assert b"Running stage 'curate'" in kept and stage_exit_code(kept.decode()) == 3
    assert len(keep) <= KEPT_HEAD_CHUNKS + KEPT_TAIL_CHUNKS


@pytest.mark.parametrize(
    "text, code",
    [
        (
            "ERROR: failed to reproduce 'curate': failed to run: python -m pipelines.stages.curate, exited with 3",
            3,
        ),
        (
            "ERROR: failed to reproduce 'train': failed to run: python -m pipelines.stages.train, exited with 4",
            4,
        ),
        ("ERROR: unexpected error - [Errno 28] No space left on device", 1),
    ],
)
def test_stage_exit_code(text, code):
    assert stage_exit_code(text) == code


def test_failure_reason_prefers_the_stage_line():
    stderr = "noise\ntrainpipe curate: data gate failed: expect_x (observed 1)\nERROR: failed to reproduce 'curate'\n"
    assert failure_reason(stderr, ["repro"]) == "data gate failed: expect_x (observed 1)"
    assert failure_reason("ERROR: dvc broke\n", ["repro"]) == "ERROR: dvc broke"


def test_curation_table_lists_counts_failures_warnings_and_each_drift_check_once():
    from flows.training import curation_table

    blocked = {
        "check": "drift_documents",
        "observed": 6,
        "champion": 60,
        "need": "ratio within 1/2..2",
        "verdict": "block",
    }
    passed = {
        "check": "drift_bytes",
        "observed": 3.0,
        "champion": 3.1,
        "need": "ratio within 1/2..2",
        "verdict": "ok",
    }
    curation = {
        "documents_in": 10,
        "bytes_in": 5_000_000,
        "kept": {"documents": 6, "bytes": 3_000_000},
        "dropped": {"too_short": 3, "near_duplicate": 1, "duplicate": 0},
        "scrubbed": {"email": 2, "api_key": 0},
        "duplicate_clusters": [{"kept": "a.py", "copies": [{"path": "b.py"}]}],
        "gate": {
            "passed": False,
            "evaluated": 13,
            # the curate stage puts a blocking drift check among the gate's failures too
            "failed": [
                blocked,
                {"check": "expect_column_values_to_not_be_null", "observed": "2 nulls", "need": "none"},
            ],
            "warnings": [{"check": "expect_table_row_count_to_be_between", "observed": "6", "need": ">= 5"}],
        },
        "drift": {"checks": [blocked, passed]},
    }
    rows = [tuple(r.values()) for r in curation_table(curation)]
    assert rows == [
        ("documents in / kept", "10 / 6", "", ""),
        ("MB in / kept", "5.00 / 3.00", "", ""),
        ("dropped: too_short", "3", "", ""),  # zero counts are left out
        ("dropped: near_duplicate", "1", "", ""),
        ("scrubbed: email", "2", "", ""),
        ("duplicate clusters", "1", "", ""),
        ("expect_column_values_to_not_be_null", "2 nulls", "none", "block"),
        ("expect_table_row_count_to_be_between", "6", ">= 5", "warn"),
        ("drift_documents", "6", "60", "block"),
        ("drift_bytes", "3.0", "3.1", "ok"),
        ("gate", "13 expectations", "", "FAILED"),
    ]
    assert list(curation_table(curation)[0]) == ["item", "figure", "reference", "verdict"]


def _dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=proj, env=env, capture_output=True, text=True
    )


def _inputs_lock(proj: Path) -> dict:
    return yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["inputs"]


@pytest.mark.slow
def test_the_flows_inputs_check_records_what_dvc_repro_records(tmp_path, monkeypatch):
    """The flow runs the inputs stage in its own process and `dvc commit`s it; `dvc repro` runs its
    command. For the same inputs both leave the same dvc.lock entry and cached outputs, and the
    flow's in-process `dvc status` says what `dvc status --json` says."""
    from pipelines.adapters.dvc_repo import stage_changes
    from pipelines.core.params import load_params
    from pipelines.stages.inputs import check_inputs

    source = tmp_path / "corpus"
    good_corpus(source, n=3)
    proj = tracked_copy(tmp_path / "proj", [f"data.source={source}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/no-registry.db")  # no file: none read
    monkeypatch.chdir(proj)

    (line,) = check_inputs(load_params("params.yaml"))
    assert line.startswith(f"inputs: source {source}: 3 files")
    in_flow = _inputs_lock(proj)
    repro = _dvc(proj, "repro", "--single-item", "inputs")
    assert repro.returncode == 0, repro.stderr
    assert _inputs_lock(proj) == in_flow and "Updating lock file" not in repro.stdout

    (source / "mod_003.py").write_text(module(3))  # the source changed: both record it alike
    repro = _dvc(proj, "repro", "--single-item", "inputs")
    assert repro.returncode == 0, repro.stderr
    by_repro = _inputs_lock(proj)
    check_inputs(load_params("params.yaml"))
    assert _inputs_lock(proj) == by_repro != in_flow
    for out in ("source.json", "champion.json"):
        (proj / "data/inputs" / out).unlink()
    assert _dvc(proj, "checkout", "inputs").returncode == 0  # both outputs are in the DVC cache
    assert json.loads((proj / "data/inputs/source.json").read_text())["files"][3]["path"] == "mod_003.py"

    status = json.loads(_dvc(proj, "status", "--json").stdout)
    assert stage_changes() == {name: describe_changes(entries) for name, entries in status.items()}
    assert stage_changes(["ingest", "train"]).keys() == {"ingest", "train"}  # never ran: both changed


def _without_prefect_urls(monkeypatch) -> None:
    """No API URL in the environment; whatever a test sets there is undone after it."""
    for name in ("PREFECT_API_URL", "PREFECT_UI_URL"):
        monkeypatch.setenv(name, "")  # records the value to restore
        monkeypatch.delenv(name)


@pytest.mark.slow
def test_the_temporary_prefect_server_answers_then_stops(tmp_path, monkeypatch):
    from flows.server import TemporaryApi

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    _without_prefect_urls(monkeypatch)
    api = TemporaryApi()
    try:
        assert api.serves() and os.environ["PREFECT_API_URL"] == api.url
        api.wait_ready(timeout_s=180)  # a new database: every migration, on a busy machine
        with urllib.request.urlopen(f"{api.url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        api.stop()
    assert api.process.returncode is not None  # stopped, not left running
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # its state in PREFECT_HOME


@pytest.mark.slow
def test_no_temporary_server_when_a_prefect_profile_names_one(tmp_path, monkeypatch):
    """PREFECT_API_URL set with `prefect config set` lives in a profile, not the environment:
    trainpipe run must still use that server, as Prefect would."""
    from flows.server import TemporaryApi

    home = tmp_path / "prefect"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    monkeypatch.setenv("PREFECT_HOME", str(home))
    _without_prefect_urls(monkeypatch)
    api = TemporaryApi()
    assert not api.serves() and "PREFECT_API_URL" not in os.environ
    assert api.process.wait(timeout=60) == 0 and not (home / "prefect.db").exists()
