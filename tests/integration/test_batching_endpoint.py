"""Continuous batching behind real servers: `trainpipe serve` and plain `mlflow models serve` answer
concurrent requests as each would be answered alone, and the bounds answer clearly (413 unread,
503 with Retry-After, 504 past the time limit, a client that went away frees its slot)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import copy_mlflow_db, free_port, load_pyfunc, make_model_dir, stop_process_group, write_metrics
from mlflow.exceptions import MlflowException

from pipelines.commands.promotion import publish_model
from pipelines.commands.status import ask_endpoint
from pipelines.core.params import Params, ServeParams
from pipelines.serving.serve import serve_command, serve_env

NAME = Params().publish.model_name
TRAINPIPE = str(Path(sys.executable).parent / "trainpipe")
PROMPTS = [
    "def f(x):",
    "import os\n",
    "class A:\n    def __init__(self):",
    "for i in range(3):\n    ",
    "x = [",
    "#",
]
# 8 prompts of 511 new tokens: thousands of steps, seconds on any machine, with one slot
LONG = {
    "dataframe_records": [{"prompt": p} for p in PROMPTS + PROMPTS[:2]],
    "params": {"max_new_tokens": 511},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_template_db):
    """v1: a 4-layer model of 512 positions and no end-of-text token (every completion runs to
    its max_new_tokens), published with a scheduler of one slot and one
    queued request (what plain `mlflow models serve` gets from its limits.json)."""
    root = tmp_path_factory.mktemp("batching")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(root)
        make_model_dir(root / "models", block_size=512, n_layer=4, n_embd=128, eot=False)
        write_metrics(root / "reports", 2.0)
        publish_model(Params(serve=ServeParams(max_batch_sequences=1, max_queued_requests=1)))
        yield {"root": root, "env": dict(os.environ)}


def start(registry, command: list[str], name: str) -> tuple[subprocess.Popen, str, Path]:
    log_path = registry["root"] / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, cwd=registry["root"], env={**registry["env"], "PATH": serve_env()["PATH"]}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, log_path


def wait_ready(proc, url: str, log_path: Path) -> None:
    started = time.monotonic()
    while True:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() - started > 120:
            pytest.fail(f"server not ready (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def trainpipe_serve(registry):
    """`trainpipe serve` with its own capacity: 2 slots, 1 queued, bodies to 4 KiB, 1 s per request."""
    port = free_port()
    limits = ["serve.max_batch_sequences=2", "serve.max_queued_requests=1"]
    limits += ["serve.max_body_bytes=4096", "serve.request_timeout_s=1"]
    command = [TRAINPIPE, "serve", "--port", str(port)] + [a for s in limits for a in ("-S", s)]
    proc, log_path = start(registry, command, f"trainpipe-serve-{port}")
    url = f"http://127.0.0.1:{port}"
    try:
        while ask_endpoint(url, timeout_s=2) is None:
            wait_ready(proc, url, log_path)
            time.sleep(0.5)
        yield {"url": url, "log": log_path}
    finally:
        stop_process_group(proc, timeout_s=20)


@pytest.fixture(scope="module")
def mlflow_serve(registry):
    """Plain `mlflow models serve -m models:/<name>/1`: the scheduler of the version's limits.json."""
    port = free_port()
    params = Params()
    proc, log_path = start(registry, serve_command(params, f"models:/{NAME}/1", port), f"mlflow-serve-{port}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log_path)
        yield {"url": url, "log": log_path}
    finally:
        stop_process_group(proc, timeout_s=20)


def post(url: str, body, timeout: float = 60, **kw) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=timeout, **kw)


def greedy(prompts: list[str], new_tokens: int = 40) -> dict:
    return {
        "dataframe_records": [{"prompt": p} for p in prompts],
        "params": {"max_new_tokens": new_tokens, "temperature": 0},
    }


def completions(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text[:500]
    return [row["completion"] for row in response.json()["predictions"]]


def test_the_pyfunc_batches_requests_from_many_threads_as_any_pyfunc_server_calls_it(registry, monkeypatch):
    """The batching lives in the model: threads calling predict at once share decode steps."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["env"]["MLFLOW_TRACKING_URI"])
    model = load_pyfunc(f"models:/{NAME}/1")
    python_model = model.unwrap_python_model()
    python_model.set_capacity(8, 8, 60)
    params = {"max_new_tokens": 48, "temperature": 0}
    alone = [model.predict(pd.DataFrame({"prompt": [p]}), params=params)["completion"][0] for p in PROMPTS]
    steps, rows = python_model.batcher.steps, python_model.batcher.rows_stepped
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(model.predict, pd.DataFrame({"prompt": [p]}), params=params) for p in PROMPTS]
        together = [f.result()["completion"][0] for f in futures]
    assert together == alone
    mean_batch = (python_model.batcher.rows_stepped - rows) / (python_model.batcher.steps - steps)
    assert mean_batch > 1.5, mean_batch
    # past the version's queue bound: a 503 error at once, not a wait. One request of 8 prompts
    # holds the one slot, its other 7 rows wait in the queue: the queue is full.
    python_model.set_capacity(1, 1, 60)
    long = pd.DataFrame({"prompt": PROMPTS + PROMPTS[:2]})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(model.predict, long, params={"max_new_tokens": 500})
        while python_model.batcher.steps == 0:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(MlflowException, match="the endpoint is busy") as busy:
            model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"max_new_tokens": 8})
        assert busy.value.get_http_status_code() == 503 and time.monotonic() - started < 1.0
        assert len(running.result()) == 8


def test_concurrent_requests_to_trainpipe_serve_answer_as_each_alone(trainpipe_serve):
    url = trainpipe_serve["url"]
    alone = [completions(post(url, greedy([p])))[0] for p in PROMPTS[:3]]
    with ThreadPoolExecutor(3) as pool:
        together = [completions(r)[0] for r in pool.map(lambda p: post(url, greedy([p])), PROMPTS[:3])]
    assert together == alone
    # one request of three prompts, more than the two slots: the third waits for a free one
    assert completions(post(url, greedy(PROMPTS[:3]))) == alone


def test_concurrent_requests_to_plain_mlflow_models_serve_answer_as_each_alone(mlflow_serve):
    url = mlflow_serve["url"]
    alone = [completions(post(url, greedy([p])))[0] for p in PROMPTS[:4]]
    assert completions(post(url, greedy(PROMPTS[:4]))) == alone


def test_plain_mlflow_models_serve_refuses_past_the_queue_bound_with_503(mlflow_serve):
    url = mlflow_serve["url"]
    barrier = threading.Barrier(4)

    def call(_):
        barrier.wait()
        return post(url, LONG)

    with ThreadPoolExecutor(4) as pool:
        codes = sorted(r.status_code for r in pool.map(call, range(4)))
    assert 503 in codes and 200 in codes, codes


def test_a_body_over_the_limit_is_refused_413_before_it_is_read(trainpipe_serve):
    big = greedy(["x" * 5000])
    r = post(trainpipe_serve["url"], big)
    assert r.status_code == 413 and "the limit is 4096" in r.json()["message"]
    chunked = requests.post(
        f"{trainpipe_serve['url']}/invocations",
        data=(chunk for chunk in [json.dumps(big).encode()[i : i + 1000] for i in range(0, 6000, 1000)]),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert chunked.status_code == 413 and "over 4096 bytes" in chunked.json()["message"]
    assert completions(post(trainpipe_serve["url"], greedy(["def g():"], 4)))  # serves on


def test_past_the_bound_trainpipe_serve_answers_503_with_retry_after_at_once(trainpipe_serve):
    url = trainpipe_serve["url"]
    barrier = threading.Barrier(5)

    def call(_):
        barrier.wait()
        started = time.monotonic()
        r = post(url, LONG)
        return r, time.monotonic() - started

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(call, range(5)))
    refused = [(r, took) for r, took in answers if r.status_code == 503]
    assert refused, [r.status_code for r, _ in answers]
    for r, took in refused:
        assert r.headers["Retry-After"] == "1" and "retry after 1 s" in r.json()["message"]
        assert took < 2.0  # answered at once, not after a wait for a slot
    assert {r.status_code for r, _ in answers} <= {200, 503, 504}


def test_a_request_past_its_time_limit_gets_504_and_frees_its_slots(trainpipe_serve):
    r = post(trainpipe_serve["url"], LONG)  # 4088 tokens through 2 slots: seconds, past 1 s
    assert r.status_code == 504 and "serve.request_timeout_s" in r.json()["message"]
    assert completions(post(trainpipe_serve["url"], greedy(["def h():"], 4)))


def test_a_client_that_goes_away_frees_its_slots(trainpipe_serve):
    host, port = trainpipe_serve["url"].removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.5)  # it decodes now
    deadline = time.monotonic() + 10
    while "a client went away" not in trainpipe_serve["log"].read_text():
        assert time.monotonic() < deadline, trainpipe_serve["log"].read_text()[-2000:]
        time.sleep(0.2)
    assert completions(post(trainpipe_serve["url"], greedy(["def k():"], 4)))
