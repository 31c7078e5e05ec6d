"""Publish loses nothing when it fails: a real `trainpipe publish` SIGKILLed at each of its steps
leaves no half-made version and no wrongly moved alias, and running it again finishes the job;
with MLflow unreachable it fails with one line, keeps models/, and a later publish finishes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import free_port, make_model_dir, write_metrics
from mlflow import MlflowClient

from pipelines.adapters.registry import champion_history
from pipelines.commands.promotion import DECISION_TAG, publish_model
from pipelines.core.data import sha256_file
from pipelines.core.params import Params, PublishParams
from pipelines.stages.publish import PAUSE_ENV

NAME = PublishParams().model_name
TRAINPIPE = str(Path(sys.executable).parent / "trainpipe")


def cli_publish(env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TRAINPIPE, "publish"], env=env, capture_output=True, text=True, timeout=180)


def kill_publish_at(point: str) -> None:
    proc = subprocess.Popen(
        [TRAINPIPE, "publish"],
        env=dict(os.environ, **{PAUSE_ENV: point}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.strip() == f"publish: paused at {point}":
            break
    else:
        raise AssertionError(f"publish ended (code {proc.wait()}) before reaching {point}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def registry(client: MlflowClient) -> dict:
    """Every version with its tags, and where the aliases and the champion history point."""
    model = client.get_registered_model(NAME)
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name = '{NAME}'")}
    aliases = {alias: str(v) for alias, v in model.aliases.items()}
    history = ",".join(move["to"] for move in champion_history(client, NAME))
    return {"versions": versions, "aliases": aliases, "history": history}


def test_publish_killed_at_each_step_is_finished_by_running_it_again(mlflow_env, model_dir, tmp_path):
    write_metrics(tmp_path / "reports", 2.1)
    assert publish_model(Params())["version"] == "1"  # the champion
    make_model_dir(model_dir, seed=7)  # a better model is now in the workspace
    write_metrics(tmp_path / "reports", 1.9)
    weights_sha = sha256_file(model_dir / "model.safetensors")
    client = MlflowClient()
    before = registry(client)

    kill_publish_at("model-logged")  # logged into a run, not registered: the registry is unchanged
    assert registry(client) == before

    kill_publish_at("registered")  # a whole version (all its tags), no alias moved yet
    state = registry(client)
    assert set(state["versions"]) == {"1", "2"}
    assert state["versions"]["2"]["weights_sha256"] == weights_sha
    assert state["versions"]["2"]["val_bits_per_byte"] == "1.9" and DECISION_TAG not in state["versions"]["2"]
    assert state["aliases"] == before["aliases"] == {"champion": "1", "challenger": "1"}

    # the re-run finds v2 and carries on; killed before the gate moved @champion
    kill_publish_at("challenger-alias-set")
    state = registry(client)
    assert set(state["versions"]) == {"1", "2"} and state["aliases"] == {"champion": "1", "challenger": "2"}
    assert DECISION_TAG not in state["versions"]["2"] and state["history"] == before["history"]

    kill_publish_at("champion-alias-set")  # the gate passed and moved @champion; not yet recorded
    state = registry(client)
    assert set(state["versions"]) == {"1", "2"} and state["aliases"] == {"champion": "2", "challenger": "2"}

    done = cli_publish()
    assert done.returncode == 0, done.stderr
    assert "finished the publish of v2 that was cut short" in done.stdout
    state = registry(client)
    assert set(state["versions"]) == {"1", "2"}  # the same weights were never registered twice
    assert state["aliases"] == {"champion": "2", "challenger": "2"} and state["history"] == "1,2"
    assert "promoted_at" in state["versions"]["2"] and DECISION_TAG in state["versions"]["2"]
    last = champion_history(client, NAME)[-1]  # the move the killed publish began, recorded once
    assert (last["from"], last["to"], last["command"]) == ("1", "2", "trainpipe publish")
    again = publish_model(Params())
    assert again["version"] == "2" and "nothing new to publish" in again["reason"]


def test_unreachable_mlflow_fails_in_one_line_and_a_later_publish_finishes(mlflow_env, model_dir, tmp_path):
    write_metrics(tmp_path / "reports", 2.0)
    models_before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",  # MLflow retries, quickly here, then gives up
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
    failed = cli_publish(env)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trainpipe publish: publishing to MLflow at {uri} failed (")
    assert last.endswith("the trained model stays in models/: run `trainpipe publish` to finish")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == models_before

    done = cli_publish()  # MLflow back (the SQLite registry of this test)
    assert done.returncode == 0, done.stderr
    assert "becomes champion" in done.stdout
    assert registry(MlflowClient())["aliases"] == {"champion": "1", "challenger": "1"}
