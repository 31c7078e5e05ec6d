"""serve: request validation, the serve command, and a real `mlflow models serve` over HTTP."""

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import copy_mlflow_db, make_model_dir, write_metrics
from mlflow.exceptions import MlflowException

from pipelines.errors import ConfigError
from pipelines.params import Params, ServeParams
from pipelines.publish import publish_model
from pipelines.serve import check_request, run_server, serve_command, serve_env

LIMITS = {"max_prompt_chars": 10, "max_new_tokens_limit": 8}


def test_check_request_fills_defaults():
    prompts, params = check_request(pd.DataFrame({"prompt": ["def f():"]}), {"max_new_tokens": 8}, LIMITS)
    assert prompts == ["def f():"]
    assert params == {"max_new_tokens": 8, "temperature": 0.8, "top_k": 50, "seed": 0}


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        ({"text": ["x"]}, None, "no 'prompt' column"),
        ({"prompt": [1]}, None, "must be a string"),
        ({"prompt": [None]}, None, "must be a string"),
        ({"prompt": [""]}, None, "is empty"),
        ({"prompt": ["x" * 11]}, None, "limit is 10"),
        ({"prompt": ["x"]}, {"max_new_tokens": 0}, "between 1 and 8"),
        ({"prompt": ["x"]}, {"max_new_tokens": 9}, "between 1 and 8"),
        ({"prompt": ["x"]}, {"max_new_tokens": 2.5}, "must be an integer"),
        ({"prompt": ["x"]}, {"temperature": float("nan")}, "temperature"),
        ({"prompt": ["x"]}, {"temperature": 2.01}, "temperature"),
        ({"prompt": ["x"]}, {"top_k": -1}, "top_k"),
        ({"prompt": ["x"]}, {"seed": True}, "must be an integer"),
        ({"prompt": ["x"]}, {"beams": 4}, "unknown parameters"),
    ],
)
def test_check_request_rejects(frame, params, message):
    with pytest.raises(MlflowException, match=message) as info:
        check_request(pd.DataFrame(frame), params, LIMITS)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # the enum: the server answers 400


def test_serve_command_serves_the_champion_with_the_venv_mlflow():
    params = Params(serve=ServeParams(host="127.0.0.1", port=6000))
    cmd = serve_command(params)
    assert cmd[0] == str(Path(sys.executable).parent / "mlflow")
    assert cmd[1:] == [
        "models", "serve", "-m", "models:/trainpipe-code-completion@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", "6000",
    ]  # fmt: skip
    assert serve_command(params, model_uri="models:/m/3", port=7000)[4] == "models:/m/3"
    assert serve_command(params, port=7000)[-1] == "7000"
    assert serve_env()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_run_server_without_champion_is_a_one_line_error(mlflow_env):
    with pytest.raises(ConfigError) as info:
        run_server(Params())
    assert str(info.value) == (
        "no champion registered for model trainpipe-code-completion: run `trainpipe run` first"
    )


# --- a real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template_db):
    """`mlflow models serve` of a freshly published champion (limits: 200 chars, 64 new tokens)."""
    root = tmp_path_factory.mktemp("serve")
    log_path = root / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.chdir(root)
        make_model_dir(root / "models")
        write_metrics(root / "reports", 2.0)
        params = Params(serve=ServeParams(max_prompt_chars=200, max_new_tokens_limit=64))
        publish_model(params)
        port = free_port()
        started = time.monotonic()
        with log_path.open("w") as log:
            # A session of its own: the server runs uvicorn through a shell, and the whole
            # group must go at teardown.
            proc = subprocess.Popen(
                serve_command(params, port=port), env=serve_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() - started > 60:
                    pytest.fail(f"no /ping within 60 s:\n{log_path.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.1)
            print(f"\n/ping healthy after {time.monotonic() - started:.1f} s")
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def invoke(url: str, records: list[dict], params: dict | None = None) -> requests.Response:
    body = {"dataframe_records": records, **({"params": params} if params else {})}
    return requests.post(f"{url}/invocations", json=body, timeout=30)


@pytest.mark.slow
def test_server_completes_a_prompt(server):
    response = invoke(server, [{"prompt": "def fibonacci(n):"}], {"max_new_tokens": 48, "seed": 1})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert isinstance(prediction["completion"], str) and prediction["completion"]
    again = invoke(server, [{"prompt": "def fibonacci(n):"}], {"max_new_tokens": 48, "seed": 1})
    assert again.json() == response.json()  # seeded: the same request, the same completion


@pytest.mark.slow
@pytest.mark.parametrize(
    ("records", "params", "message"),
    [
        ([{"text": "def f():"}], None, "prompt"),
        ([{"prompt": 5}], None, "must be a string"),
        ([{"prompt": ""}], None, "is empty"),
        ([{"prompt": "x" * 201}], None, "limit is 200"),
        ([{"prompt": "x"}], {"max_new_tokens": 0}, "between 1 and 64"),
        ([{"prompt": "x"}], {"max_new_tokens": 65}, "between 1 and 64"),
        ([{"prompt": "x"}], {"temperature": -1}, "temperature"),
    ],
)
def test_server_rejects_bad_requests(server, records, params, message):
    response = invoke(server, records, params)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]


@pytest.mark.slow
def test_server_still_answers_after_bad_requests(server):
    invoke(server, [{"prompt": ""}])
    latencies = []
    for i in range(20):
        started = time.perf_counter()
        response = invoke(server, [{"prompt": "import os\n"}], {"max_new_tokens": 16, "seed": i})
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    print(f"\np50 latency, 16 new tokens: {statistics.median(latencies) * 1000:.1f} ms")
