"""The DVC runner's parsing of what dvc prints, on real pipes."""

import io
import os

import pytest

from flows.dvc import _pump, failure_reason, stage_exit_code


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
        b"Running stage 'train':\n> python -m pipelines.train\ntrain: step 10/20\nUpdating lock file 'dvc.lock'\n\n"
        b"To track the changes with git, run:\n\n\tgit add dvc.lock\n\nTo enable auto staging, run:\n\n"
        b"\tdvc config core.autostage true\nUse `dvc push` to send your updates to remote storage.\n"
    )
    assert pump(out, True) == (
        b"Running stage 'train':\n> python -m pipelines.train\ntrain: step 10/20\nUpdating lock file 'dvc.lock'\n"
    )
    assert pump(out, False) == out


@pytest.mark.parametrize(
    "text, code",
    [
        ("ERROR: failed to reproduce 'curate': failed to run: python -m pipelines.curate, exited with 3", 3),
        ("ERROR: failed to reproduce 'train': failed to run: python -m pipelines.train, exited with 4", 4),
        ("ERROR: unexpected error - [Errno 28] No space left on device", 1),
    ],
)
def test_stage_exit_code(text, code):
    assert stage_exit_code(text) == code


def test_failure_reason_prefers_the_stage_line():
    stderr = "noise\ntrainpipe curate: data gate failed: expect_x (observed 1)\nERROR: failed to reproduce 'curate'\n"
    assert failure_reason(stderr, ["repro"]) == "data gate failed: expect_x (observed 1)"
    assert failure_reason("ERROR: dvc broke\n", ["repro"]) == "ERROR: dvc broke"
