"""The served model: a pyfunc that completes Python code, logged as MLflow "models from code".

publish logs this file itself (`python_model=<this file>`), not a pickle of an instance: loading
the model runs this file, whose last line hands MLflow the model (`mlflow.models.set_model`).
The code that travels with a model is this file plus the model and its decoding
(pipelines/core/model.py, decode.py, scheduler.py, and a minimal pipelines/__init__.py), so it
imports nothing else of the project: no data, params, tracking or registry code.

predict hands its prompts to the model's ContinuousBatcher (pipelines/core/scheduler.py): the
scoring server answers each request in a thread of its own, and one decode loop steps the
sequences of every request in flight together. A request joins at the next step and returns as
soon as its own sequences end; under `trainpipe serve`, `mlflow models serve` or any server of
pyfunc models alike, since the batching lives here. Safetensors weights, config.json, tokenizer.json and limits.json travel as
artifacts.

    model = mlflow.pyfunc.load_model("models:/<name>/3", model_config={"model_version": "3"})
    # or: SERVING_MODEL_CONFIG='{"model_version": "3"}' mlflow models serve -m models:/<name>/3 ...
    model.predict(pd.DataFrame({"prompt": ["def fibonacci(n):"]}), params={"max_new_tokens": 48})
    # -> DataFrame with columns completion, model_version ("3")
"""

import json
import threading
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from pipelines.core.decode import row_seed
from pipelines.core.model import GPT, GPTConfig
from pipelines.core.scheduler import (
    ContinuousBatcher,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    SamplingParams,
)

EOT = "<|endoftext|>"  # pipelines.core.data.EOT, which this file may not import (a test keeps them equal)
LIMITS_FILE = "limits.json"
# The request limits, named as the fields of pipelines.core.params.ServeParams, with its defaults (a test
# keeps them equal). publish writes the configured ones as limits.json; a model logged before a
# limit existed gets its default here.
DEFAULT_LIMITS: dict[str, int] = {
    "max_prompt_chars": 4000,
    "max_new_tokens_limit": 512,
    "max_prompts": 16,
    "max_total_new_tokens": 4096,
    "max_batch_sequences": 64,
    "max_queued_requests": 64,
    "request_timeout_s": 60,
    "decode_threads": 1,
}
RETRY_AFTER_S = (
    1  # what a 503 for a full queue tells the client to wait (trainpipe serve sends it as Retry-After)
)
# Inference parameters and their defaults; publish builds the model signature from these.
DEFAULT_INFERENCE_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0}
MIN_TEMPERATURE = 0.01  # below it (but above 0, greedy) the scaled logits can overflow: see GPT.generate
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
EXAMPLE_PROMPT = "def fibonacci(n):"
# The pyfunc model_config key that names the registry version a loader loaded. Logged with the
# value None: MLflow lets a loader override only keys the logged model declares.
MODEL_VERSION_KEY = "model_version"


def serving_limits(serve) -> dict[str, int]:
    """The request limits stored with the model (as limits.json) from a ServeParams (or any
    object with its fields)."""
    return {key: int(getattr(serve, key)) for key in DEFAULT_LIMITS}


def model_limits(stored: dict | None, block_size: int) -> dict[str, int]:
    """The limits a model enforces: those stored with it, defaults for any it lacks, and
    max_new_tokens_limit capped at block_size - 1, so that at least one prompt token and every
    new token fit the model's context (the KV cache cannot slide past it)."""
    limits = {**DEFAULT_LIMITS, **(stored or {})}
    limits["max_new_tokens_limit"] = min(int(limits["max_new_tokens_limit"]), block_size - 1)
    return limits


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

    Every failure is an MlflowException with INVALID_PARAMETER_VALUE: the endpoint answers 400
    with a one-line message naming the field.
    """
    limits = {**DEFAULT_LIMITS, **limits}
    if not isinstance(model_input, pd.DataFrame):
        raise _invalid(f"input must be a table with a 'prompt' column, got {type(model_input).__name__}")
    if "prompt" not in model_input.columns:
        raise _invalid(f"input has no 'prompt' column (columns: {list(model_input.columns)})")
    if len(model_input) == 0:
        raise _invalid("input has no rows")
    if len(model_input) > limits["max_prompts"]:
        raise _invalid(f"prompts: {len(model_input)} in one request; the limit is {limits['max_prompts']}")
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
    total = len(prompts) * checked["max_new_tokens"]
    if total > limits["max_total_new_tokens"]:
        raise _invalid(
            f"max_new_tokens: {len(prompts)} prompts x {checked['max_new_tokens']} = {total} new tokens "
            f"in one request; the limit is {limits['max_total_new_tokens']}"
        )
    temperature = checked["temperature"]
    if not 0.0 <= temperature <= 2.0:  # also rejects NaN
        raise _invalid(f"temperature must be between 0 and 2, got {temperature}")
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise _invalid(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}")
    if checked["top_k"] < 0:
        raise _invalid(f"top_k must be 0 (no limit) or more, got {checked['top_k']}")
    if not 0 <= checked["seed"] <= MAX_SEED:
        raise _invalid(f"seed must be between 0 and 2**64-1, got {checked['seed']}")
    return prompts, checked


class CodeCompletionModel(mlflow.pyfunc.PythonModel):
    """Completes a Python prompt. Input: a DataFrame with a 'prompt' column; output: columns
    'completion' and 'model_version' (the registry version given as model_config, else None)."""

    # False runs generation without the KV cache (the reference path), for benchmarks in-process.
    # Not a request parameter: a client could then ask for generation several times slower.
    use_cache = True
    # False answers each prompt alone, one after another, with GPT.generate (the path before
    # continuous batching), for benchmarks side by side.
    batching = True

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
        stored = json.loads(Path(limits_path).read_text()) if limits_path else None
        self.limits = model_limits(stored, config.block_size)
        version = (context.model_config or {}).get(MODEL_VERSION_KEY)
        self.model_version = None if version is None else str(version)
        self.set_capacity(
            self.limits["max_batch_sequences"],
            self.limits["max_queued_requests"],
            self.limits["request_timeout_s"],
            self.limits["decode_threads"],
        )
        self._caller = threading.local()

    def set_capacity(
        self,
        max_batch_sequences: int,
        max_queued_requests: int,
        request_timeout_s: int,
        decode_threads: int = 1,
    ) -> None:
        """The scheduler's bounds. Stored with the model (limits.json) for any server; a server
        that knows its machine sets its own before the first request (trainpipe serve does)."""
        self.limits = {
            **self.limits,
            "max_batch_sequences": int(max_batch_sequences),
            "max_queued_requests": int(max_queued_requests),
            "request_timeout_s": int(request_timeout_s),
            "decode_threads": int(decode_threads),
        }
        self.batcher = ContinuousBatcher(
            self.model,
            int(max_batch_sequences),
            int(max_queued_requests),
            stop_token=self.eot_id,
            threads=int(decode_threads),
        )

    def cancel_when(self, event: threading.Event | None) -> None:
        """For a server that knows when a client has gone: the next predict in this thread stops,
        and frees its slots, once `event` is set (pipelines/serving/endpoint.py sets it)."""
        self._caller.cancelled = event

    def prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if self.eot_id is not None:
            ids = [self.eot_id] + ids  # documents start after EOT in training, so prompts do too
        # Keep the prompt's end so that prompt + completion fit the context: generation then
        # never slides past block_size, where the KV cache would have to give way.
        return ids[-(self.model.config.block_size - max_new_tokens) :]

    def complete(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        seed: int,
        use_cache: bool = True,
    ) -> str:
        ids = self.prompt_ids(prompt, max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model.generate(
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            generator=generator,
            stop_token=self.eot_id,
            use_cache=use_cache,
        )
        new_ids = [i for i in out[0, len(ids) :].tolist() if i != self.eot_id]
        return self.tokenizer.decode(new_ids)

    def complete_batched(self, prompts: list[str], checked: dict) -> list[str]:
        """The prompts' completions from the decode loop, every row with its own generator."""
        ids = [self.prompt_ids(p, checked["max_new_tokens"]) for p in prompts]
        timeout_s = self.limits["request_timeout_s"]
        try:
            request = self.batcher.submit(
                ids, SamplingParams(**checked), timeout_s, getattr(self._caller, "cancelled", None)
            )
        except QueueFull as exc:
            raise MlflowException(
                f"the endpoint is busy: {exc} (serve.max_queued_requests); retry after {RETRY_AFTER_S} s",
                error_code=TEMPORARILY_UNAVAILABLE,
            ) from None
        try:
            outputs = self.batcher.result(request)
        except RequestTimeout:
            raise MlflowException(
                f"the request ran past its time limit of {timeout_s} s (serve.request_timeout_s)",
                error_code=DEADLINE_EXCEEDED,
            ) from None
        except RequestCancelled as exc:
            raise MlflowException(str(exc), error_code=DEADLINE_EXCEEDED) from None
        return [self.tokenizer.decode(out) for out in outputs]

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        prompts, checked = check_request(model_input, params, self.limits)
        if self.batching and self.use_cache:
            completions = self.complete_batched(prompts, checked)
        else:  # one prompt at a time, each with its own generator seeded as the batcher's rows
            completions = [
                self.complete(
                    p, **{**checked, "seed": row_seed(checked["seed"], row)}, use_cache=self.use_cache
                )
                for row, p in enumerate(prompts)
            ]
        return pd.DataFrame({"completion": completions, "model_version": [self.model_version] * len(prompts)})


mlflow.models.set_model(CodeCompletionModel())
