"""serve: request validation, the serve command, and a real `mlflow models serve` over HTTP."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import copy_mlflow_db, free_port, load_pyfunc, make_model_dir, stop_process_group, write_metrics
from mlflow.exceptions import MlflowException

from pipelines.commands.promotion import publish_model
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, ServeParams
from pipelines.serving.completion import DEFAULT_LIMITS, EOT, check_request, model_limits, serving_limits
from pipelines.serving.serve import run_server, serve_command, serve_env

LIMITS = {"max_prompt_chars": 10, "max_new_tokens_limit": 8, "max_prompts": 3, "max_total_new_tokens": 20}


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
        ({"prompt": ["x"] * 4}, None, "prompts: 4 in one request; the limit is 3"),
        ({"prompt": ["x"] * 3}, {"max_new_tokens": 7}, r"max_new_tokens: 3 prompts x 7 = 21 new tokens"),
        ({"prompt": ["x"]}, {"seed": -1}, r"seed must be between 0 and 2\*\*64-1"),
        ({"prompt": ["x"]}, {"seed": 2**64}, "seed must be between"),
        ({"prompt": ["x"]}, {"temperature": 0.005}, r"temperature must be 0 \(greedy\) or at least 0.01"),
        ({"prompt": ["x"]}, {"temperature": 1e-45}, "temperature must be 0"),
    ],
)
def test_check_request_rejects(frame, params, message):
    with pytest.raises(MlflowException, match=message) as info:
        check_request(pd.DataFrame(frame), params, LIMITS)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # the enum: the server answers 400
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0},  # greedy
        {"temperature": 0.01},
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"max_new_tokens": 6},  # 3 prompts x 6 = 18 new tokens
    ],
)
def test_check_request_accepts_the_edges(params):
    prompts, checked = check_request(
        pd.DataFrame({"prompt": ["x"] * 3}), {"max_new_tokens": 6, **params}, LIMITS
    )
    assert len(prompts) == 3 and checked.items() >= params.items()


def test_limits_of_an_older_model_fall_back_to_the_defaults():
    older = {"max_prompt_chars": 10, "max_new_tokens_limit": 8}  # limits.json before max_prompts
    with pytest.raises(MlflowException, match="the limit is 16"):
        check_request(pd.DataFrame({"prompt": ["x"] * 17}), None, older)
    assert model_limits(older, block_size=1024) == {**DEFAULT_LIMITS, **older}
    assert model_limits(None, block_size=1024) == DEFAULT_LIMITS


def test_max_new_tokens_limit_is_capped_below_the_context():
    assert model_limits({"max_new_tokens_limit": 512}, block_size=256)["max_new_tokens_limit"] == 255
    assert model_limits({"max_new_tokens_limit": 64}, block_size=256)["max_new_tokens_limit"] == 64


def test_inference_code_keeps_the_project_defaults():
    """completion.py may import neither params nor data: its copies must equal theirs."""
    from pipelines.core.data import EOT as DATA_EOT

    assert serving_limits(ServeParams()) == DEFAULT_LIMITS
    assert EOT == DATA_EOT


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


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template_db):
    """`mlflow models serve` of a freshly published champion, v1 (block_size 128; limits: 200 chars,
    64 new tokens, 4 prompts, 128 new tokens per request)."""
    root = tmp_path_factory.mktemp("serve")
    log_path = root / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.chdir(root)
        make_model_dir(root / "models", block_size=128, seed=3)  # its smoke test draws no end-of-text first
        write_metrics(root / "reports", 2.0)
        params = Params(
            serve=ServeParams(
                max_prompt_chars=200, max_new_tokens_limit=64, max_prompts=4, max_total_new_tokens=128
            )
        )
        publish_model(params)
        # MLflow's scoring server passes this on as the pyfunc model_config
        env = {**serve_env(), "SERVING_MODEL_CONFIG": json.dumps({"model_version": "1"})}
        port = free_port()
        started = time.monotonic()
        with log_path.open("w") as log:
            # A session of its own: the server runs uvicorn through a shell, and the whole
            # group must go at teardown.
            proc = subprocess.Popen(
                serve_command(params, port=port), env=env, stdout=log, stderr=subprocess.STDOUT,
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
            stop_process_group(proc, timeout_s=10)


def invoke(url: str, records: list[dict], params: dict | None = None) -> requests.Response:
    body = {"dataframe_records": records, **({"params": params} if params else {})}
    return requests.post(f"{url}/invocations", json=body, timeout=30)


@pytest.mark.slow
def test_server_completes_a_prompt(server):
    response = invoke(server, [{"prompt": "def fibonacci(n):"}], {"max_new_tokens": 48, "seed": 1})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert isinstance(prediction["completion"], str) and prediction["completion"]
    assert prediction["model_version"] == "1"
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
        ([{"prompt": "x"}] * 5, None, "prompts: 5 in one request; the limit is 4"),
        ([{"prompt": "x"}] * 3, {"max_new_tokens": 50}, "max_new_tokens: 3 prompts x 50 = 150 new tokens"),
        ([{"prompt": "x"}], {"seed": -1}, "seed must be between 0 and 2**64-1"),
        ([{"prompt": "x"}], {"seed": 2**64}, "seed must be between 0 and 2**64-1"),
        ([{"prompt": "x"}], {"temperature": 0.001}, "temperature must be 0 (greedy) or at least 0.01"),
        ([{"prompt": "x"}], {"temperature": 1e-300}, "temperature must be 0 (greedy) or at least 0.01"),
    ],
)
def test_server_rejects_bad_requests(server, records, params, message):
    response = invoke(server, records, params)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "params", [{"seed": 2**63}, {"seed": 2**64 - 1}, {"temperature": 0}, {"temperature": 0.01}]
)
def test_server_accepts_the_edges(server, params):
    response = invoke(server, [{"prompt": "x"}], {"max_new_tokens": 4, **params})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] == "1"


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


# --- the logged model: models from code, loaded as serving loads it --------------------------

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
uri, version = sys.argv[1], sys.argv[2]
model = mlflow.pyfunc.load_model(uri, model_config={"model_version": version} if version else None)
out = model.predict(pd.DataFrame({"prompt": ["def f(x):", "import os"]}), params={"max_new_tokens": 8, "seed": 3})
project = sorted(n for n in sys.modules if n == "pipelines" or n.startswith("pipelines."))
print(json.dumps({"records": out.to_dict("records"), "modules": {n: sys.modules[n].__file__ for n in project}}))
"""


@pytest.mark.slow
def test_logged_model_runs_no_pickle_and_carries_only_inference_code(mlflow_env, tmp_path):
    import mlflow

    make_model_dir(tmp_path / "models")
    write_metrics(tmp_path / "reports", 2.0)
    result = publish_model(Params())
    uri = result["model_uri"]  # models:/<name>/1

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "logged")))
    pyfunc_conf = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert Path(pyfunc_conf["model_code_path"]).name == "completion.py"
    assert "python_model" not in pyfunc_conf  # the key of a cloudpickled instance
    repo = Path(__file__).resolve().parents[2]
    assert (local / "completion.py").read_text() == (
        repo / "pipelines" / "serving" / "completion.py"
    ).read_text()
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
    code = local / pyfunc_conf["code"]
    assert sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file()) == [
        "pipelines/__init__.py",
        "pipelines/core/__init__.py",
        "pipelines/core/decode.py",
        "pipelines/core/model.py",
        "pipelines/core/scheduler.py",
    ]
    assert pyfunc_conf["config"] == {"model_version": None}

    # A fresh process outside the repository, without the checkout on its path: the model must
    # load from what it carries, by the registry URI, as the serving process loads it.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    answers = {}
    for version in ("1", ""):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_AND_PREDICT, uri, version],
            cwd=outside, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[version] = json.loads(proc.stdout.strip().splitlines()[-1])
    records = answers["1"]["records"]
    assert [r["model_version"] for r in records] == ["1", "1"]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in records)
    assert [r["model_version"] for r in answers[""]["records"]] == [None, None]
    # the same seed, the same completions, whatever the model_config
    assert [r["completion"] for r in answers[""]["records"]] == [r["completion"] for r in records]
    # only the inference modules, and those from the model's own code dir, not this checkout
    modules = answers["1"]["modules"]
    assert sorted(modules) == [
        "pipelines",
        "pipelines.core",
        "pipelines.core.decode",
        "pipelines.core.model",
        "pipelines.core.scheduler",
    ]
    assert all("/code/pipelines/" in path for path in modules.values()), modules


def test_a_model_with_the_smallest_context_publishes_and_answers(mlflow_env, tmp_path):
    """block_size 8 (the schema's least) leaves 7 new tokens: the limits, the signature's default
    and the input example checked at logging all follow."""
    import mlflow

    make_model_dir(tmp_path / "models", block_size=8)
    write_metrics(tmp_path / "reports", 2.0)
    uri = publish_model(Params())["model_uri"]
    model = load_pyfunc(uri)
    assert model.metadata.get_params_schema().to_dict()[0]["default"] == 7
    # the logged input example is a request the model answers (a smoke test sends it)
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "logged"))
    example, example_params = (
        model.metadata.load_input_example(local),
        model.metadata.load_input_example_params(local),
    )
    assert example_params == {"max_new_tokens": 7}
    assert isinstance(model.predict(example, params=example_params)["completion"][0], str)
    out = model.predict(pd.DataFrame({"prompt": ["def fibonacci(n):"]}))  # a prompt longer than 8 tokens
    assert isinstance(out["completion"][0], str)
    with pytest.raises(MlflowException, match="between 1 and 7"):
        model.predict(pd.DataFrame({"prompt": ["x"]}), params={"max_new_tokens": 8})
