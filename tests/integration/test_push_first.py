"""A champion's data can always be restored: the run's DVC outputs reach the remote before any
alias moves. With a remote that cannot be written, `trainpipe run` and `trainpipe publish` fail
with one line naming it and leave the registry untouched; once it is back, a re-run publishes.
Real DVC, Prefect and MLflow, on a temporary project as in test_e2e."""

import json
from pathlib import Path

import pytest
from conftest import BIN, MODEL, make_project, sh
from mlflow import MlflowClient
from test_e2e import champion

pytestmark = pytest.mark.slow


def trainpipe(proj: Path, env: dict, *args: str):
    return sh([str(BIN / "trainpipe"), *args], proj, env, timeout=1500)  # a whole run on a busy machine


def test_a_failed_push_stops_the_run_before_any_alias_moves(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file: nothing can be written under it\n")
    unwritable = blocker / "remote"
    dvc = str(BIN / "dvc")
    assert sh([dvc, "remote", "modify", "local", "url", str(unwritable)], proj, env).returncode == 0

    run = trainpipe(proj, env, "run")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Running stage 'train'" in run.stdout  # the stages ran; the push after them failed
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trainpipe run: dvc push to remote 'local' ({unwritable}) failed ("), last
    assert last.endswith(
        "nothing was published and @champion did not move: run again once the remote takes the push"
    )
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.search_registered_models() == []  # no version, no alias: the registry is untouched

    publish = trainpipe(proj, env, "publish")  # publishing by hand pushes first too
    assert publish.returncode == 1
    (line,) = publish.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"trainpipe publish: dvc push to remote 'local' ({unwritable}) failed (")
    assert line.endswith(
        "nothing was published: run `trainpipe publish` again once the remote takes the push"
    )
    assert client.search_registered_models() == [] and champion(env) is None

    assert sh([dvc, "remote", "modify", "local", "url", "../.dvc-remote"], proj, env).returncode == 0
    again = trainpipe(proj, env, "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout  # the outputs were kept: only push and publish were left
    assert champion(env) == "1"
    # the champion's model is in the remote: its md5 in dvc.lock names a file there
    lock = sh([dvc, "status", "--cloud", "--json"], proj, env)
    assert lock.returncode == 0 and json.loads(lock.stdout or "{}") == {}, lock.stdout
    # and its move is recorded with the flow run that made it
    history = trainpipe(proj, env, "history")
    assert history.returncode == 0, history.stderr
    (row,) = history.stdout.strip().splitlines()[1:]
    flow_run = client.get_model_version(MODEL, "1").tags["prefect_flow_run_id"]
    assert row[21:].split()[:5] == ["none", "->", "v1", "trainpipe", "run"] and flow_run[:8] in row
