"""The endpoint follows @champion: a real `trainpipe serve` under steady load while the champion is
promoted and rolled back (real `trainpipe promote` / `rollback`), a version that fails its smoke
test never taking traffic, `trainpipe status`, and the flow's wait for the endpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import copy_mlflow_db, free_port, make_model_dir, stop_process_group, write_metrics
from mlflow import MlflowClient

from pipelines.adapters.registry import delete_endpoint_record, endpoint_records, write_endpoint_record
from pipelines.commands.promote import promote_version
from pipelines.commands.promotion import publish_model
from pipelines.commands.status import ask_endpoint, endpoints, wait_for_champion
from pipelines.core.errors import SmokeTestError
from pipelines.core.params import Params, ServeParams
from pipelines.serving.address import endpoint_address

NAME = Params().publish.model_name
TRAINPIPE = str(Path(sys.executable).parent / "trainpipe")
SWITCH_WITHIN_S = 15.0


def break_weights(model_dir: Path) -> None:
    """NaN weights: the model loads, then its logits are NaN and sampling cannot work."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, model_dir / "model.safetensors"
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_template_db):
    """v1 and v2 (fit, v2 champion) and v3 (NaN weights, refused by its smoke test)."""
    root = tmp_path_factory.mktemp("endpoint")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(root)
        params = Params()
        for seed, bpb in ((0, 3.0), (1, 2.0)):
            make_model_dir(root / "models", seed=seed)
            write_metrics(root / "reports", bpb)
            publish_model(params)
        promote_version(params, 2)
        make_model_dir(root / "models", seed=2)
        break_weights(root / "models")
        write_metrics(root / "reports", 1.0)
        with pytest.raises(SmokeTestError) as failed:
            publish_model(params)
        yield {"root": root, "env": dict(os.environ), "publish_failure": str(failed.value)}


def test_a_version_that_fails_its_smoke_test_never_becomes_champion(registry):
    """Publish of NaN weights with the best score: refused, the reason printed and stored on it."""
    assert "v3" in registry["publish_failure"] and "failed its smoke test" in registry["publish_failure"]
    client = MlflowClient(registry["env"]["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    broken = client.get_model_version(NAME, "3")
    assert broken.tags["smoke_test"].startswith("failed: "), broken.tags["smoke_test"]
    assert client.get_model_version(NAME, "2").tags["smoke_test"].startswith("passed in ")
    # by hand too: exit 6, one line, the alias stays
    done = subprocess.run(
        [TRAINPIPE, "promote", "3"], cwd=registry["root"], env=registry["env"], capture_output=True, text=True
    )
    assert done.returncode == 6, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "v3" in last and "failed its smoke test" in last and "Traceback" not in done.stderr
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"


@pytest.fixture(scope="module")
def endpoint(registry):
    """A real `trainpipe serve` following @champion (polling every second), stopped by its pid."""
    root, env = registry["root"], registry["env"]
    port = free_port()
    log_path = root / f"serve-{port}.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [TRAINPIPE, "serve", "--port", str(port), "-S", "serve.poll_s=1"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while ask_endpoint(url, timeout_s=2) is None:
            if proc.poll() is not None:
                pytest.fail(f"trainpipe serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - started > 120:
                pytest.fail(f"no answer within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"\nendpoint answering after {time.monotonic() - started:.1f} s")
        yield {"url": url, "log": log_path, "proc": proc, **registry}
    finally:
        stop_process_group(proc, timeout_s=20)


class SteadyLoad:
    """Two clients sending requests back to back; every response recorded with its time."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.responses: list[tuple[float, int, str | None]] = []
        self.threads = [threading.Thread(target=self._loop) for _ in range(2)]

    def _loop(self):
        session = requests.Session()
        body = {"dataframe_records": [{"prompt": "def f(x):"}], "params": {"max_new_tokens": 8}}
        while not self.stop.is_set():
            try:
                r = session.post(f"{self.url}/invocations", json=body, timeout=30)
                version = r.json()["predictions"][0].get("model_version") if r.status_code == 200 else None
                self.responses.append((time.monotonic(), r.status_code, version))
            except requests.RequestException as exc:
                self.responses.append((time.monotonic(), 0, repr(exc)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def first_time_serving(self, version: str, after: float) -> float | None:
        return next((t for t, code, v in self.responses if t >= after and code == 200 and v == version), None)


def _trainpipe(endpoint, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [TRAINPIPE, *args], cwd=endpoint["root"], env=endpoint["env"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _wait_until_served(load: SteadyLoad, version: str, since: float) -> float:
    deadline = since + SWITCH_WITHIN_S + 5
    while time.monotonic() < deadline:
        seen = load.first_time_serving(version, since)
        if seen is not None:
            return seen - since
        time.sleep(0.2)
    pytest.fail(f"the endpoint did not serve v{version} within {SWITCH_WITHIN_S + 5:.0f} s")


def test_zero_failed_requests_across_a_promotion_and_a_rollback(endpoint):
    with SteadyLoad(endpoint["url"]) as load:
        time.sleep(2)
        _trainpipe(endpoint, "promote", "1")
        promoted = time.monotonic()
        to_v1 = _wait_until_served(load, "1", promoted)
        _trainpipe(endpoint, "rollback")
        rolled_back = time.monotonic()
        to_v2 = _wait_until_served(load, "2", rolled_back)
        time.sleep(2)
    codes = [code for _, code, _ in load.responses]
    versions = {v for _, _, v in load.responses}
    print(f"\n{len(codes)} requests; v1 served {to_v1:.1f} s after promote, v2 {to_v2:.1f} s after rollback")
    assert codes and all(code == 200 for code in codes), [r for r in load.responses if r[1] != 200][:5]
    assert versions == {"1", "2"}
    assert to_v1 <= SWITCH_WITHIN_S and to_v2 <= SWITCH_WITHIN_S
    # after a switch, no request is answered by the old version any more
    after_rollback = [v for t, _, v in load.responses if t > rolled_back + to_v2 + 1]
    assert after_rollback and set(after_rollback) == {"2"}
    log = endpoint["log"].read_text()
    assert "now serving v1 (was v2)" in log and "now serving v2 (was v1)" in log


def test_an_alias_moved_to_a_broken_version_behind_trainpipes_back_takes_no_traffic(endpoint):
    client = MlflowClient(endpoint["env"]["MLFLOW_TRACKING_URI"])
    assert ask_endpoint(endpoint["url"]) == "2"
    client.set_registered_model_alias(NAME, "champion", "3")  # as the MLflow UI could
    try:
        deadline = time.monotonic() + SWITCH_WITHIN_S
        records = []
        while time.monotonic() < deadline:
            records = [r for r in endpoint_records(client, NAME) if r["url"] == endpoint["url"]]
            if records and records[0].get("failure"):
                break
            assert ask_endpoint(endpoint["url"]) == "2"
            time.sleep(0.5)
        assert records and records[0]["failure"]["version"] == "3", records
        assert records[0]["version"] == "2"
        assert ask_endpoint(endpoint["url"]) == "2"
        status = _trainpipe(endpoint, "status").stdout
        assert f"{endpoint['url']} serves v2" in status and "NOT the champion" in status
        assert "refused v3" in status
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", endpoint["env"]["MLFLOW_TRACKING_URI"])
            waited = wait_for_champion(Params(serve=ServeParams(wait_s=2)), "3")
        assert waited["failed"] and "serves v2, not champion v3" in waited["reason"]
        assert "refused v3" in waited["reason"]
        assert "v3 failed its smoke test" in endpoint["log"].read_text()
    finally:
        client.set_registered_model_alias(NAME, "champion", "2")


def test_status_shows_champion_challenger_and_what_serves(endpoint):
    status = _trainpipe(endpoint, "status").stdout
    assert "champion:   v2" in status and "promoted 20" in status
    assert "challenger: v3" in status
    assert "last run:   no flow run recorded yet" in status
    as_json = json.loads(_trainpipe(endpoint, "status", "--json").stdout)
    assert as_json["champion"]["version"] == "2"
    [served] = as_json["endpoints"]
    assert served["url"] == endpoint["url"] and served["answering"] and served["since"]


def test_the_flows_wait_passes_once_the_endpoint_serves_the_champion(endpoint, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", endpoint["env"]["MLFLOW_TRACKING_URI"])
    waited = wait_for_champion(Params(serve=ServeParams(wait_s=SWITCH_WITHIN_S)), "2")
    assert not waited["failed"]
    assert waited["endpoints"] == [{"url": endpoint["url"], "version": "2"}]


def endpoint_record(client: MlflowClient, url: str) -> dict:
    [record] = [r for r in endpoint_records(client, NAME) if r["url"] == url]
    return record


def test_a_download_that_fails_during_a_swap_is_retried_not_counted_as_a_failed_smoke_test(endpoint):
    """v1's artifacts vanish from the store while @champion moves to it, then come back: the
    endpoint keeps serving v2, retries with backoff, then serves v1, with no failure recorded."""
    from urllib.parse import urlparse

    client = MlflowClient(endpoint["env"]["MLFLOW_TRACKING_URI"])
    artifacts = Path(urlparse(client.get_model_version_download_uri(NAME, "1")).path)
    assert artifacts.is_dir(), artifacts
    hidden = artifacts.with_name(artifacts.name + ".away")
    log_before = len(endpoint["log"].read_text())
    artifacts.rename(hidden)
    try:
        client.set_registered_model_alias(NAME, "champion", "1")
        deadline = time.monotonic() + SWITCH_WITHIN_S
        while "retrying in" not in endpoint["log"].read_text()[log_before:]:
            assert time.monotonic() < deadline, endpoint["log"].read_text()[-2000:]
            assert ask_endpoint(endpoint["url"]) == "2"  # the old version serves meanwhile
            time.sleep(0.2)
    finally:
        hidden.rename(artifacts)
    deadline = time.monotonic() + 30
    while ask_endpoint(endpoint["url"]) != "1":
        assert time.monotonic() < deadline, endpoint["log"].read_text()[-2000:]
        time.sleep(0.5)
    try:
        # the endpoint answers from v1 as soon as it swaps; its record follows a moment later
        deadline = time.monotonic() + 30
        while (record := endpoint_record(client, endpoint["url"]))["version"] != "1":
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record["failure"] is None, record
        assert "failed its smoke test" not in endpoint["log"].read_text()[log_before:]
    finally:  # the next tests start from v2, whatever happened here
        client.set_registered_model_alias(NAME, "champion", "2")
    deadline = time.monotonic() + SWITCH_WITHIN_S
    while ask_endpoint(endpoint["url"]) != "2":
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_a_version_whose_stored_files_were_changed_is_refused_before_its_code_runs(endpoint):
    """v1's stored model code is rewritten after registration: promote refuses it (exit 6), and an
    alias moved to it behind trainpipe's back leaves the endpoint on v2, with the reason logged."""
    from urllib.parse import urlparse

    client = MlflowClient(endpoint["env"]["MLFLOW_TRACKING_URI"])
    stored = client.get_model_version(NAME, "1")
    assert len(stored.tags["code_sha256"]) == 64 and len(stored.tags["artifacts_sha256"]) == 64
    code_file = Path(urlparse(client.get_model_version_download_uri(NAME, "1")).path) / "completion.py"
    original = code_file.read_bytes()
    planted = endpoint["root"] / "planted"
    code_file.write_bytes(original + f"\nopen({str(planted)!r}, 'w').close()\n".encode())
    log_before = len(endpoint["log"].read_text())
    try:
        done = subprocess.run(
            [TRAINPIPE, "promote", "1"],
            cwd=endpoint["root"],
            env=endpoint["env"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 6, done.stderr[-2000:]
        assert "model code do not match the sha256 recorded at registration" in done.stderr
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
        client.set_registered_model_alias(NAME, "champion", "1")  # as the MLflow UI could
        deadline = time.monotonic() + SWITCH_WITHIN_S
        while "do not match the sha256" not in endpoint["log"].read_text()[log_before:]:
            assert time.monotonic() < deadline, endpoint["log"].read_text()[-2000:]
            assert ask_endpoint(endpoint["url"]) == "2"
            time.sleep(0.3)
        assert ask_endpoint(endpoint["url"]) == "2"
        assert not planted.exists()  # the changed code never ran, here or in the smoke test
    finally:
        code_file.write_bytes(original)
        client.set_registered_model_alias(NAME, "champion", "2")


def test_a_stopped_endpoint_clears_its_record_and_the_flow_says_how_to_start_one(endpoint, monkeypatch):
    client = MlflowClient(endpoint["env"]["MLFLOW_TRACKING_URI"])
    os.killpg(endpoint["proc"].pid, signal.SIGTERM)
    endpoint["proc"].wait(timeout=30)
    assert [r for r in endpoint_records(client, NAME) if r["url"] == endpoint["url"]] == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", endpoint["env"]["MLFLOW_TRACKING_URI"])
    waited = wait_for_champion(Params(), "2")
    assert (
        not waited["failed"]
        and "no endpoint serves" in waited["reason"]
        and "trainpipe serve" in waited["reason"]
    )


def test_the_endpoint_loads_a_version_with_the_code_it_carries(registry, monkeypatch):
    """This process has imported the checkout's pipelines.core.model (as `trainpipe serve` has); a
    version loaded beside it still runs the model code logged with it, and the process keeps its own."""
    import pipelines.core.model
    from pipelines.serving.endpoint import load_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["env"]["MLFLOW_TRACKING_URI"])
    served = load_version(NAME, "2", deadline_s=120)
    gpt = type(served.model.unwrap_python_model().model)
    assert "/code/pipelines/core/model.py" in gpt.forward.__code__.co_filename
    assert gpt.forward.__code__.co_filename != pipelines.core.model.__file__
    assert sys.modules["pipelines.core.model"] is pipelines.core.model


def test_replicas_bound_to_every_interface_keep_a_record_each(registry):
    """Two pods of one Deployment bind 0.0.0.0:5001: each records itself in the real registry under
    its own name, neither overwrites the other, and status lists both (nothing listens at their
    URLs here, so both read as not answering)."""
    client = MlflowClient(registry["env"]["MLFLOW_TRACKING_URI"])
    pods = {
        endpoint_address("0.0.0.0", 5001, pod)
        for pod in ("serve-6c9d-abcde.invalid", "serve-6c9d-fghij.invalid")
    }
    try:
        for key, url in pods:
            write_endpoint_record(client, NAME, key, {"url": url, "version": "2", "pid": 1})
        recorded = {(r["key"], r["url"]) for r in endpoint_records(client, NAME)}
        assert pods <= recorded and len(pods) == 2, recorded
        listed = {ep["url"]: ep["answering"] for ep in endpoints(client, NAME, "2")}
        assert {url: False for _, url in pods}.items() <= listed.items(), listed
    finally:
        for key, _ in pods:
            delete_endpoint_record(client, NAME, key)
    assert not pods & {(r["key"], r["url"]) for r in endpoint_records(client, NAME)}
