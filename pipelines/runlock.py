"""One trainpipe command at a time writes the workspace: a lock on `.trainpipe.lock`.

`trainpipe run`, the stage commands, `publish` and `restart` hold it (the flow takes it too, so a
scheduled run waits its turn the same way). A second one refuses at once, naming the holder, or
with `--wait` waits for it. The lock is an flock (the maintained `filelock` package): the kernel
drops it when its holder dies, even by SIGKILL, so there is never a stale lock to remove by hand.
"""

import os
import sys
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipelines.errors import TrainpipeError

LOCK_FILE = ".trainpipe.lock"
_held: list[str] = []  # the command holding the lock in this process: nested takers pass through


class BusyError(TrainpipeError):
    """Another trainpipe command holds the workspace lock."""

    exit_code = 5


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "a process that has not written its name yet"
    except OSError:
        return "a process that has just released it"


@contextmanager
def workspace_lock(command: str, wait: bool = False, root: str | Path = "."):
    """Hold the workspace lock for the body; BusyError at once unless wait."""
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
        print(
            f"trainpipe {command}: waiting for {_holder(path)} to release {path}", file=sys.stderr, flush=True
        )
        lock.acquire(timeout=-1)
    _held.append(command)
    try:
        yield
    finally:
        _held.pop()
        lock.release()
