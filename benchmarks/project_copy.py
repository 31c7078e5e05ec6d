"""Temporary copies of the project for benchmarks that run it as a user does (trainpipe, dvc repro).

Not a benchmark itself: run_overhead.py and curate_bench.py import it.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path, rev: str | None, overrides: list[str]) -> Path:
    """The tracked files (tests aside) of the working tree, or of commit rev, as a fresh git repository."""
    if rev is None:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
        for name in names.stdout.split():
            if not name.startswith("tests/") and (REPO / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dest / name)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        shutil.rmtree(dest / "tests", ignore_errors=True)
    if overrides:  # validated by the copy's own schema: a baseline's params may differ from ours
        save = "import sys; from pipelines.core.params import save_overrides; save_overrides('params.yaml', sys.argv[1:])"
        subprocess.run(
            [sys.executable, "-c", save, *overrides],
            cwd=dest,
            env={**os.environ, "PYTHONPATH": str(dest)},
            check=True,
        )
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "copy"],
    ):
        subprocess.run(["git", *args], cwd=dest, check=True)
    return dest


def project_env(proj: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TRAINPIPE_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(proj),  # the copy's code, as a clone's editable install would give
        PREFECT_HOME=str(proj / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{proj / 'mlflow.db'}",
    )
    return env
