"""The Dask cluster the data stages run on with `data.executor: dask`, for real: a `dask scheduler`
and a `dask worker` command with nannies (tests/integration/dask_cluster.py). A task runs there;
a task whose worker process dies is run again by another one and still returns its result, while
the nanny replaces the dead process; a result already collected through the cluster's
concurrent.futures executor is not computed again when the worker that made it dies.

    pytest tests/integration/test_dask_cluster.py
"""

import os
import signal
import time
from pathlib import Path

import pytest
from dask_cluster import dask_cluster, local_dask_cluster  # noqa: F401 (a fixture)
from distributed import Client

from tests.integration.dask_tasks import record_and_sleep

pytestmark = pytest.mark.slow


def attempts(marker_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in marker_dir.iterdir())


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def test_a_task_runs_on_the_cluster(local_dask_cluster):  # noqa: F811 (the fixture imported above)
    cluster = local_dask_cluster
    assert len(cluster.worker_pids) == 2 and os.getpid() not in cluster.worker_pids.values()
    with Client(cluster.address) as client:
        assert client.submit(pow, 2, 10).result(timeout=60) == 1024
        assert client.gather(client.map(pow, [2, 3, 4], [2, 2, 2])) == [4, 9, 16]
        info = client.scheduler_info()["workers"]
        assert {w["nthreads"] for w in info.values()} == {1}, info


def test_the_task_of_a_killed_worker_runs_again_on_another(tmp_path):
    markers = tmp_path / "attempts"
    markers.mkdir()
    with dask_cluster(n_workers=2, tmp_path=tmp_path) as cluster, Client(cluster.address) as client:
        future = client.submit(record_and_sleep, str(markers), 3, pure=False)
        wait_for(lambda: attempts(markers), 60, "the task started")
        (killed,) = attempts(markers)
        assert killed in cluster.worker_pids.values(), f"pid {killed} is no worker of {cluster.worker_pids}"
        os.kill(killed, signal.SIGKILL)

        pid = future.result(timeout=60)
        assert pid != killed and pid in cluster.worker_pids.values(), (pid, killed, cluster.worker_pids)
        assert attempts(markers) == sorted([killed, pid]), "not one attempt on each worker"
        # the nanny put a new process in the dead one's place
        client.wait_for_workers(2, timeout=60)
        live = cluster.live_worker_pids()
        assert len(live) == 2 and killed not in live.values(), live


def test_a_collected_result_is_not_computed_again_when_its_worker_dies(tmp_path):
    """What the stage relies on: a shard whose result came back is done, whatever happens to its
    worker later. A future still held (as Prefect's Dask task runner holds its tasks') is
    computed again instead: Dask recomputes what a client still wants from a dead worker."""
    collected, held = tmp_path / "collected", tmp_path / "held"
    collected.mkdir()
    held.mkdir()
    with dask_cluster(n_workers=2, tmp_path=tmp_path) as cluster, Client(cluster.address) as client:
        target = sorted(cluster.worker_pids)[0]
        pinned = {"workers": [target], "allow_other_workers": True}
        executor = client.get_executor(pure=False, **pinned)
        first = executor.submit(record_and_sleep, str(collected), 0).result(timeout=60)
        kept = client.submit(record_and_sleep, str(held), 0, pure=False, **pinned)
        second = kept.result(timeout=60)
        assert first == second == cluster.worker_pids[target]
        # the executor's future released its key: the scheduler holds the held task's only
        known = lambda: client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))  # noqa: E731
        wait_for(lambda: known() == 1, 30, "the collected task released")

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(attempts(held)) == 2, 60, "the held future computed again")
        assert kept.result(timeout=60) != first
        assert attempts(collected) == [first], "a collected result was computed again"
