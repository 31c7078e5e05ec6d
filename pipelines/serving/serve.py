"""The inference endpoint: the command that serves the registered code-completion model.

    trainpipe serve                  # MLflow's scoring server on 127.0.0.1:5001, following @champion
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"prompt": "def fibonacci(n):"}], "params": {"max_new_tokens": 48}}'

The served model itself (CodeCompletionModel, its request checks and limits) is in
pipelines/serving/completion.py, the file publish logs as the model's code; its names are re-exported
here for callers that import them from pipelines.serving.serve.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow

from pipelines.core.params import Params, PublishParams
from pipelines.serving.completion import (
    DEFAULT_INFERENCE_PARAMS,
    EXAMPLE_PROMPT,
    LIMITS_FILE,
    CodeCompletionModel,
    check_request,
    inference_defaults,
    serving_limits,
)

__all__ = [
    "DEFAULT_INFERENCE_PARAMS",
    "EXAMPLE_PROMPT",
    "LIMITS_FILE",
    "CodeCompletionModel",
    "champion_uri",
    "check_request",
    "inference_defaults",
    "run_server",
    "serve_command",
    "serve_env",
    "serving_limits",
]


def champion_uri(publish: PublishParams) -> str:
    return f"models:/{publish.model_name}@champion"


def _mlflow_executable() -> str:
    exe = Path(sys.executable).parent / "mlflow"
    return str(exe) if exe.exists() else "mlflow"


def serve_command(params: Params, model_uri: str | None = None, port: int | None = None) -> list[str]:
    """The `mlflow models serve` command line for the champion (or model_uri)."""
    return [
        _mlflow_executable(),
        "models",
        "serve",
        "-m",
        model_uri or champion_uri(params.publish),
        "--env-manager",
        "local",
        "-h",
        params.serve.host,
        "-p",
        str(port or params.serve.port),
    ]


def serve_env() -> dict[str, str]:
    """The environment of the serving process.

    `mlflow models serve --env-manager local` starts uvicorn through a shell, so the venv's bin
    must be on PATH (else exit 127). The tracking URI this process resolved is passed on, so the
    server reads the same registry (MLflow's default is sqlite:///mlflow.db in the cwd).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file in the log
    return env


def run_server(params: Params, port: int | None = None, model_uri: str | None = None) -> int:
    """Serve @champion and follow it (pipelines.serving.endpoint), or serve one fixed model_uri with
    `mlflow models serve`, until interrupted; returns the exit code."""
    from pipelines.serving.endpoint import curl_example, serve_following

    if model_uri is None:
        try:
            return serve_following(params, port)
        except KeyboardInterrupt:
            return 130
    port = port or params.serve.port
    host = params.serve.host
    print(f"serving {model_uri} (fixed: it does not follow @champion)")
    print(f"endpoint: http://{host}:{port}/invocations")
    print(f"try: {curl_example(host, port)}", flush=True)
    try:
        return subprocess.run(serve_command(params, model_uri, port), env=serve_env()).returncode
    except KeyboardInterrupt:
        return 130
