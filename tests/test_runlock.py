"""One trainpipe command at a time: real processes contend for .trainpipe.lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.runlock import LOCK_FILE

BIN = Path(sys.executable).parent
HOLD = "from pipelines.runlock import workspace_lock\nwith workspace_lock('test-holder'):\n    print('held', flush=True)\n    __import__('time').sleep(120)\n"


def start_holder(cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
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
