"""A real Dask cluster on 127.0.0.1 for the integration tier, started as a user starts one: the
venv's `dask scheduler` and `dask worker` (nannies, one thread a worker process, no dashboard),
with the project root on their PYTHONPATH. The scheduler needs it as much as the workers: it
unpickles every task graph, so a function of `pipelines` sent by the client is imported there
too. Everything started here is stopped here, by process group (SIGTERM, then SIGKILL).

    from dask_cluster import dask_cluster

    with dask_cluster(n_workers=2, tmp_path=tmp_path) as cluster:
        with distributed.Client(cluster.address) as client:
            ...

or, as a fixture (2 workers; `@pytest.mark.parametrize("local_dask_cluster", [3], indirect=True)`
for another number), imported into the test module: `from dask_cluster import local_dask_cluster`
(`# noqa: F401`, and `# noqa: F811` where a test names it: ruff sees an import shadowed).

Functions the tests send must be importable by the servers under the name the test process
pickles them by: `pipelines.*`, or a tests module imported as `tests.integration.NAME`
(dask_tasks.py); a function of the test module itself is not (its name there is a bare module).
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, free_port

BIN = Path(sys.executable).parent
LOG_TAIL_CHARS = 4000


@dataclass
class DaskCluster:
    """A running cluster: where to reach it, and what to look at or kill."""

    address: str  # tcp://127.0.0.1:PORT, for distributed.Client(address) or DASK_SCHEDULER_ADDRESS
    worker_pids: dict[str, int]  # worker address -> pid of its process, as the cluster started
    log_dir: Path  # scheduler.log and workers.log
    processes: list[subprocess.Popen] = field(repr=False)  # the scheduler and the `dask worker` command

    def live_worker_pids(self, timeout_s: float = 30) -> dict[str, int]:
        """The worker processes now (a nanny replaces a killed one under a new pid)."""
        from distributed import Client

        with Client(self.address, timeout=timeout_s) as client:
            return client.run(os.getpid)

    def logs(self) -> str:
        """The last lines each server wrote, for a failure message."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path} (last {LOG_TAIL_CHARS} chars) ---\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)


def _sigterm_when_parent_dies():
    """Linux: what makes a child get SIGTERM when this process dies, even by SIGKILL, where no
    cleanup of ours runs (prctl PR_SET_PDEATHSIG). Resolved here: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, pr_set_pdeathsig, sigterm = ctypes.CDLL(None, use_errno=True).prctl, 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def _start(argv: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    """A server in a process group of its own, whose id stops it and everything it starts."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigterm_when_parent_dies(),
        )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal exists: still alive
        return True
    return True


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM to the process group `proc` leads (its pid: start_new_session), SIGKILL to whatever
    of it outlives timeout_s. The group, not only the leader: the nannies' worker processes, and
    the ones a nanny started again after a kill, are its members."""
    pgid = proc.pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid), f"process group {pgid} survived SIGKILL"


@contextmanager
def dask_cluster(
    n_workers: int = 2,
    *,
    tmp_path: Path,
    timeout_s: float = 90,
    pythonpath: Path = REPO,
) -> Iterator[DaskCluster]:
    """Start `dask scheduler` and `dask worker --nworkers n_workers --nthreads 1` on 127.0.0.1,
    wait until the scheduler counts n_workers workers (at most timeout_s; past it, or if a
    server exits, a RuntimeError with their logs), yield the cluster, then stop both."""
    from distributed import Client

    log_dir = tmp_path / "dask-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    env.pop("DASK_SCHEDULER_ADDRESS", None)  # a user's own cluster is not this one
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler_argv = [
        str(BIN / "dask"), "scheduler",
        "--host", "127.0.0.1", "--port", str(port),
        # No dashboard, yet its HTTP server (/health, /metrics) still starts: on loopback, any port.
        "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
    ]  # fmt: skip
    workers_argv = [
        str(BIN / "dask"), "worker", address,
        "--nworkers", str(n_workers), "--nthreads", "1",
        "--host", "127.0.0.1",  # workers and nannies listen on loopback only, as the scheduler
        "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
        "--local-directory", str(tmp_path / "dask-workers"),
        "--memory-limit", "0",  # no nanny memory kill: a test kills a worker when it means to
    ]  # fmt: skip

    with ExitStack() as stack:
        processes: list[subprocess.Popen] = []
        cluster = DaskCluster(address, {}, log_dir, processes)
        # Stopped in reverse: the workers first, while the scheduler can still see them go.
        scheduler = _start(scheduler_argv, log_dir / "scheduler.log", env)
        processes.append(scheduler)
        stack.callback(stop_group, scheduler)
        workers = _start(workers_argv, log_dir / "workers.log", env)
        processes.append(workers)
        stack.callback(stop_group, workers)

        deadline = time.monotonic() + timeout_s

        def check_running(what: str) -> None:
            for proc in processes:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(proc.args[:2])} exited {proc.returncode} {what}\n{cluster.logs()}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Dask cluster at {address}: {what} after {timeout_s:g} s\n{cluster.logs()}"
                )

        client = None
        while client is None:
            check_running("before the scheduler answered")
            try:
                client = Client(address, timeout=2)
            except OSError:  # nothing listens yet
                time.sleep(0.2)
        with client:
            while True:
                check_running(f"before {n_workers} workers joined")
                try:
                    client.wait_for_workers(n_workers, timeout=1)
                    break
                except TimeoutError:
                    pass
            cluster.worker_pids.update(client.run(os.getpid))
        yield cluster


@pytest.fixture
def local_dask_cluster(request, tmp_path) -> Iterator[DaskCluster]:
    """A cluster of 2 worker processes (or request.param), stopped after the test."""
    with dask_cluster(getattr(request, "param", 2), tmp_path=tmp_path) as cluster:
        yield cluster
