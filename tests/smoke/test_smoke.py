"""The fast tier's end-to-end check: one tiny project, fresh from a clone, from ingest to an
answer served over HTTP. Every component is real: `dvc repro` under a Prefect flow run
(`trainpipe run`), Great Expectations in curate, PyTorch training, an MLflow registry on SQLite,
and `trainpipe serve` (MLflow's scoring server following @champion).

The integration tier (tests/integration) checks each of these in depth; this one says in about
two minutes whether the chain still holds."""

import subprocess
import time

import pytest
import requests
from conftest import BIN, MODEL, SMALL, free_port, make_project, stop_process_group, trainpipe
from mlflow import MlflowClient

# Fewer steps than the integration tier's projects: this checks the chain, not the model.
TINY = [*SMALL, "train.max_steps=20", "train.checkpoint_every=10", "train.warmup_steps=5"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template_db):
    return make_project(tmp_path_factory.mktemp("smoke"), mlflow_template_db, TINY)


def test_a_fresh_project_trains_registers_and_serves_an_answer(project):
    proj, env = project
    run = subprocess.run(
        [str(BIN / "trainpipe"), "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("ingest", "curate", "tokenize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout, run.stdout[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert (proj / "data/curated/part-00000.parquet").exists() and (
        proj / "models/model.safetensors"
    ).exists()

    port = free_port()
    log_path = proj.parent / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(BIN / "trainpipe"), "serve", "--port", str(port)],
            cwd=proj, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/invocations"
    body = {"dataframe_records": [{"prompt": "def add(a, b):\n"}], "params": {"max_new_tokens": 8, "seed": 1}}
    try:
        deadline = time.monotonic() + 120
        answer = None
        while answer is None:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no answer in 120 s:\n{log_path.read_text()[-3000:]}"
            try:
                answer = requests.post(url, json=body, timeout=30)
            except requests.ConnectionError:
                time.sleep(0.5)
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        assert prediction["model_version"] == "1"
        assert isinstance(prediction["completion"], str) and prediction["completion"]
        bad = requests.post(url, json={"dataframe_records": [{"prompt": ""}]}, timeout=30)
        assert 400 <= bad.status_code < 500 and "prompt" in bad.text
    finally:
        stop_process_group(server)

    status = trainpipe(proj, env, "status")
    assert status.returncode == 0 and "champion" in status.stdout, status.stderr[-2000:]
