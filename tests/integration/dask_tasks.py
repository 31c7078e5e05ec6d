"""Tasks that tests/integration/test_dask_cluster.py sends to a real Dask cluster. Imported there
as `tests.integration.dask_tasks`, a name the scheduler and the workers import too (the project
root is on their PYTHONPATH): Dask pickles a task's function by reference, and the scheduler
unpickles every task graph."""

import os
import time
from pathlib import Path


def record_and_sleep(marker_dir: str, seconds: float) -> int:
    """Leave this attempt's pid in marker_dir, sleep, return the pid."""
    pid = os.getpid()
    (Path(marker_dir) / str(pid)).touch()
    time.sleep(seconds)
    return pid
