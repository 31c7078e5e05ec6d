"""The smoke test a version passes before it may serve (after TFX's InfraValidator).

A version is loaded the way serving loads it: downloaded from its registry URI and loaded by
MLflow's pyfunc loader, in a fresh process. It must answer its logged input example and a few
fixed prompts within a time limit, with non-empty text, and the same seed must give the same
output twice. Publish, promote and rollback run it before @champion moves; the endpoint runs the
same checks (check_answers) in its own process before a new version takes traffic.

A version that passes is then timed (measure_throughput): one more request, of the fixed prompts
repeated to fill a request (max_prompts, 16 by default), at the endpoint's default of 64 new
tokens, warm, through the same pyfunc predict the endpoint runs, which decodes them together as
it decodes concurrent requests. Its tokens per second give the
version's inference cost (pipelines/core/ledger.py). Here rather than in the endpoint: every champion
passes this test on the machine that trained it, with no traffic to wait for and no other
requests to share the device with, so each version gets one comparable figure.

This file runs as a script (`python -P pipelines/serving/smoke.py URI VERSION`), not as
`-m pipelines.serving.smoke`: importing this checkout's `pipelines` package first would shadow the code
the version carries, so it imports nothing of trainpipe. (-P keeps pipelines/ off sys.path, where
pipelines/stages/tokenize.py would shadow the standard library's tokenize.)
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

FIXED_PROMPTS = ("def add(a, b):", "import os\n\n\ndef ", "class Stack:\n    def push(self, item):")
FIXED_PARAMS = {"max_new_tokens": 16, "temperature": 0.8, "top_k": 50, "seed": 1234}
THROUGHPUT_NEW_TOKENS = 64  # the endpoint's default max_new_tokens (pipelines/serving/completion.py)
DEFAULT_TIMEOUT_S = 120.0


DOWNLOAD_RETRIES_S = (1.0, 2.0, 4.0, 8.0)  # the waits between tries of a failing download


class SmokeFailure(Exception):
    """The version loaded, or did not, but its answers are not fit to serve."""


class DownloadFailed(SmokeFailure):
    """The version's artifacts could not be fetched, even after retries: the store failed, not
    the version. The endpoint tries again later rather than refusing the version."""


def download(model_uri: str, work_dir: str | Path, waits_s=DOWNLOAD_RETRIES_S) -> str:
    """The version's artifacts in work_dir, retried with backoff; DownloadFailed after the last."""
    import mlflow

    for attempt, wait in enumerate([*waits_s, None], start=1):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(work_dir))
            # a store that lost the files answers with an empty folder, not an error
            if not (Path(local) / "MLmodel").is_file():
                raise FileNotFoundError(f"no MLmodel file among the artifacts of {model_uri}")
            return local
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [""])[0]
            if wait is None:
                raise DownloadFailed(
                    f"download failed {attempt} times: {type(exc).__name__}: {text}"[:300]
                ) from None
            logging.getLogger("trainpipe.serve").warning(
                "download of %s failed (%s: %s); retrying in %g s",
                model_uri,
                type(exc).__name__,
                text[:200],
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _completions(model, frame, params: dict) -> list[str]:
    out = model.predict(frame, params=params)
    if not hasattr(out, "columns") or "completion" not in out.columns:
        raise SmokeFailure(f"prediction has no 'completion' column: {type(out).__name__}")
    completions = out["completion"].tolist()
    if len(completions) != len(frame):
        raise SmokeFailure(f"{len(frame)} prompts gave {len(completions)} completions")
    for prompt, text in zip(frame["prompt"].tolist(), completions, strict=True):
        if not isinstance(text, str) or not text:
            raise SmokeFailure(f"empty completion for prompt {prompt!r}")
    return completions


def _new_tokens(model, wanted: int) -> int:
    schema = model.metadata.get_params_schema()
    for param in schema.params if schema else []:
        if param.name == "max_new_tokens" and param.default:
            return max(1, min(wanted, int(param.default)))
    return wanted


def check_answers(model, model_dir: str | Path, deadline_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise SmokeFailure unless the loaded pyfunc model answers fit to serve, in time."""
    import pandas as pd
    from mlflow.models import Model

    started = time.monotonic()
    meta = Model.load(str(model_dir))
    example = meta.load_input_example(str(model_dir))
    if example is None:
        raise SmokeFailure("the version has no logged input example")
    example_params = meta.load_input_example_params(str(model_dir)) or {}
    # a model of a short context allows fewer new tokens: no more than its signature's default
    fixed_params = {**FIXED_PARAMS, "max_new_tokens": _new_tokens(model, FIXED_PARAMS["max_new_tokens"])}
    try:
        _completions(model, example, example_params)
        fixed = pd.DataFrame({"prompt": list(FIXED_PROMPTS)})
        first = _completions(model, fixed, fixed_params)
        second = _completions(model, fixed, fixed_params)
    except SmokeFailure:
        raise
    except Exception as exc:  # any error of the model's own code is a failed test, not a crash
        text = str(exc).strip().splitlines()
        raise SmokeFailure(f"predict raised {type(exc).__name__}: {text[0] if text else ''}"[:300]) from None
    if first != second:
        raise SmokeFailure(f"seed {FIXED_PARAMS['seed']} gave different completions on two calls")
    took = time.monotonic() - started
    if took > deadline_s:
        raise SmokeFailure(f"answers took {took:.1f} s; the limit is {deadline_s:.0f} s")


# What serving executes (the model's code file and code folder) and loads (its artifacts: weights,
# tokenizer, config, limits), each one digest; registration records them as version tags.
SERVED_DIGESTS = {"code_sha256": "model code", "artifacts_sha256": "weights, tokenizer, config and limits"}


def _digest(root: Path, files: list[Path]) -> str:
    import hashlib

    total = hashlib.sha256()
    for path in sorted(files):
        total.update(
            str(path.relative_to(root)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest()
        )
    return total.hexdigest()


def served_digests(local: str | Path) -> dict[str, str]:
    """The SERVED_DIGESTS of a downloaded model folder, before anything in it runs."""
    from mlflow.models import Model

    local = Path(local)
    conf = Model.load(str(local)).flavors["python_function"]

    def files(folder: Path) -> list[Path]:
        return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]

    code = [local / Path(conf["model_code_path"]).name, *files(local / conf.get("code", "code"))]
    return {
        "code_sha256": _digest(local, code),
        "artifacts_sha256": _digest(local, files(local / "artifacts")),
    }


def verify_served_files(model_uri: str, local: str | Path) -> None:
    """SmokeFailure unless the downloaded files are those registered: each digest the version's
    tags record (a version registered before digests has none to check) must match."""
    from mlflow import MlflowClient

    _, name, version = model_uri.split("/", 2)
    tags = MlflowClient().get_model_version(name, version).tags
    for key, digest in served_digests(local).items():
        recorded = tags.get(key)
        if recorded and recorded != digest:
            raise SmokeFailure(
                f"refused: its {SERVED_DIGESTS[key]} do not match the sha256 recorded at registration "
                f"({recorded[:12]} recorded, {digest[:12]} in the store): the stored model was changed"
            )


def verify_stored_model(model_uri: str) -> None:
    """Download models:/<name>/<version> and check its files against the digests recorded at
    registration, running nothing of it; SmokeFailure (DownloadFailed) if they differ (if it fails)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trainpipe-verify-") as tmp:
        verify_served_files(model_uri, download(model_uri, tmp))


def load_and_check(model_uri: str, version: str, work_dir: str | Path, deadline_s: float = DEFAULT_TIMEOUT_S):
    """Download model_uri (models:/<name>/<version>), check its files against the digests recorded
    at registration, load it with MLflow's pyfunc loader and check its answers: the loaded model.
    Raise SmokeFailure when it does not load or does not answer fit to serve."""
    import mlflow

    local = download(model_uri, work_dir)
    verify_served_files(model_uri, local)  # before any of its code runs
    try:
        model = mlflow.pyfunc.load_model(local, model_config={"model_version": str(version)})
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise SmokeFailure(f"does not load: {type(exc).__name__}: {text[0] if text else ''}"[:300]) from None
    check_answers(model, local, deadline_s)
    return model


def measure_throughput(model) -> dict | None:
    """Generated tokens per second of one warm request of the fixed prompts, counted with the
    version's own tokenizer (a completion stops early at end-of-text, so the count is what was
    generated, not what was asked). None when the model has no tokenizer to count with."""
    import pandas as pd

    python_model = model.unwrap_python_model()
    tokenizer = getattr(python_model, "tokenizer", None)
    if tokenizer is None:
        return None
    params = {**FIXED_PARAMS, "max_new_tokens": _new_tokens(model, THROUGHPUT_NEW_TOKENS)}
    # a full request: the batch a busy endpoint steps (a version before batching answers it one
    # prompt after another, as it answers everything)
    limits = getattr(python_model, "limits", {})
    rows = min(
        limits.get("max_prompts", 16), limits.get("max_total_new_tokens", 4096) // params["max_new_tokens"]
    )
    frame = pd.DataFrame({"prompt": [FIXED_PROMPTS[i % len(FIXED_PROMPTS)] for i in range(max(1, rows))]})
    started = time.perf_counter()
    completions = _completions(model, frame, params)
    seconds = time.perf_counter() - started
    # Decoded bytes may re-encode to a few more tokens than were sampled: never more than asked.
    tokens = sum(
        min(len(tokenizer.encode(text, add_special_tokens=False).ids), params["max_new_tokens"])
        for text in completions
    )
    return {
        "tokens_per_s": tokens / seconds,
        "new_tokens": tokens,
        "seconds": seconds,
        "prompts": len(frame),
        "device": str(getattr(python_model, "device", "cpu")),
    }


SERVING_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "pandas", "numpy")


def smoke_test_key() -> str:
    """What a pass depends on besides the (immutable) version: this test and the serving
    environment (Python and the packages that load and run the model)."""
    import hashlib
    import platform
    from importlib.metadata import version

    parts = [Path(__file__).read_text(), platform.python_version()]
    parts += [f"{name}=={version(name)}" for name in SERVING_PACKAGES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_smoke_test(
    model_uri: str, version: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[bool, str, dict | None]:
    """(passed, one-line result, throughput) of the smoke test in a fresh process, bounded by
    timeout_s; throughput is measure_throughput's figures for a version that passed, else None."""
    import mlflow

    env = dict(os.environ)
    # the child reads the registry this process resolved (a default sqlite:///mlflow.db is cwd's)
    env.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.monotonic()
    command = [sys.executable, "-P", str(Path(__file__).resolve()), model_uri, str(version), str(timeout_s)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"failed: no answers within {timeout_s:.0f} s", None
    took = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"failed: the test process exited {done.returncode}: {tail[:300]}", None
    if result.get("passed"):
        passed = f"passed in {took:.1f} s ({len(FIXED_PROMPTS) * 2 + 1} requests, fresh process)"
        return True, passed, result.get("throughput")
    return False, f"failed: {result.get('reason')}", None


def _main(argv: list[str]) -> int:
    import tempfile

    model_uri, version, timeout_s = argv[0], argv[1], float(argv[2])
    with tempfile.TemporaryDirectory(prefix="trainpipe-smoke-") as tmp:
        try:
            model = load_and_check(model_uri, version, tmp, timeout_s)
        except SmokeFailure as exc:
            print(json.dumps({"passed": False, "reason": str(exc)}), flush=True)
            return 0
        try:
            throughput = measure_throughput(model)
        except Exception as exc:  # a timing that fails says so; the version passed its test
            print(f"smoke: throughput not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
            throughput = None
    print(json.dumps({"passed": True, "throughput": throughput}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
