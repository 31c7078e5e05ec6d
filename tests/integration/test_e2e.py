"""End to end on a slice of the real stdlib corpus, with every component real: `dvc repro` in a
temporary git repository, Prefect flow runs through `trainpipe run`, an MLflow registry on
SQLite, and `trainpipe serve` answering HTTP."""

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import BIN, MODEL, free_port, make_project, sh, stop_process_group, trainpipe
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template_db):
    return make_project(tmp_path_factory.mktemp("e2e"), mlflow_template_db)


def champion(env) -> str | None:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    try:
        return str(client.get_model_version_by_alias(MODEL, "champion").version)
    except Exception:
        return None


# Each test runs alone or in any order: the module's project gets its first flow run from the
# fixture below, whichever test asks first, and a test that changes the project puts it back
# to the champion's state (the `scratch` fixture) or makes its own project.


@pytest.fixture(scope="module")
def first_run(project) -> subprocess.CompletedProcess:
    """The first `trainpipe run` on the fresh project: every stage runs, version 1 is champion."""
    proj, env = project
    # every stage runs: on a shared 2-core machine this can take over 5 minutes
    run = sh([str(BIN / "trainpipe"), "run"], proj, env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


REAL_STAGES = ["ingest", "curate", "tokenize", "train", "evaluate"]


def dvc_status(proj: Path, env: dict) -> str:
    """`dvc status` of the real stages: the `inputs` check is always changed, by design."""
    return sh([str(BIN / "dvc"), "status", *REAL_STAGES], proj, env).stdout


def settle(proj: Path, env: dict) -> None:
    """`dvc repro` after the champion moved: the inputs check records the new champion, so curate
    runs its drift check against it once; the curated data is the same, so nothing after it runs."""
    repro = sh([str(BIN / "dvc"), "repro"], proj, env)
    assert repro.returncode == 0, repro.stderr[-2000:]
    assert "Running stage 'tokenize'" not in repro.stdout, repro.stdout[-2000:]


@pytest.fixture(scope="module")
def settled(project, first_run) -> None:
    settle(*project)


@pytest.fixture
def published(project, first_run, settled) -> tuple[Path, dict]:
    """The module's project, trained and published, in the champion's state, with curate's drift
    reference brought up to the champion."""
    return project


def back_to_champion(proj: Path, env: dict) -> None:
    """Restore the champion's params, dvc.lock and outputs (the documented way back), then
    settle: the recorded dvc.lock is from before that version became champion."""
    run = trainpipe(proj, env, "restart")
    assert run.returncode == 0, run.stderr[-2000:]
    status = dvc_status(proj, env)
    assert "up to date" in status, status
    settle(proj, env)


@pytest.fixture
def scratch(published):
    """The published project for a test that changes it; put back to the champion's state after."""
    yield published
    back_to_champion(*published)


@pytest.fixture(scope="module")
def worse_challenger(project, first_run) -> dict:
    """A flow run with 3 training steps: its version becomes @challenger, not @champion. The
    workspace is put back to the champion's state afterwards."""
    proj, env = project
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = trainpipe(proj, env, "run", "-S", "train.max_steps=3")
    try:
        assert run.returncode == 0, run.stderr[-3000:]
        version = client.get_model_version_by_alias(MODEL, "challenger")
        return {"run": run, "version": version, "champion": champion(env)}
    finally:
        back_to_champion(proj, env)


def test_flow_run_executes_every_stage_and_publishes_champion(project, first_run):
    proj, env = project
    run = first_run
    for stage in ("ingest", "curate", "tokenize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout, stage
    for out in (
        "data/raw/part-00000.parquet",
        "data/curated/part-00000.parquet",
        "data/tokens/train.bin",
        "models/model.safetensors",
        "reports/metrics.json",
        "reports/curation.json",
        "reports/data_docs/index.html",
    ):
        assert (proj / out).exists(), out
    assert f"models:/{MODEL}@champion" in run.stdout and "trainpipe serve" in run.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    assert version.tags["prefect_flow_run_id"] and version.tags["data_version"]
    assert len(version.tags["git_commit"]) >= 40
    # the flow's Prefect artifact, read from the Prefect database the run used
    import sqlite3

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        (data,) = db.execute("SELECT data FROM artifact WHERE key = 'trainpipe-run'").fetchone()
    summary = json.loads(data)
    assert "| train | ran" in summary and "kept: " in summary and "val_bits_per_byte" in summary
    assert "becomes champion" in summary
    run_data = client.get_run(version.run_id).data
    assert "val_bits_per_byte" in run_data.metrics and run_data.params["train.max_steps"] == "60"
    # the training curve is in the flow's run: a point every train.log_every steps and the last
    from pipelines.core.params import load_params

    every = load_params(proj / "params.yaml").train.log_every
    history = client.get_metric_history(version.run_id, "train_loss")
    assert sorted(m.step for m in history) == [s for s in range(1, 61) if s % every == 0 or s == 60]
    assert all(0 < m.value < 20 for m in history)
    # MLflow's view: a model-training experiment; the data the run used, by DVC's hashes; the
    # machine's CPU and memory while it trained
    experiment = client.get_experiment_by_name("trainpipe")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    inputs = {i.dataset.name: i for i in client.get_run(version.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"curated", "tokens", "validation"}
    for name, stage in (("curated", "curate"), ("tokens", "tokenize")):
        (out,) = [o for o in lock[stage]["outs"] if o["path"] == f"data/{name}"]
        assert inputs[name].dataset.digest == out["md5"]
        source = json.loads(inputs[name].dataset.source)
        assert source == {"uri": f"data/{name}", "dvc_stage": stage, "git_commit": version.tags["git_commit"]}
    assert {t.key: t.value for t in inputs["validation"].tags} == {"mlflow.data.context": "evaluation"}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run_data.metrics
    )
    # the curated data's profile is stored with the model, for the data gate of later runs
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"data_profile.json", "curation"} <= artifacts
    curation = {a.path for a in client.list_artifacts(version.run_id, "curation")}
    assert {"curation/curation.json", "curation/gate.json", "curation/data_docs"} <= curation


def test_dvc_repro_after_a_flow_run_runs_nothing(published):
    # the flow and `dvc repro` share one cache and one dvc.lock
    proj, env = published
    repro = sh([str(BIN / "dvc"), "repro"], proj, env)
    assert repro.returncode == 0, repro.stderr[-2000:]
    # only the inputs check runs (always, by design); it finds the source and champion unchanged
    running = [line for line in repro.stdout.splitlines() if line.startswith("Running stage")]
    assert running == ["Running stage 'inputs':"] and "Stage 'train' didn't change" in repro.stdout
    assert "up to date" in dvc_status(proj, env)


def test_unchanged_rerun_executes_nothing_and_registers_nothing(published):
    proj, env = published
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    before = {str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")}
    run = trainpipe(proj, env, "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Running stage" not in run.stdout and "nothing new to publish" in run.stdout
    assert "unchanged: data, code and params as before; DVC skipped every stage" in run.stdout
    assert {str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")} == before
    latest = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id], order_by=["start_time DESC"]
    )[0]
    assert {k: v for k, v in latest.data.tags.items() if k.startswith("stage.")} == {
        f"stage.{s}": "skipped" for s in ("parent", "ingest", "curate", "tokenize", "train", "evaluate")
    }
    # still a Prefect flow run, in the project's Prefect database, with a task run per step
    import sqlite3

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        flow_run_id, state = db.execute(
            "SELECT id, state_type FROM flow_run ORDER BY created DESC LIMIT 1"
        ).fetchone()
        tasks = dict(
            db.execute("SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (flow_run_id,))
        )
    assert state == "COMPLETED" and latest.data.tags["prefect_flow_run_id"] == flow_run_id
    assert {t: tasks.get(t) for t in REAL_STAGES} == dict.fromkeys(REAL_STAGES, "COMPLETED"), tasks
    assert {t.rsplit("-", 1)[0] for t in tasks} >= {"record_inputs", "push_outputs", "publish"}
    assert "Starting temporary server" not in run.stderr + run.stdout  # trainpipe started its own, first
    assert "up to date" in dvc_status(proj, env)  # the inputs check left the stages up to date


def test_worse_challenger_does_not_replace_champion(published, worse_challenger):
    proj, env = published
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = worse_challenger["run"]
    assert "Running stage 'train'" in run.stdout and "Running stage 'curate'" not in run.stdout
    assert worse_challenger["champion"] == "1"
    version = worse_challenger["version"]
    assert str(version.version) != "1"  # MLflow 3.17 gives an int: without str() this always passed
    assert version.tags["weights_sha256"] != client.get_model_version(MODEL, "1").tags["weights_sha256"]
    # train logged its curve into the flow's run: 3 steps, one point (the last step)
    assert [m.step for m in client.get_metric_history(version.run_id, "train_loss")] == [3]
    tags = client.get_run(version.run_id).data.tags
    assert (tags["stage.ingest"], tags["stage.train"], tags["stage.evaluate"]) == ("skipped", "ran", "ran")
    stages = {s["stage"]: s for s in mlflow_dict(client, version.run_id, "stages.json")}
    assert stages["train"]["reason"] == "changed deps: train.max_steps modified"


def test_compare_reads_champion_and_challenger_side_by_side(published, worse_challenger):
    """`trainpipe compare` on two versions the flow published: the one param changed, the same
    data and code, the gate's interval, both runs' cost and the MLflow UI's compare page."""
    from urllib.parse import unquote

    proj, env = published
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    v1, v2 = client.get_model_version(MODEL, "1"), worse_challenger["version"]
    shown = trainpipe(proj, env, "compare", str(v2.version))  # one argument: against @champion
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"model {MODEL}: A is v1 @champion, B is v{v2.version}")
    assert all(len(line) <= 120 for line in lines[:-2]), lines  # the URL and the command: whole

    def cells(label: str) -> list[str]:
        (line,) = [line for line in lines if line[:40].rstrip() == label]
        return [line[42:74].strip(), line[76:108].strip(), line[110:].strip()]

    assert any(line.startswith("params that differ (1 of ") for line in lines), lines
    assert cells("train.max_steps") == ["60", "3", ""]
    assert cells("val_bits_per_byte")[:2] == [
        f"{client.get_run(v.run_id).data.metrics['val_bits_per_byte']:.4f}" for v in (v1, v2)
    ]
    for data in ("source manifest", "data/raw", "data/curated", "data/tokens"):
        assert cells(data)[2] == "same", data
    assert cells("data/tokens")[0] == v1.tags["data_version"][:12]
    assert cells("data")[0] == "the same data"
    code = cells("code (git commit)")
    assert code[0] == code[1] and code[0].startswith(v1.tags["git_commit"][:12]) and code[2] == "same"
    interval = cells("bits per byte, B - A")[0]
    assert f"from v{v2.version}'s gate against v1" in " ".join(lines), lines
    assert interval.startswith(f"{float(v2.tags['bpb_delta']):+.4f} bpb [")
    assert all(cost.startswith("$") for cost in cells("training run")[:2])
    url = unquote(lines[-2])
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    experiment = client.get_run(v1.run_id).info.experiment_id
    assert url.endswith(f'runs=["{v1.run_id}","{v2.run_id}"]&experiments=["{experiment}"]')


def mlflow_dict(client: MlflowClient, run_id: str, path: str):
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def test_failed_gate_leaves_champion_and_checkpoints_alone(scratch):
    proj, env = scratch
    ckpt_before = sorted((p.name, p.stat().st_mtime_ns) for p in (proj / "checkpoints").iterdir())
    run = trainpipe(proj, env, "run", "-S", "curate.gate.min_documents=100000")
    assert run.returncode == 3
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("trainpipe run: data gate failed: expect_table_row_count_to_be_between")
    assert "Traceback" not in run.stderr + run.stdout  # the reason is one line, not Prefect's traceback
    assert "Running stage 'tokenize'" not in run.stdout and "Running stage 'train'" not in run.stdout
    assert champion(env) == "1"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (proj / "checkpoints").iterdir()) == ckpt_before
    # the failed gate's reports reached the flow's MLflow run and Prefect
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (failed_run,) = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id],
        "attributes.status = 'FAILED'",
        max_results=1,
    )
    assert "curation/data_docs" in {a.path for a in client.list_artifacts(failed_run.info.run_id, "curation")}
    import sqlite3

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        (table,) = db.execute(
            "SELECT data FROM artifact WHERE key = 'trainpipe-curation' ORDER BY created DESC LIMIT 1"
        ).fetchone()
    assert "expect_table_row_count_to_be_between" in table and "FAILED" in table

    # a corpus ten times smaller than the champion's: drift blocks it, and nothing trains
    run = trainpipe(proj, env, "run", "-S", "data.max_documents=15", "-S", "curate.gate.min_documents=5")
    assert run.returncode == 3, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "drift_documents (observed " in last and " vs champion " in last, last
    assert "Running stage 'train'" not in run.stdout and champion(env) == "1"


def test_a_better_run_reaches_the_running_endpoint_without_a_restart(scratch):
    """`trainpipe serve` answers from the champion; `trainpipe run` of a better model (more steps)
    promotes it, and the flow waits until the endpoint serves it: no restart, and it says so."""
    proj, env = scratch
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    old = champion(env)
    port = free_port()
    log_path = proj.parent / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(BIN / "trainpipe"), "serve", "--port", str(port), "-S", "serve.poll_s=2"],
            cwd=proj, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {"dataframe_records": [{"prompt": "def add(a, b):\n"}], "params": {"max_new_tokens": 12}}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.post(f"{url}/invocations", json=body, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        good = requests.post(f"{url}/invocations", json=body, timeout=30)
        assert good.status_code == 200, log_path.read_text()[-3000:]
        prediction = good.json()["predictions"][0]
        assert isinstance(prediction["completion"], str) and prediction["model_version"] == old
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"prompt": ""}]}, timeout=30)
        assert 400 <= bad.status_code < 500 and "prompt" in bad.text

        # 300 steps: well past the tiny model's early plateau, so that every scored document gains
        # and the bootstrap interval clears zero (at 150 a float-order change could leave it at -0.01)
        run = trainpipe(proj, env, "run", "-S", "train.max_steps=300")
        assert run.returncode == 0, run.stderr[-3000:]
        new = champion(env)
        assert new != old, run.stdout[-2000:]
        assert f"serving: {url} serves champion v{new}" in run.stdout, run.stdout[-2000:]
        latest = client.search_runs(
            [client.get_experiment_by_name("trainpipe").experiment_id], order_by=["start_time DESC"]
        )[0]
        assert latest.data.tags["serving.endpoints"] == f"{url}=v{new}"
        after = requests.post(f"{url}/invocations", json=body, timeout=30)
        assert after.status_code == 200 and after.json()["predictions"][0]["model_version"] == new
        assert server.poll() is None  # the same process: no restart
        status = trainpipe(proj, env, "status")
        assert f"endpoint:   {url} serves v{new}" in status.stdout and "(the champion)" in status.stdout
        # and back: the module's other tests expect the first champion (scratch restores its state)
        back = trainpipe(proj, env, "rollback")
        assert back.returncode == 0 and champion(env) == old, back.stderr[-2000:]
        deadline = time.time() + 15
        while time.time() < deadline:
            answer = requests.post(f"{url}/invocations", json=body, timeout=30)
            if answer.json()["predictions"][0]["model_version"] == old:
                break
            time.sleep(0.5)
        assert answer.json()["predictions"][0]["model_version"] == old
    finally:
        if champion(env) != old:
            trainpipe(proj, env, "rollback")
        stop_process_group(server)


def test_restart_restores_the_champions_data_and_model(scratch, tmp_path, monkeypatch):
    import mlflow

    proj, env = scratch
    bad = trainpipe(proj, env, "train", "-S", "train.max_steps=3")  # a bad run in the workspace
    assert bad.returncode == 0, bad.stderr[-2000:]
    assert "max_steps: 3" in (proj / "params.yaml").read_text()
    run = trainpipe(proj, env, "restart")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "version 1" in run.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # the models:/ resolver reads it
    registered = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path)))
    weights = next(registered.rglob("model.safetensors")).read_bytes()
    assert (proj / "models/model.safetensors").read_bytes() == weights
    assert "max_steps: 60" in (proj / "params.yaml").read_text()
    status = dvc_status(proj, env)
    assert "up to date" in status, status


def test_restart_is_the_way_back_after_git_checkout_of_the_committed_lock(scratch):
    # `git checkout -- .` after a run puts back the committed dvc.lock, whose md5s are not this
    # workspace's: `dvc checkout` would then delete outputs. `trainpipe restart` restores.
    proj, env = scratch
    git = sh(["git", "checkout", "--", "dvc.lock", "params.yaml"], proj, env)
    assert git.returncode == 0, git.stderr
    stale = dvc_status(proj, env)
    assert "up to date" not in stale  # the state the test is about
    run = trainpipe(proj, env, "restart")
    assert run.returncode == 0, run.stderr[-2000:]
    status = dvc_status(proj, env)
    assert "up to date" in status, status
    registered = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(MODEL, "champion")
    weights = hashlib.sha256((proj / "models/model.safetensors").read_bytes()).hexdigest()
    assert weights == registered.tags["weights_sha256"]


def cache_objects(lock: dict, store: Path) -> set[Path]:
    """The files of a DVC 3 object store (the cache or a local remote) that a dvc.lock's outputs
    are made of: files/md5/ab/cdef..., a directory's file list in the object ending in .dir."""

    def obj(md5: str) -> Path:
        return Path("files", "md5", md5[:2], md5[2:])

    found = set()
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            found.add(obj(out["md5"]))
            if out["md5"].endswith(".dir"):
                found |= {obj(e["md5"]) for e in json.loads((store / obj(out["md5"])).read_text())}
    return found


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def workspace_bytes(proj: Path) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every output file."""
    files = [proj / "params.yaml", proj / "dvc.lock"]
    for folder in ("data", "models", "reports"):
        files += [p for p in (proj / folder).rglob("*") if p.is_file()]
    return {str(p.relative_to(proj)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_restart_from_a_version_whose_outputs_are_gone_changes_nothing(published, worse_challenger, tmp_path):
    proj, env = published
    version = worse_challenger["version"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    recorded = Path(client.download_artifacts(version.run_id, "dvc.lock", str(tmp_path)))
    cache, remote = proj / ".dvc" / "cache", proj / ".dvc-remote"
    # the objects only that version has: in neither the cache nor the remote afterwards
    gone = cache_objects(read_yaml(recorded), cache) - cache_objects(read_yaml(proj / "dvc.lock"), cache)
    assert gone, "the worse version shares every object with the champion"
    aside = tmp_path / "aside"
    moved = []
    try:
        for store in (cache, remote):
            for rel in gone:
                if (store / rel).exists():
                    (aside / store.name / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(store / rel, aside / store.name / rel)
                    moved.append((aside / store.name / rel, store / rel))
        before = workspace_bytes(proj)
        run = trainpipe(proj, env, "restart", "--from", str(version.version))
        assert workspace_bytes(proj) == before  # params.yaml, dvc.lock and every output as they were
        assert run.returncode == 2, run.stderr[-2000:]
        lines = run.stderr.strip().splitlines()
        assert lines[-1].startswith(f"trainpipe restart: version {version.version} of '{MODEL}' cannot")
        assert "models (" in lines[-1] and "Traceback" not in run.stderr
    finally:
        for src, dst in moved:
            shutil.move(src, dst)


def test_gate_failure_on_a_fresh_project_trains_nothing(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    run = trainpipe(proj, env, "run", "-S", "curate.gate.min_bytes=999999999")
    assert run.returncode == 3
    assert "expect_column_sum_to_be_between" in run.stderr.strip().splitlines()[-1]
    assert (proj / "reports/curation.json").exists() and (proj / "reports/data_docs/index.html").exists()
    assert (proj / "data/raw/part-00000.parquet").exists()  # the raw snapshot is kept
    for never in ("data/curated/part-00000.parquet", "data/tokens", "models", "checkpoints"):
        assert not (proj / never).exists(), never
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).search_registered_models() == []
