"""The stack tier (`make test-stack`): the team stack started from nothing on its own ports, a
cron deployment whose schedule fires, runs through a real worker, the data on S3, both UIs
in Chromium, and two endpoints that follow one promotion under load. The tests run in file order
and build on each other, as a team's day would."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import requests
from conftest import stop_process_group, tracked_copy

from infra.stack import Stack

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "stack-model"
PORT_OFFSET = 300  # beside a `make stack` on the default ports
ARTIFACTS = REPO / "test-artifacts" / "stack"  # screenshots (git-ignored)
TINY = [
    "data.max_documents=120",
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=100000",
    "tokenize.vocab_size=400",
    "tokenize.val_fraction=0.1",
    "train.max_steps=40",
    "train.batch_size=8",
    "train.block_size=64",
    "train.n_layer=2",
    "train.n_head=2",
    "train.n_embd=64",
    "train.checkpoint_every=10",
    "train.warmup_steps=5",
    "train.compile=off",  # auto compiles on a CPU: inductor's seconds per training
    "evaluate.max_tokens=10000",
    "evaluate.sample_tokens=16",
    f"publish.model_name={MODEL}",
]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    mp = pytest.MonkeyPatch()
    # Quicker loops than a team needs, so the tier fits in minutes: the scheduler looks for due
    # schedules every 5 s, a worker polls every 2 s, a queued run asks for its slot every 5 s.
    mp.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
    mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    mp.setenv("PREFECT_DEPLOYMENT_CONCURRENCY_SLOT_WAIT_SECONDS", "5")
    # The state lives outside pytest's folder: a later pytest session sets /tmp/pytest-of-USER
    # back to 0700, and PostgreSQL (its own login when we are root) would lose its data folder.
    state = Path(tempfile.mkdtemp(prefix="trainpipe-stack-"))
    s = Stack(state, PORT_OFFSET, tracked_copy(root / "proj", TINY))
    t0 = time.monotonic()
    try:
        s.up(log=lambda line: print(f"stack up: {line}"))
        print(f"stack up from nothing in {time.monotonic() - t0:.0f} s")
        yield s
    finally:
        pids = [p.pid for p in map(s.process, ["postgres", "seaweedfs", "mlflow", "prefect", "worker"]) if p]
        s.down()
        mp.undo()
        shutil.rmtree(state, ignore_errors=True)
        assert not [pid for pid in pids if psutil.pid_exists(pid)], "a stack server outlived stack down"
        assert not listening(s.ports.values()), (
            f"ports still bound after stack down: {listening(s.ports.values())}"
        )


def listening(ports) -> list[int]:
    bound = []
    for port in ports:
        for extra in (0, 10000):  # SeaweedFS's gRPC ports too
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port + extra)) == 0:
                    bound.append(port + extra)
    return bound


def wait_for_run(stack: Stack, run_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = stack.prefect_api("GET", f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in FINAL:
            return run
        time.sleep(2)
    raise AssertionError(
        f"flow run {run_id} did not finish within {timeout_s:.0f} s; see {stack.log_file('worker')}"
    )


def worker_log_tail(stack: Stack, chars: int = 4000) -> str:
    """The end of the worker's log, where a failed flow run's traceback is: CI shows only this."""
    log = stack.log_file("worker")
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"no {log}"


def state_names(stack: Stack, run_id: str) -> list[str]:
    states = stack.prefect_api("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()
    return [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]


def deployment(stack: Stack) -> dict:
    cfg = stack.config["prefect"]
    return stack.prefect_api("GET", f"/deployments/name/{cfg['flow']}/{cfg['deployment']}").json()


def champion(stack: Stack) -> dict | None:
    try:
        return stack.mlflow_api(
            "GET", "/registered-models/alias", params={"name": MODEL, "alias": "champion"}
        ).json()["model_version"]
    except requests.HTTPError:
        return None


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def client_env(stack: Stack, checkout: Path, home: Path) -> dict:
    env = {**os.environ, **stack.client_env()}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(checkout), PREFECT_HOME=str(home))
    return env


def test_every_server_is_on_loopback_and_refuses_a_request_without_credentials(stack):
    for name in ("postgres", "seaweedfs", "mlflow", "prefect"):
        proc = stack.process(name)
        addresses = {
            c.laddr.ip for p in [proc, *proc.children(recursive=True)] for c in p.net_connections("inet")
        }
        addresses = {a for a in addresses if a}  # outgoing sockets have a local address too
        assert addresses <= {"127.0.0.1"}, f"{name} listens on {addresses}"
    mlflow_url = f"http://127.0.0.1:{stack.ports['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(mlflow_url, timeout=10).status_code == 401
    assert requests.get(mlflow_url, auth=("admin", "wrong"), timeout=10).status_code == 401
    prefect_url = f"http://127.0.0.1:{stack.ports['prefect']}/api/flows/filter"
    assert requests.post(prefect_url, json={}, timeout=10).status_code == 401
    assert stack.prefect_api("POST", "/flows/filter", json={}).ok
    assert stack.mlflow_api("GET", "/experiments/search", params={"max_results": 1}).ok
    # The UI calls the API on the server's own port, not Prefect's default 4200.
    ui = requests.get(f"http://127.0.0.1:{stack.ports['prefect']}/ui-settings", timeout=10).json()
    assert ui["api_url"] == f"http://127.0.0.1:{stack.ports['prefect']}/api"
    # no secret on any command line, which `ps` shows to every user of the machine
    secrets = [v for v in stack.secrets().values() if len(v) >= 8]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        assert not [s for s in secrets if s in cmdline], f"a secret on the command line of pid {proc.pid}"


@pytest.fixture(scope="module")
def scheduled_run(stack) -> dict:
    """The deployment's own schedule fires (an interval schedule anchored a few seconds ahead,
    beside the nightly cron), the worker picks the run up, the flow runs on tiny data."""
    dep = deployment(stack)
    assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 3 * * *"]
    anchor = datetime.now(UTC) + timedelta(seconds=10)
    schedule = {"schedule": {"interval": 3600, "anchor_date": anchor.isoformat()}, "active": True}
    stack.prefect_api("POST", f"/deployments/{dep['id']}/schedules", json=[schedule])
    query = {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"start_time": {"is_null_": False}}}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        started = stack.prefect_api("POST", "/flow_runs/filter", json=query).json()
        if started:
            break
        time.sleep(2)
    assert started, "the schedule did not fire, or no worker picked the run up, within 120 s"
    return wait_for_run(stack, started[0]["id"])


def test_the_schedule_fires_and_the_worker_runs_the_flow_to_completion(stack, scheduled_run):
    run = scheduled_run
    assert run["state"]["type"] == "COMPLETED", (run["state"], worker_log_tail(stack))
    assert run["auto_scheduled"], "the run was not created by the deployment's schedule"
    names = state_names(stack, run["id"])
    assert (
        names[0] == "Scheduled" and "Pending" in names and "Running" in names and names[-1] == "Completed"
    ), names
    assert run["infrastructure_pid"], "no worker process ran it"
    assert run["work_pool_name"] == stack.config["prefect"]["work_pool"]


def test_the_run_its_metrics_and_version_are_rows_in_postgres_and_objects_in_s3(stack, scheduled_run):
    version = champion(stack)
    assert version and version["version"] == "1"
    run = stack.mlflow_api("GET", "/runs/get", params={"run_id": version["run_id"]}).json()["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "val_bits_per_byte" in metrics and run["info"]["status"] == "FINISHED"

    # Imported here, not at the top: plain `make test` collects this file without the stack extra.
    import psycopg2

    db = psycopg2.connect(stack.postgres_uri("mlflow", "mlflow").replace("+psycopg2", ""))
    with db, db.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL,))
        assert cur.fetchall() == [(1, version["run_id"])]
        cur.execute(
            "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'val_bits_per_byte'",
            (run["info"]["run_id"],),
        )
        assert cur.fetchone()[0] == pytest.approx(metrics["val_bits_per_byte"])
    db.close()

    s3 = stack.s3()
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="trainpipe-mlflow", Prefix="artifacts/").get("Contents", [])
    ]
    model_id = version["source"].removeprefix("models:/")
    weights = [k for k in keys if model_id in k and k.endswith("model.safetensors")]
    assert weights, f"the registered model's weights are not in s3://trainpipe-mlflow ({len(keys)} objects)"

    # dvc push went to the stack's bucket: every pushed output of dvc.lock is an object there.
    import yaml

    lock = yaml.safe_load((stack.checkout / "dvc.lock").read_text())
    dvc_keys = {o["Key"] for o in s3.list_objects_v2(Bucket="trainpipe-dvc").get("Contents", [])}
    models_out = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models")
    md5 = models_out["md5"]
    assert f"trainpipe/files/md5/{md5[:2]}/{md5[2:]}" in dvc_keys, (
        "the model's DVC object is not in the bucket"
    )


def test_a_fresh_clone_restores_the_champion_from_s3_to_identical_weights(stack, scheduled_run, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(stack.checkout), str(clone)], check=True)
    env = client_env(stack, clone, tmp_path / "prefect")
    restart = subprocess.run(
        [str(BIN / "trainpipe"), "restart"], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert restart.returncode == 0, restart.stderr[-2000:]
    champion_weights = stack.checkout / "models" / "model.safetensors"
    assert sha256(clone / "models" / "model.safetensors") == sha256(champion_weights)
    # And plain `dvc pull` from the stack's remote, into an empty cache, gives the same bytes.
    shutil.rmtree(clone / ".dvc" / "cache")
    shutil.rmtree(clone / "models")
    pull = subprocess.run(
        [str(BIN / "dvc"), "pull", "-r", "stack", "--allow-missing", "train"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert pull.returncode == 0, pull.stderr[-2000:]
    assert sha256(clone / "models" / "model.safetensors") == sha256(champion_weights)


def test_two_runs_started_at_once_run_one_after_the_other(stack, scheduled_run):
    dep = deployment(stack)
    runs = [
        stack.prefect_api("POST", f"/deployments/{dep['id']}/create_flow_run", json={}).json()
        for _ in range(2)
    ]
    done = [wait_for_run(stack, r["id"]) for r in runs]
    assert [r["state"]["type"] for r in done] == ["COMPLETED", "COMPLETED"], [r["state"] for r in done]
    first, second = sorted(done, key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"], "the two runs overlapped"
    assert "AwaitingConcurrencySlot" in state_names(stack, second["id"]), (
        "the second run did not wait its turn"
    )


def test_trainpipe_run_works_against_the_stack_through_the_environment_alone(stack, scheduled_run, tmp_path):
    env = client_env(stack, stack.checkout, tmp_path / "prefect")
    run = subprocess.run(
        [str(BIN / "trainpipe"), "run"],
        cwd=stack.checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"127.0.0.1:{stack.ports['mlflow']}" in run.stdout, run.stdout[-1500:]
    # The flow run is on the stack's Prefect server (not a temporary one), outside any deployment.
    query = {"flow_runs": {"deployment_id": {"is_null_": True}}}
    runs = stack.prefect_api("POST", "/flow_runs/filter", json=query).json()
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]


@pytest.mark.xfail(
    strict=False,
    reason="open defect, intermittent (3 failures in 9 runs): Prefect sometimes marks the stopped "
    "run CRASHED at once, not RUNNING, and recover_orphans restarts RUNNING orphans only",
)
def test_a_worker_stopped_mid_training_loses_nothing(stack, scheduled_run):
    try:
        _a_worker_stopped_mid_training_loses_nothing(stack)
    finally:  # the tests after this one need a worker, whatever happened here
        if stack.process("worker") is None:
            stack.start_worker()


def _a_worker_stopped_mid_training_loses_nothing(stack):
    from pipelines.core.params import save_overrides

    before = champion(stack)
    save_overrides(stack.checkout / "params.yaml", ["train.max_steps=160", "train.checkpoint_every=10"])
    run = stack.prefect_api("POST", f"/deployments/{deployment(stack)['id']}/create_flow_run", json={}).json()
    deadline = time.monotonic() + 300
    while not list((stack.checkout / "checkpoints").glob("*/ckpt-*.pt")) and time.monotonic() < deadline:
        time.sleep(1)
    checkpoints = list((stack.checkout / "checkpoints").glob("*/ckpt-*.pt"))
    assert checkpoints, "training wrote no checkpoint within 300 s"

    assert stack.stop("worker")  # the flow run's process goes with it, mid-training
    orphan = stack.prefect_api("GET", f"/flow_runs/{run['id']}").json()
    assert orphan["state"]["type"] == "RUNNING", "Prefect should still believe the run is running"
    assert champion(stack)["version"] == before["version"], "the champion moved while the run was killed"

    stack.start_worker()  # finds the orphan, marks it CRASHED, starts the deployment again
    crashed = stack.prefect_api("GET", f"/flow_runs/{run['id']}").json()
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    query = {"flow_runs": {"tags": {"all_": [f"restarts:{run['id']}"]}}}
    (again,) = stack.prefect_api("POST", "/flow_runs/filter", json=query).json()
    finished = wait_for_run(stack, again["id"])
    assert finished["state"]["type"] == "COMPLETED", finished["state"]

    import json

    # train's DVC metric of the run that finished: the step it resumed from
    training = json.loads((stack.checkout / "reports" / "training.json").read_text())
    assert training["resumed_from_step"] >= 10, (
        "training started over instead of resuming from its checkpoint"
    )
    after = champion(stack)
    versions = stack.mlflow_api("GET", "/model-versions/search", params={"filter": f"name='{MODEL}'"}).json()
    for v in versions["model_versions"]:
        tags = {t["key"]: t["value"] for t in v.get("tags", [])}
        assert tags.get("prefect_flow_run_id") != run["id"], "the killed run registered a version"
    if after["version"] != before["version"]:
        tags = {t["key"]: t["value"] for t in after.get("tags", [])}
        assert tags["prefect_flow_run_id"] == again["id"]
        assert tags["weights_sha256"] == sha256(stack.checkout / "models" / "model.safetensors")


def test_the_uis_show_the_deployment_its_schedule_the_runs_and_the_version(stack, scheduled_run):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = stack.client_env()
    prefect = f"http://127.0.0.1:{stack.ports['prefect']}"
    dep = deployment(stack)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
            + ["--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.goto(prefect + "/", wait_until="networkidle")
            page.get_by_placeholder("admin:pass").fill(env["PREFECT_API_AUTH_STRING"])
            page.get_by_role("button", name="Login").click()
            page.wait_for_load_state("networkidle")

            page.goto(f"{prefect}/deployments/deployment/{dep['id']}", wait_until="networkidle")
            page.get_by_text("nightly").first.wait_for(timeout=30000)
            try:  # both schedules, as Prefect's UI words them: the cron and the test's interval
                page.get_by_text("At 03:00 AM every day").first.wait_for(timeout=30000)
                page.get_by_text("Hourly").first.wait_for(timeout=30000)
            finally:
                page.screenshot(path=str(ARTIFACTS / "prefect-deployment.png"), full_page=True)

            page.goto(f"{prefect}/runs/flow-run/{scheduled_run['id']}", wait_until="networkidle")
            page.get_by_text(scheduled_run["name"]).first.wait_for(timeout=30000)
            page.get_by_text("Completed").first.wait_for(timeout=30000)
            page.screenshot(path=str(ARTIFACTS / "prefect-flow-run.png"), full_page=True)
            body = page.inner_text("body")
            assert "Can't connect" not in body and "Authentication failed" not in body, body[:500]

            credentials = {
                "username": env["MLFLOW_TRACKING_USERNAME"],
                "password": env["MLFLOW_TRACKING_PASSWORD"],
            }
            mlflow_page = browser.new_context(http_credentials=credentials).new_page()
            version = champion(stack)
            run = stack.mlflow_api("GET", "/runs/get", params={"run_id": version["run_id"]}).json()["run"]
            experiment, run_name = run["info"]["experiment_id"], run["info"]["run_name"]
            mlflow_page.goto(
                f"{env['MLFLOW_TRACKING_URI']}/#/experiments/{experiment}/runs/{version['run_id']}"
            )
            mlflow_page.get_by_text(run_name).first.wait_for(timeout=30000)
            mlflow_page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"), full_page=True)
            mlflow_page.goto(f"{env['MLFLOW_TRACKING_URI']}/#/models/{MODEL}")
            mlflow_page.get_by_text(f"Version {version['version']}").first.wait_for(timeout=30000)
            # the alias chip in the versions table reads "@ champion" (a tag key may say champion_...)
            mlflow_page.get_by_text(re.compile(r"^@\s*champion$")).first.wait_for(timeout=30000)
            mlflow_page.screenshot(path=str(ARTIFACTS / "mlflow-model.png"), full_page=True)
        finally:
            browser.close()


# -- many endpoints: two `trainpipe serve` following one @champion ------------------------------

# What a serving pod gets (infra/k8s/serve.yaml): the registry's login, no S3 key, no Prefect.
ENDPOINT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def endpoint_env(stack: Stack) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    env.update({k: stack.client_env()[k] for k in ENDPOINT_ENV})
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(stack.checkout))
    env.update(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    return env


def answers_on(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def two_endpoints(stack, scheduled_run, tmp_path_factory):
    """Two `trainpipe serve` on the stack's registry, on 127.0.0.1 and ports of their own beside
    serve.port, each following @champion every second; stopped by their process groups."""
    from pipelines.commands.status import ask_endpoint
    from pipelines.core.params import Params

    logs = tmp_path_factory.mktemp("endpoints")
    first = Params().serve.port + PORT_OFFSET
    ports = [first, first + 1]
    assert not [p for p in ports if answers_on(p)], f"something already listens on {ports}"
    env, procs = endpoint_env(stack), []
    started = time.monotonic()
    try:
        for port in ports:
            with (logs / f"serve-{port}.log").open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [str(BIN / "trainpipe"), "serve", "--port", str(port), "-S", "serve.poll_s=1"],
                        cwd=stack.checkout,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, port, proc in zip(urls, ports, procs, strict=True):
            while ask_endpoint(url, timeout_s=2) is None:
                log = (logs / f"serve-{port}.log").read_text()[-3000:]
                assert proc.poll() is None, f"trainpipe serve on {port} exited {proc.returncode}:\n{log}"
                assert time.monotonic() - started < 240, f"{url} did not answer within 240 s:\n{log}"
                time.sleep(1)
        print(f"\ntwo endpoints answering after {time.monotonic() - started:.0f} s")
        yield {"urls": urls, "ports": ports, "procs": procs, "env": env, "logs": logs}
    finally:
        for proc in procs:
            stop_process_group(proc, timeout_s=30)
        assert not [p for p in ports if answers_on(p)], f"an endpoint outlived its stop on {ports}"


class LoadOnEndpoints:
    """Clients posting back to back to each endpoint; every answer kept with its url, the time its
    request started, its status (or the exception) and the model_version that answered."""

    def __init__(self, urls: list[str], clients_per_url: int = 2):
        self.stop = threading.Event()
        self.answers: list[tuple[str, float, int | str, str | None]] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(url,)) for url in urls for _ in range(clients_per_url)
        ]

    def _loop(self, url: str) -> None:
        session, i = requests.Session(), 0
        while not self.stop.is_set():
            body = {
                "dataframe_records": [{"prompt": "def f(x):"}],
                "params": {"max_new_tokens": 8, "seed": i},
            }
            started = time.monotonic()
            try:
                r = session.post(f"{url}/invocations", json=body, timeout=60)
                version = r.json()["predictions"][0].get("model_version") if r.ok else None
                self.answers.append((url, started, r.status_code, version))
            except (requests.RequestException, ValueError) as exc:
                self.answers.append((url, started, type(exc).__name__, None))
            i += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def test_two_endpoints_follow_a_promotion_under_load_and_the_flow_waits_for_both(
    stack, two_endpoints, tmp_path, monkeypatch
):
    """Clients on both endpoints while `trainpipe promote` moves @champion: every answer is 2xx,
    and the flow's wait for the endpoints (reach_endpoints: wait_for_champion) returns only once
    both serve the new champion."""
    from pipelines.adapters.registry import register_version
    from pipelines.commands.status import wait_for_champion
    from pipelines.core.params import load_params

    for name in ENDPOINT_ENV:  # the flow's process reads the registry as the endpoints do
        monkeypatch.setenv(name, two_endpoints["env"][name])
    current, urls = champion(stack), two_endpoints["urls"]
    # A version no endpoint has loaded, whatever versions the tests above left: the champion's
    # logged model registered again (a number of its own, the same weights).
    before, target = current["version"], register_version(current["source"], MODEL, {})
    assert target != before
    params = load_params(stack.checkout / "params.yaml", ["serve.wait_s=90"])

    with LoadOnEndpoints(urls) as load:
        time.sleep(3)
        promote = subprocess.run(
            [str(BIN / "trainpipe"), "promote", target],
            cwd=stack.checkout,
            env=client_env(stack, stack.checkout, tmp_path / "prefect"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert promote.returncode == 0, promote.stderr[-2000:]
        waited = wait_for_champion(params, target)
        reached = time.monotonic()
        time.sleep(3)

    failed = [a for a in load.answers if a[2] != 200]
    print(f"\n{len(load.answers)} answers across the promotion to v{target} (was v{before})")
    assert load.answers and not failed, f"{len(failed)} failed answers, e.g. {failed[:5]}"
    assert not waited["failed"], waited["reason"]
    assert sorted(waited["endpoints"], key=lambda ep: ep["url"]) == [
        {"url": url, "version": target} for url in sorted(urls)
    ], waited
    for url in urls:
        mine = [(started, version) for u, started, _, version in load.answers if u == url]
        assert {version for _, version in mine} == {before, target}, (url, {v for _, v in mine})
        after = {version for started, version in mine if started > reached}
        assert after == {target}, f"{url} answered with {after} after the flow's wait returned"


def test_status_lists_both_endpoints(stack, two_endpoints):
    import json

    def status(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "trainpipe"), "status", *args],
            cwd=stack.checkout,
            env=two_endpoints["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    found = json.loads(status("--json"))
    version = found["champion"]["version"]
    listed = {ep["url"]: ep for ep in found["endpoints"]}
    assert set(listed) == set(two_endpoints["urls"]), listed
    assert {ep["key"] for ep in listed.values()} == {
        f"endpoint/127.0.0.1-{p}" for p in two_endpoints["ports"]
    }
    for ep in listed.values():
        assert ep["answering"] and ep["serves"] == version and ep["is_champion"], ep
        assert ep["host"] == socket.gethostname() and psutil.pid_exists(ep["pid"]), ep
    text = status()
    for url in two_endpoints["urls"]:
        assert f"endpoint:   {url} serves v{version} since" in text, text


def test_stopped_endpoints_clear_their_records(stack, two_endpoints):
    for proc in two_endpoints["procs"]:
        stop_process_group(proc, timeout_s=30)
    model = stack.mlflow_api("GET", "/registered-models/get", params={"name": MODEL}).json()
    recorded = [
        t["key"] for t in model["registered_model"].get("tags", []) if t["key"].startswith("endpoint/")
    ]
    assert recorded == [], f"stopped endpoints left their records: {recorded}"


# -- two workspaces publishing to the one registry ----------------------------------------------

RACE_MODEL = "stack-race-model"  # a model of its own: independent of what the tests above left


def test_two_publishes_at_once_each_move_the_champion_they_compared_with(stack, tmp_path):
    """Two workspaces publish to the stack's MLflow at once; both pass the gate against v1, one
    moves @champion first. The other must not replace that champion unseen: it gates again
    against it, and every move's record and the interval on its version name the same champion."""
    from conftest import make_model_dir, write_metrics

    from pipelines.stages.publish import PAUSE_ENV, RESUME_ENV

    env = client_env(stack, stack.checkout, tmp_path / "prefect")
    workspaces = {}
    for ws, seed in (("a", 1), ("b", 2)):
        workspaces[ws] = tmp_path / ws
        make_model_dir(workspaces[ws] / "models", seed=seed)
        (workspaces[ws] / "params.yaml").write_text(f"publish:\n  model_name: {RACE_MODEL}\n")

    def publish(ws: str, bpb: float, pause: bool = False) -> subprocess.Popen:
        write_metrics(workspaces[ws] / "reports", bpb)
        pause_env = {PAUSE_ENV: "gate-decided", RESUME_ENV: str(tmp_path / f"resume-{ws}")} if pause else {}
        return subprocess.Popen(
            [str(BIN / "trainpipe"), "publish"],
            cwd=workspaces[ws],
            env={**env, **pause_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(proc: subprocess.Popen) -> str:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-2000:]
        return out

    finish(publish("a", 2.10))  # v1, the champion both compare with
    make_model_dir(workspaces["a"] / "models", seed=3)
    procs = {"a": publish("a", 1.90, pause=True), "b": publish("b", 1.70, pause=True)}
    for ws, proc in procs.items():  # both gates read @champion v1 and decided to promote
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == "publish: paused at gate-decided":
                break
        else:
            raise AssertionError(
                f"publish in {ws} ended ({proc.wait()}) before its gate decided: {seen[-20:]}"
            )
    (tmp_path / "resume-a").touch()
    out_a = finish(procs["a"])  # a moves @champion from v1
    (tmp_path / "resume-b").touch()
    out_b = finish(procs["b"])  # b finds a's version there, not v1

    def version(out: str) -> str:
        return re.search(rf"registered models:/{RACE_MODEL}/(\d+) version", out).group(1)

    va, vb = version(out_a), version(out_b)
    assert f"@champion moved from v1 to v{va} while v{vb} was gated: gating again against v{va}" in out_b
    assert f"becomes champion in place of v{va}" in out_b  # 1.70 beats 1.90 by 0.2 on every document
    model = stack.mlflow_api("GET", "/registered-models/get", params={"name": RACE_MODEL}).json()
    records = [
        json.loads(t["value"])
        for t in sorted(model["registered_model"]["tags"], key=lambda t: t["key"])
        if t["key"].startswith("champion_move/")
    ]
    assert [(r["from"], r["to"]) for r in records] == [(None, "1"), ("1", va), (va, vb)]
    final = stack.mlflow_api(
        "GET", "/registered-models/alias", params={"name": RACE_MODEL, "alias": "champion"}
    ).json()["model_version"]
    assert final["version"] == vb
    for record in records[1:]:  # no champion was replaced by a version gated against another
        got = stack.mlflow_api(
            "GET", "/model-versions/get", params={"name": RACE_MODEL, "version": record["to"]}
        ).json()["model_version"]
        tags = {t["key"]: t["value"] for t in got["tags"]}
        assert tags["bpb_delta_vs"] == record["from"], (record, tags)
        assert tags["alias_decision"] == record["reason"], (record, tags)


# -- SeaweedFS's own ports take no S3 key: they must refuse what S3 did not sign ----------------


def test_seaweedfs_filer_and_volume_refuse_writes_without_a_jwt_while_s3_works(stack):
    """The filer and volume ports bypass S3's keys; with the stack's JWT signing keys a write
    (and a filer read) there without a token is refused, and S3 with its keys still works."""
    s3, bucket = stack.s3(), stack.config["s3"]["buckets"]["mlflow"]
    key = "jwt-check/object.txt"  # a key of its own: independent of what the tests above left
    s3.put_object(Bucket=bucket, Key=key, Body=b"written through S3")

    filer = f"http://127.0.0.1:{stack.ports['seaweedfs_filer']}/buckets/{bucket}/{key}"
    refused = {
        "filer POST": requests.post(filer, files={"file": ("object.txt", b"forged")}, timeout=10),
        "filer PUT": requests.put(filer, data=b"forged", timeout=10),
        "filer DELETE": requests.delete(filer, timeout=10),
        "filer GET": requests.get(filer, timeout=10),
        "filer POST, new key": requests.post(
            filer.replace("object.txt", "new.txt"), files={"file": ("new.txt", b"forged")}, timeout=10
        ),
    }
    # A volume server: the master hands out a file id, the write to it carries no token.
    master = f"http://127.0.0.1:{stack.ports['seaweedfs_master']}"
    assign = requests.get(f"{master}/dir/assign", timeout=10).json()
    assert assign.get("fid"), assign
    volume = f"http://{assign['url']}/{assign['fid']}"
    refused["volume POST"] = requests.post(volume, files={"file": ("x", b"forged")}, timeout=10)
    accepted = {what: r.status_code for what, r in refused.items() if r.status_code != 401}
    assert not accepted, f"answered without a JWT (401 expected): {accepted}"

    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"written through S3", "a write without a JWT changed the object"
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jwt-check/").get("Contents", [])]
    assert listed == [key], f"a write without a JWT left {listed}"
    s3.delete_object(Bucket=bucket, Key=key)


# -- one S3 identity per role: each reaches its own bucket and no other ------------------------


def s3_status(call, **kwargs) -> int:
    """The HTTP status S3 answers a boto3 call with: 200 when it worked."""
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
        return 200
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def test_each_s3_identity_reaches_its_own_bucket_only(stack, scheduled_run):
    """The scheduled run above pushed to DVC's bucket and logged its model through MLflow's server,
    each with its own identity; here each identity tries the buckets it must not touch."""
    buckets = stack.config["s3"]["buckets"]
    mlflow_bucket, dvc_bucket = buckets["mlflow"], buckets["dvc"]
    # Who holds which: the MLflow server its own, the worker (training, dvc push) the DVC one.
    for name, role in (("mlflow", "mlflow"), ("worker", "dvc")):
        held = stack.process(name).environ().get("AWS_ACCESS_KEY_ID")
        assert held == stack.s3_keys(role)[0], f"{name} runs with the S3 keys of another identity"
    # Clients get mlflow-artifacts:/ URIs: MLflow's server reads and writes its bucket for them.
    version = champion(stack)
    run = stack.mlflow_api("GET", "/runs/get", params={"run_id": version["run_id"]}).json()["run"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), run["info"]["artifact_uri"]

    admin = stack.s3()
    model_id = version["source"].removeprefix("models:/")
    (weights,) = [
        o["Key"]
        for o in admin.list_objects_v2(Bucket=mlflow_bucket, Prefix="artifacts/")["Contents"]
        if model_id in o["Key"] and o["Key"].endswith("model.safetensors")
    ]
    original = admin.get_object(Bucket=mlflow_bucket, Key=weights)["Body"].read()
    dvc_key = admin.list_objects_v2(Bucket=dvc_bucket, MaxKeys=1)["Contents"][0]["Key"]

    dvc, mlflow, serve = stack.s3("dvc"), stack.s3("mlflow"), stack.s3("serve")
    answers = {
        # DVC's identity: its bucket, never MLflow's (the model code serving runs lives there)
        "dvc PUT mlflow weights": s3_status(dvc.put_object, Bucket=mlflow_bucket, Key=weights, Body=b"x"),
        "dvc PUT mlflow new": s3_status(dvc.put_object, Bucket=mlflow_bucket, Key="role-check/x", Body=b"x"),
        "dvc GET mlflow": s3_status(dvc.get_object, Bucket=mlflow_bucket, Key=weights),
        "dvc DELETE mlflow": s3_status(dvc.delete_object, Bucket=mlflow_bucket, Key=weights),
        "dvc create bucket": s3_status(dvc.create_bucket, Bucket="role-check"),
        # MLflow's identity: its bucket, never DVC's
        "mlflow PUT dvc": s3_status(mlflow.put_object, Bucket=dvc_bucket, Key="role-check/x", Body=b"x"),
        "mlflow GET dvc": s3_status(mlflow.get_object, Bucket=dvc_bucket, Key=dvc_key),
        "mlflow LIST dvc": s3_status(mlflow.list_objects_v2, Bucket=dvc_bucket),
        "mlflow DELETE dvc": s3_status(mlflow.delete_object, Bucket=dvc_bucket, Key=dvc_key),
        # the serving identity: writes nothing anywhere
        "serve PUT mlflow weights": s3_status(serve.put_object, Bucket=mlflow_bucket, Key=weights, Body=b"x"),
        "serve PUT mlflow new": s3_status(
            serve.put_object, Bucket=mlflow_bucket, Key="role-check/x", Body=b"x"
        ),
        "serve DELETE mlflow": s3_status(serve.delete_object, Bucket=mlflow_bucket, Key=weights),
        "serve PUT dvc": s3_status(serve.put_object, Bucket=dvc_bucket, Key="role-check/x", Body=b"x"),
        "serve GET dvc": s3_status(serve.get_object, Bucket=dvc_bucket, Key=dvc_key),
    }
    allowed = {what: status for what, status in answers.items() if status != 403}
    assert not allowed, f"answered other than 403 Forbidden: {allowed}"
    assert admin.get_object(Bucket=mlflow_bucket, Key=weights)["Body"].read() == original
    assert s3_status(admin.head_object, Bucket=mlflow_bucket, Key="role-check/x") == 404
    assert s3_status(admin.head_object, Bucket=dvc_bucket, Key="role-check/x") == 404

    # What each may do: serving reads the model's weights; DVC and MLflow write their own bucket.
    listed = serve.list_objects_v2(Bucket=mlflow_bucket, Prefix=weights)["Contents"]
    assert [o["Key"] for o in listed] == [weights]
    assert serve.get_object(Bucket=mlflow_bucket, Key=weights)["Body"].read() == original
    for client, bucket in ((dvc, dvc_bucket), (mlflow, mlflow_bucket)):
        client.put_object(Bucket=bucket, Key="role-check/own", Body=b"mine")
        assert client.get_object(Bucket=bucket, Key="role-check/own")["Body"].read() == b"mine"
        client.delete_object(Bucket=bucket, Key="role-check/own")


# -- SeaweedFS's gRPC ports: mutual TLS, a client without the stack's certificate is refused ----

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS


def grpc_answer(stack: Stack, port: int, tls: bool, client_cert: bool = False) -> str:
    """What a gRPC (HTTP/2) client gets from port: "settings" when the server answered the
    connection preface with its SETTINGS frame (it takes us), else why not."""
    import ssl

    folder = stack.seaweedfs_security
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            conn = raw
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(folder / "ca.crt")
                ctx.check_hostname = False  # weed's certificate names no host; its CA is checked
                ctx.set_alpn_protocols(["h2"])  # gRPC's servers want it
                if client_cert:
                    ctx.load_cert_chain(folder / "seaweedfs.crt", folder / "seaweedfs.key")
                conn = ctx.wrap_socket(raw)
            conn.sendall(H2_PREFACE)
            head = conn.recv(9)
            if len(head) == 9 and head[3] == 0x04:
                return "settings"
            return f"closed ({head!r})"
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return f"refused ({exc})"


def test_seaweedfs_grpc_ports_refuse_a_client_without_the_stacks_certificate(stack, scheduled_run):
    """Every gRPC port (HTTP port + 10000) speaks TLS only and asks for a client certificate the
    stack's CA signed: a plain gRPC client and a TLS client without a certificate get nothing,
    one with the stack's certificate gets the server's answer. The stack works through it: the
    scheduled run above stored its data through S3, whose gateway reaches the filer over gRPC."""
    answers = {}
    for name in ("seaweedfs_master", "seaweedfs_volume", "seaweedfs_filer", "s3"):
        port = stack.ports[name] + 10000
        answers[f"{name} plain"] = grpc_answer(stack, port, tls=False)
        answers[f"{name} TLS, no certificate"] = grpc_answer(stack, port, tls=True)
        answers[f"{name} TLS, the stack's certificate"] = grpc_answer(stack, port, tls=True, client_cert=True)
    taken = {what: a for what, a in answers.items() if a == "settings" and "the stack's" not in what}
    assert not taken, f"gRPC answered a client without the stack's certificate: {taken}"
    refused = {what: a for what, a in answers.items() if a != "settings" and "the stack's" in what}
    assert not refused, f"gRPC refused the stack's own certificate (is it TLS at all?): {refused}"
    assert "certificate" in answers["seaweedfs_filer TLS, no certificate"].lower(), answers
    s3 = stack.s3()
    s3.put_object(Bucket=stack.config["s3"]["buckets"]["mlflow"], Key="grpc-check/x", Body=b"ok")
    assert (
        s3.get_object(Bucket=stack.config["s3"]["buckets"]["mlflow"], Key="grpc-check/x")["Body"].read()
        == b"ok"
    )
    s3.delete_object(Bucket=stack.config["s3"]["buckets"]["mlflow"], Key="grpc-check/x")
