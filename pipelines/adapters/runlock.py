"""One trainpipe command at a time writes the workspace: a lock on `.trainpipe.lock`.

`trainpipe run`, the stage commands, `publish`, `promote`, `rollback` and `restart` hold it. A
second command refuses at once, naming the holder, or with `--wait` waits for it. A flow run
that no `trainpipe` command started (a schedule or a deployment) waits its turn: at most
TRAINPIPE_LOCK_WAIT_S seconds (default one hour), then fails with one line naming the holder.
The lock is an flock (the maintained `filelock` package): the kernel drops it when its holder
dies, even by SIGKILL, so there is never a stale lock to remove by hand.
"""

import os
import sys
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipelines.core.errors import ConfigError, TrainpipeError

LOCK_FILE = ".trainpipe.lock"
LOCK_WAIT_ENV = "TRAINPIPE_LOCK_WAIT_S"
DEFAULT_FLOW_WAIT_S = 3600.0  # a nightly run outwaits a manual run of the default job (~6 min)
_held: list[str] = []  # the command holding the lock in this process: nested takers pass through


class BusyError(TrainpipeError):
    """Another trainpipe command holds the workspace lock."""

    exit_code = 5


def flow_lock_wait_s() -> float:
    """How long a flow run waits for the lock: TRAINPIPE_LOCK_WAIT_S, else one hour."""
    text = os.environ.get(LOCK_WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_FLOW_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{LOCK_WAIT_ENV}={text!r} is not a number of seconds (0 or more)")
    return seconds


def current_command() -> str | None:
    """The trainpipe command holding the lock in this process, if any (recorded with alias moves)."""
    return _held[0] if _held else None


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "a process that has not written its name yet"
    except OSError:
        return "a process that has just released it"


@contextmanager
def workspace_lock(command: str, wait: bool = False, root: str | Path = ".", timeout: float | None = None):
    """Hold the workspace lock for the body. Busy: BusyError at once unless wait; with wait, wait
    for it, forever or at most timeout seconds (then BusyError)."""
    if _held:
        yield
        return
    from filelock import FileLock, Timeout

    path = Path(root) / LOCK_FILE
    info = (
        f"trainpipe {command} (pid {os.getpid()}, started {datetime.now(UTC).isoformat(timespec='seconds')})"
    )

    def write_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)

    lock = FileLock(path, timeout=0, thread_local=False, fallback_to_soft=False, on_acquired=write_holder)
    try:
        lock.acquire()
    except Timeout:
        if not wait:
            raise BusyError(
                f"the workspace is busy: {path} is held by {_holder(path)}; "
                "wait for it to finish or pass --wait"
            ) from None
        limit = "" if timeout is None else f" (at most {timeout:g} s)"
        print(
            f"trainpipe {command}: waiting for {_holder(path)} to release {path}{limit}",
            file=sys.stderr,
            flush=True,
        )
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise BusyError(
                f"the workspace is still busy after waiting {timeout:g} s: {path} is held by "
                f"{_holder(path)}; run again later or wait longer with {LOCK_WAIT_ENV}=SECONDS"
            ) from None
    _held.append(command)
    try:
        yield
    finally:
        _held.pop()
        lock.release()
