"""Where the data stages' per-shard work runs: a local process pool, or a Dask cluster.

    with ShardRunner(executor="local", workers=2) as runner:
        results = runner.map(fn, tasks, "shards analysed")   # in the order of tasks

- "local" (the default): a process pool on this machine, no server to start; one worker runs in
  the stage's own process. A worker that dies (killed, out of memory) breaks the pool: its shards
  and every other unfinished one are given to a new pool, up to MAX_ATTEMPTS times.
- "dask": the shards go to the Dask cluster whose scheduler `DASK_SCHEDULER_ADDRESS` names (Dask's
  own setting, `tcp://host:8786`), through the cluster's concurrent.futures executor: the same
  submit-and-wait loop as the pool's. The scheduler re-runs the shards of a worker that dies. The
  workers must import the same project code and see the same paths (a shared file system).

Either way fn(task) must be a module-level function whose only effects are files it writes under
a temporary name and renames, so running a shard twice gives the same files: that is what makes a
retry safe (no document lost, none written twice).
"""

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from pipelines.core.errors import ConfigError, TrainpipeError

MAX_ATTEMPTS = 3  # a shard's runs before the stage gives up on it
DASK_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
DASK_CONNECT_TIMEOUT_S = 20


class ShardRunner:
    """Runs fn over shards on the chosen executor; one pool (or cluster connection) for every
    map of a stage, so a stage with two passes starts its workers once.

    with ShardRunner("local", workers=2) as runner:
        analysed = runner.map(analyse_shard, tasks, "shards analysed")
    """

    def __init__(self, executor: str = "local", workers: int = 1):
        if executor not in ("local", "dask"):
            raise ConfigError(f"data.executor {executor!r}: one of 'local', 'dask'")
        self.executor, self.workers = executor, workers
        self._pool: ProcessPoolExecutor | None = None
        self._client = None

    def __enter__(self) -> "ShardRunner":
        if self.executor == "dask":
            self._client = _dask_client()
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._client is not None:
            self._client.close()

    def map(self, fn: Callable, tasks: Sequence, label: str = "shards") -> list:
        """fn over tasks, results in the order of tasks, progress on stdout."""
        if not tasks:
            return []
        progress = Progress(label, len(tasks))
        if self._client is None and (self.workers <= 1 or len(tasks) == 1):
            results = []
            for task in tasks:
                results.append(fn(task))
                progress.done()
            return results
        return self._map(fn, tasks, progress)

    def _new_executor(self) -> Executor:
        """The concurrent.futures executor the shards go to: the cluster's, or a new process pool."""
        if self._client is not None:
            # pure=False: a re-submitted stage runs again rather than reuse another run's result.
            # A result is let go on the cluster once it is here: a worker that dies after it took
            # nothing with it. A shard whose worker dies before is re-run by the scheduler
            # (distributed.scheduler.allowed-failures); an error the shard raises is the stage's.
            return self._client.get_executor(pure=False)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        # spawn, not fork: the stage's own threads (tokenizers' pool, an import under way) would be
        # copied half-done into a forked child; a fresh interpreter per worker costs about a second
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _map(self, fn: Callable, tasks: Sequence, progress: "Progress") -> list:
        results: dict[int, object] = {}
        attempts = dict.fromkeys(range(len(tasks)), 0)
        executor = self._pool or self._new_executor()
        while len(results) < len(tasks):
            todo = [i for i in range(len(tasks)) if i not in results]
            for i in todo:
                attempts[i] += 1
                if attempts[i] > MAX_ATTEMPTS:
                    raise TrainpipeError(
                        f"{progress.label}: shard {i}'s worker died {MAX_ATTEMPTS} times (killed, or out "
                        "of memory?); lower data.shard_bytes or the workers"
                    )
            pending = {executor.submit(fn, tasks[i]): i for i in todo}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = pending.pop(future)
                        results[i] = future.result()
                        progress.done()
            except BrokenProcessPool:  # the local pool only: a cluster re-runs a dead worker's shards itself
                print(
                    f"a worker died; {len(tasks) - len(results)} {progress.label.split()[0]} left, given to "
                    "new workers (a shard's files are whole or absent, never half)",
                    file=sys.stderr,
                    flush=True,
                )
                executor = self._new_executor()
        return [results[i] for i in range(len(tasks))]


def map_shards(
    fn: Callable, tasks: Sequence, executor: str = "local", workers: int = 1, label: str = "shards"
) -> list:
    """One map on a ShardRunner of its own."""
    with ShardRunner(executor, workers) as runner:
        return runner.map(fn, tasks, label)


def _dask_client():
    address = os.environ.get(DASK_ADDRESS_ENV)
    if not address:
        raise ConfigError(
            f"data.executor is 'dask' but {DASK_ADDRESS_ENV} is not set: export it as "
            "tcp://HOST:8786 (the scheduler), or run with -S data.executor=local"
        )
    from distributed import Client

    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise ConfigError(f"{DASK_ADDRESS_ENV}={address}: no Dask scheduler answers ({exc})") from None


class Progress:
    """'3/8 shards analysed (4.2 s)' on stdout while shards finish, at most once a second, and at
    the end: stderr is for the one line that says why a stage failed."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.finished = label, total, 0
        self._started = self._shown = time.monotonic()

    def done(self) -> None:
        self.finished += 1
        now = time.monotonic()
        if self.finished == self.total or now - self._shown >= 1.0:
            self._shown = now
            print(f"  {self.finished}/{self.total} {self.label} ({now - self._started:.1f} s)", flush=True)
