"""The inference endpoint: a pyfunc model that completes Python code, and the command that serves it.

    trainpipe serve                  # MLflow's scoring server on 127.0.0.1:5001, following @champion
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"prompt": "def fibonacci(n):"}], "params": {"max_new_tokens": 48}}'

CodeCompletionModel is what publish logs: safetensors weights, config.json, tokenizer.json and
limits.json travel as artifacts, this package as the model's code. The serving process imports
this module, so it stays cheap to import and makes no tracking calls.
"""

import json
import os
import subprocess
import sys
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipelines.data import EOT
from pipelines.model import GPT, GPTConfig
from pipelines.params import Params, ServeParams

LIMITS_FILE = "limits.json"
# Inference parameters and their defaults; publish builds the model signature from these.
DEFAULT_INFERENCE_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0}
EXAMPLE_PROMPT = "def fibonacci(n):"


def serving_limits(serve: ServeParams) -> dict[str, int]:
    """The request limits stored with the model (as limits.json) and enforced by predict."""
    return {"max_prompt_chars": serve.max_prompt_chars, "max_new_tokens_limit": serve.max_new_tokens_limit}


def inference_defaults(max_new_tokens_limit: int) -> dict[str, Any]:
    """Defaults of the inference parameters; max_new_tokens never exceeds the limit."""
    default_tokens = min(DEFAULT_INFERENCE_PARAMS["max_new_tokens"], max_new_tokens_limit)
    return {**DEFAULT_INFERENCE_PARAMS, "max_new_tokens": default_tokens}


def _invalid(message: str) -> MlflowException:
    # The enum code makes the scoring server answer 400; a string code would answer 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _int_param(params: dict, name: str) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _invalid(f"parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def _float_param(params: dict, name: str) -> float:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _invalid(f"parameter {name!r} must be a number, got {value!r}")
    return float(value)


def check_request(model_input: Any, params: dict | None, limits: dict[str, int]) -> tuple[list[str], dict]:
    """Validate prompts and inference parameters; return (prompts, params with defaults filled in).

    Every failure is an MlflowException with INVALID_PARAMETER_VALUE: the endpoint answers 400.
    """
    if not isinstance(model_input, pd.DataFrame):
        raise _invalid(f"input must be a table with a 'prompt' column, got {type(model_input).__name__}")
    if "prompt" not in model_input.columns:
        raise _invalid(f"input has no 'prompt' column (columns: {list(model_input.columns)})")
    if len(model_input) == 0:
        raise _invalid("input has no rows")
    prompts = model_input["prompt"].tolist()
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise _invalid(f"prompt {i} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise _invalid(f"prompt {i} is empty")
        if len(prompt) > limits["max_prompt_chars"]:
            raise _invalid(
                f"prompt {i} has {len(prompt)} characters; the limit is {limits['max_prompt_chars']}"
            )

    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_INFERENCE_PARAMS))
    if unknown:
        raise _invalid(f"unknown parameters {unknown}; known: {sorted(DEFAULT_INFERENCE_PARAMS)}")
    limit = limits["max_new_tokens_limit"]
    merged = {**inference_defaults(limit), **{k: v for k, v in params.items() if v is not None}}
    checked = {
        "max_new_tokens": _int_param(merged, "max_new_tokens"),
        "temperature": _float_param(merged, "temperature"),
        "top_k": _int_param(merged, "top_k"),
        "seed": _int_param(merged, "seed"),
    }
    if not 1 <= checked["max_new_tokens"] <= limit:
        raise _invalid(f"max_new_tokens must be between 1 and {limit}, got {checked['max_new_tokens']}")
    if not 0.0 <= checked["temperature"] <= 2.0:  # also rejects NaN
        raise _invalid(f"temperature must be between 0 and 2, got {checked['temperature']}")
    if checked["top_k"] < 0:
        raise _invalid(f"top_k must be 0 (no limit) or more, got {checked['top_k']}")
    return prompts, checked


class CodeCompletionModel(mlflow.pyfunc.PythonModel):
    """Completes a Python prompt. Input: a DataFrame with a 'prompt' column; output: 'completion'."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_model
        from tokenizers import Tokenizer, decoders

        artifacts = context.artifacts
        config = GPTConfig(**json.loads(Path(artifacts["config"]).read_text()))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = GPT(config)
        load_model(model, artifacts["weights"])  # restores the tied lm_head/wte weight too
        self.model = model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(artifacts["tokenizer"])
        if self.tokenizer.decoder is None:
            self.tokenizer.decoder = decoders.ByteLevel()
        self.eot_id = self.tokenizer.token_to_id(EOT)
        limits_path = artifacts.get("limits")
        if limits_path:
            self.limits = json.loads(Path(limits_path).read_text())
        else:
            self.limits = serving_limits(ServeParams())

    def complete(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if self.eot_id is not None:
            ids = [self.eot_id] + ids  # documents start after EOT in training, so prompts do too
        ids = ids[-self.model.config.block_size :]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model.generate(
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            generator=generator,
            stop_token=self.eot_id,
        )
        new_ids = [i for i in out[0, len(ids) :].tolist() if i != self.eot_id]
        return self.tokenizer.decode(new_ids)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        prompts, checked = check_request(model_input, params, self.limits)
        # One prompt at a time, each with its own seeded generator: a request's completion does
        # not depend on what else was in the batch.
        return pd.DataFrame({"completion": [self.complete(p, **checked) for p in prompts]})


def champion_uri(params: Params) -> str:
    return f"models:/{params.publish.model_name}@champion"


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
        model_uri or champion_uri(params),
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
    """Serve @champion and follow it (pipelines.endpoint), or serve one fixed model_uri with
    `mlflow models serve`, until interrupted; returns the exit code."""
    from pipelines.endpoint import curl_example, serve_following

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
