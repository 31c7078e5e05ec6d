"""One trainpipe command at a time: real processes contend for .trainpipe.lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_mlflow_db

from pipelines.adapters.runlock import LOCK_FILE, LOCK_WAIT_ENV, flow_lock_wait_s
from pipelines.core.errors import ConfigError

BIN = Path(sys.executable).parent
HOLD = "from pipelines.adapters.runlock import workspace_lock\nwith workspace_lock('test-holder'):\n    print('held', flush=True)\n    __import__('time').sleep(120)\n"


def start_holder(cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_command_refuses_at_once_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path)
    try:
        t0 = time.monotonic()
        second = subprocess.run(
            [str(BIN / "trainpipe"), "publish"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 5
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(
            f"trainpipe publish: the workspace is busy: {LOCK_FILE} is held by trainpipe test-holder"
        )
        assert f"(pid {holder.pid}, started 20" in line and "--wait" in line
        assert time.monotonic() - t0 < 15  # refused without waiting (the time is the CLI's start-up)
    finally:
        holder.kill()
        holder.wait()


def test_waiting_command_runs_once_the_holder_dies_by_sigkill(tmp_path):
    holder = start_holder(tmp_path)
    waiter = subprocess.Popen(
        [str(BIN / "trainpipe"), "publish", "--wait"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = waiter.stderr.readline()
    assert first.startswith("trainpipe publish: waiting for trainpipe test-holder") and LOCK_FILE in first
    assert waiter.poll() is None  # still waiting
    os.kill(holder.pid, signal.SIGKILL)  # no clean release: the kernel drops the flock
    holder.wait()
    _, err = waiter.communicate(timeout=60)
    # it got the lock and went on to publish, which has nothing to register here
    assert waiter.returncode == 2 and "no trained model" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["promote", "3"], ["rollback"]])
def test_promote_and_rollback_refuse_while_the_lock_is_held(tmp_path, args):
    holder = start_holder(tmp_path)
    try:
        second = subprocess.run(
            [str(BIN / "trainpipe"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 5
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(
            f"trainpipe {args[0]}: the workspace is busy: {LOCK_FILE} is held by trainpipe test-holder"
        )
    finally:
        holder.kill()
        holder.wait()


# Holds the lock until a line arrives on stdin: a flow run's start (Prefect's temporary server)
# can take a minute on a busy machine, longer than any fixed hold.
HOLD_UNTIL_TOLD = (
    "from pipelines.adapters.runlock import workspace_lock\n"
    "with workspace_lock('test-holder'):\n"
    "    print('held', flush=True)\n"
    "    input()\n"
)


def flow_run(cwd: Path, mlflow_uri: str, wait_s: str) -> subprocess.Popen:
    """`python -m flows.training`, the flow as a schedule or deployment starts it (no trainpipe
    command around it), with its own Prefect home and MLflow registry."""
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        PREFECT_HOME=str(cwd / ".prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=mlflow_uri,
        **{LOCK_WAIT_ENV: wait_s},
    )
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.training"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(stream, text: str) -> str:
    for line in stream:
        if text in line:
            return line
    raise AssertionError(f"the stream ended without {text!r}")


@pytest.fixture
def held_lock(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_UNTIL_TOLD],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_a_flow_run_waits_for_the_lock_and_starts_once_it_is_released(
    tmp_path, held_lock, mlflow_template_db
):
    flow = flow_run(tmp_path, copy_mlflow_db(mlflow_template_db, tmp_path), "600")
    try:
        line = wait_for_line(flow.stderr, "waiting for trainpipe test-holder")
        assert f"trainpipe run (flow): waiting for trainpipe test-holder (pid {held_lock.pid}" in line
        assert "(at most 600 s)" in line
        time.sleep(3)
        assert flow.poll() is None  # still waiting, not refused
        held_lock.stdin.write("release\n")
        held_lock.stdin.flush()
        assert held_lock.wait(timeout=30) == 0
        _, err = flow.communicate(timeout=300)
    finally:
        flow.kill()
    # it took the lock and ran: here, with no DVC project, until its first `dvc status`
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"trainpipe run (flow) (pid {flow.pid},")
    assert flow.returncode == 1 and "busy" not in err
    assert err.strip().splitlines()[-1].startswith("python -m flows.training: ") and "DVC repository" in err


@pytest.mark.slow
def test_the_bounded_wait_runs_out_with_one_line_naming_the_holder(tmp_path, held_lock, mlflow_template_db):
    flow = flow_run(tmp_path, copy_mlflow_db(mlflow_template_db, tmp_path), "2")
    try:
        _, err = flow.communicate(timeout=400)
    finally:
        flow.kill()
    assert flow.returncode == 5
    reason = (
        f"the workspace is still busy after waiting 2 s: {LOCK_FILE} is held by trainpipe test-holder "
        f"(pid {held_lock.pid}, started 20"
    )
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"python -m flows.training: {reason}"), lines[-3:]
    assert lines[-1].endswith(f"run again later or wait longer with {LOCK_WAIT_ENV}=SECONDS")
    # the same line is the failed flow run's state message, which the Prefect UI shows
    assert any(
        f"Finished in state Failed('Flow run encountered an exception: BusyError: {reason}" in ln
        for ln in lines
    )
    assert held_lock.poll() is None  # the holder was never disturbed


def test_a_bad_lock_wait_is_one_line(monkeypatch):
    monkeypatch.setenv(LOCK_WAIT_ENV, "an hour")
    with pytest.raises(
        ConfigError, match=rf"^{LOCK_WAIT_ENV}='an hour' is not a number of seconds \(0 or more\)$"
    ):
        flow_lock_wait_s()
    monkeypatch.setenv(LOCK_WAIT_ENV, "")
    assert flow_lock_wait_s() == 3600
