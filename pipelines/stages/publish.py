"""Publish: register the trained model in the MLflow registry as a new version, the challenger.

    trainpipe publish    # pipelines.commands.promotion.publish_model: register_challenger, then the gate

The flow runs publish after evaluate, outside DVC: registry side effects do not belong in a
reproducible stage. Publish reads the score from reports/metrics.json and how it was made from
reports/evaluation.json; it refuses them unless they scored the weights in models/ (the
weights_sha256), and reports/per_document.json unless it is the same score per document.

register_challenger logs models/ into the run as a pyfunc model from code (the served model,
pipelines/serving/completion.py, with only the code pipelines/serving/served_code.py lists: no
pickle, no stage or registry code) and registers it as a new version with all its tags in one
call: lineage, the score and its key, the per-document scores' artifact (PER_DOCUMENT_TAG) and
the cost ledger. Which version serves is decided above the stages, in pipelines.commands.promotion.
"""

import json
import os
import tempfile
import time
from importlib.metadata import version as installed_version
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pipelines.adapters.registry import (
    find_version,
    finish_run,
    get_champion,
    ledger_runs,
    log_missing_metrics,
    log_model_from_code,
    log_run_artifact,
    logged_model_signature,
    register_version,
    resolve_run,
    run_experiment_id,
    run_metrics,
)
from pipelines.core.data import TOKENIZER_FILE, read_json, sha256_file, write_json
from pipelines.core.errors import ConfigError, TrainpipeError
from pipelines.core.ledger import RUN_CPU_S, RUN_GPU_S, RUN_USD
from pipelines.core.model_dir import CONFIG_FILE, MODEL_FILES, WEIGHTS_FILE
from pipelines.core.params import CurateParams, EvaluateParams, Params, ServeParams
from pipelines.core.scoring import (
    EVALUATION_FILE,
    METRICS_FILE,
    PER_DOCUMENT_FILE,
    SCORE_KEY_FIELDS,
    scoring_code_sha256,
)
from pipelines.core.slices import slice_metrics
from pipelines.serving import served_code
from pipelines.serving.smoke import download, served_digests
from pipelines.stages.data_gate import PROFILE_ARTIFACT
from pipelines.stages.tokenize import validation_set_hash

# The served model's code (pipelines.serving.completion) and the scorer (pipelines.stages.evaluate)
# import torch: they are imported in the functions that log or score a model. An unchanged run,
# which publishes nothing, then spends no 2.2 s on torch.

SCORE_KEY_TAG = "score_key"
PER_DOCUMENT_TAG = "per_document_scores"  # the artifact, in the version's run, of its per-document scores
REQUIRED_METRICS = ("val_bits_per_byte", "val_documents", "weights_sha256", SCORE_KEY_TAG, *SCORE_KEY_FIELDS)
# The memorization check's figures (metrics.json) and the spans file it checked (evaluation.json):
# the promotion gate refuses a challenger that reproduces a removed secret.
MEMORIZATION_METRICS = ("memorized_secrets", "memorization_checked")
MEMORIZATION_KEYS = (*MEMORIZATION_METRICS, "memorization_spans_sha256")
SERVING_REQUIREMENTS = ("torch", "tokenizers", "safetensors", "numpy", "pandas")
# Tests only: the name of a point in publish (this stage or the promotion gate) at which to stop
# (print a line, sleep), so that a test can SIGKILL a real `trainpipe publish` there, or let it
# go on by creating the file RESUME_ENV names (two publishes interleaved at will).
PAUSE_ENV = "TRAINPIPE_TEST_PUBLISH_PAUSE_AT"
RESUME_ENV = "TRAINPIPE_TEST_PUBLISH_RESUME_FILE"


def pause_for_test(point: str) -> None:
    if os.environ.get(PAUSE_ENV) != point:
        return
    print(f"publish: paused at {point}", flush=True)
    resume, deadline = os.environ.get(RESUME_ENV), time.monotonic() + 600
    while time.monotonic() < deadline and not (resume and Path(resume).exists()):
        time.sleep(0.2)


def read_trained_model(params: Params) -> tuple[Path, dict]:
    """The model dir and its metrics, which must have scored its weights; else a one-line error
    naming the stage to run (`trainpipe train` runs no evaluate: its metrics are of older weights)."""
    model_dir = Path(params.train.model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"no trained model at {model_dir}/ (missing {', '.join(missing)}): run `trainpipe train` first"
        )
    reports = Path(params.evaluate.reports_dir)
    metrics_path, evaluation_path = reports / METRICS_FILE, reports / EVALUATION_FILE
    metrics = {
        **_read_report(metrics_path, f"no metrics at {metrics_path}: run `trainpipe evaluate` first"),
        **_read_report(evaluation_path, f"no {evaluation_path}: run `trainpipe evaluate` again"),
    }
    for key in (*REQUIRED_METRICS, *MEMORIZATION_KEYS):
        if key not in metrics:
            where = (
                metrics_path
                if key in ("val_bits_per_byte", "val_documents", *MEMORIZATION_METRICS)
                else evaluation_path
            )
            raise ConfigError(f"{where} has no {key!r}: run `trainpipe evaluate` again")
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    if metrics["weights_sha256"] != weights_sha:
        raise ConfigError(
            f"{evaluation_path} scored other weights (sha256 {str(metrics['weights_sha256'])[:12]}) than "
            f"{model_dir / WEIGHTS_FILE} (sha256 {weights_sha[:12]}): run `trainpipe evaluate` first"
        )
    if metrics["scoring_code_sha256"] != scoring_code_sha256():
        # a champion re-scored by this code would not be scored as the challenger was
        raise ConfigError(
            f"{evaluation_path} was scored by other code than this checkout's score_texts and "
            f"pipelines/core/model.py: run `trainpipe evaluate` first"
        )
    read_document_scores(params.evaluate, metrics)
    check_memorization_spans(params, metrics, evaluation_path)
    return model_dir, metrics


def check_memorization_spans(params: Params, metrics: dict, evaluation_path: Path) -> None:
    """The memorization count must be of the secrets curation removed from the data as it is now:
    a count made before curate.scrub_patterns changed says nothing of the new ones."""
    from pipelines.core.spans import SPANS_FILE

    spans_path = Path(params.curate.reports_dir) / SPANS_FILE
    now = sha256_file(spans_path) if spans_path.is_file() else None
    if metrics["memorization_spans_sha256"] != now:
        raise ConfigError(
            f"{evaluation_path} checked memorization against other scrubbed spans than {spans_path} "
            "holds now: run `trainpipe evaluate` first"
        )


def _read_report(path: Path, missing: str):
    """An evaluate report, or a one-line ConfigError: `missing` when it is not there."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON: run `trainpipe evaluate` again") from None


def read_document_scores(evaluate: EvaluateParams, metrics: dict) -> list[dict]:
    """reports/per_document.json, which must be the per-document form of the score in metrics:
    the same weights, score key and documents. One record per document: path, sha256, bits, bytes."""
    path = Path(evaluate.reports_dir) / PER_DOCUMENT_FILE
    scores = _read_report(path, f"no per-document scores at {path}: run `trainpipe evaluate` again")
    documents = scores.get("documents") if isinstance(scores, dict) else None
    if (
        not isinstance(documents, list)
        or scores.get("weights_sha256") != metrics["weights_sha256"]
        or scores.get("score_key") != metrics[SCORE_KEY_TAG]
        or len(documents) != int(metrics["val_documents"])
    ):
        raise ConfigError(
            f"{path} is not the per-document score of {Path(evaluate.reports_dir) / EVALUATION_FILE}: "
            f"run `trainpipe evaluate` again"
        )
    return documents


def challenger_texts(params: Params, metrics: dict) -> list[str]:
    """The very documents evaluate scored the challenger on, or an error if they are gone: the
    token cap picked them with the challenger's tokenizer, so a re-score takes them, not the cap."""
    from pipelines.stages.evaluate import validation_documents

    evaluation_path = Path(params.evaluate.reports_dir) / EVALUATION_FILE
    docs = validation_documents(params)
    if validation_set_hash(docs) != metrics["val_set_sha256"]:
        raise ConfigError(
            f"{evaluation_path} was scored on another validation set than {params.data.curated_dir}/ "
            f"holds now: run `trainpipe evaluate` first"
        )
    return [d["text"] for d in docs[: int(metrics["val_documents"])]]


def tag_value(value) -> str:
    """A metrics value as a version tag: strings as they are, numbers, booleans and null as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def serving_requirements() -> list[str]:
    """Pinned at the installed versions: explicit pins avoid MLflow's slow requirement inference."""
    return [f"{name}=={installed_version(name)}" for name in SERVING_REQUIREMENTS]


def model_signature(limits: dict[str, int]):
    """Input: a prompt column; output: the completion and the registry version that made it;
    params: the inference parameters with their defaults under these limits."""
    from mlflow.models import infer_signature

    from pipelines.serving.completion import inference_defaults

    return infer_signature(
        pd.DataFrame({"prompt": ["def f():"]}),
        pd.DataFrame({"completion": ["..."], "model_version": ["1"]}),
        params=inference_defaults(limits["max_new_tokens_limit"]),
    )


def _check_signature(model_uri: str) -> None:
    """Signature inference can fail silently (no signature, no input enforcement): read it back."""
    from pipelines.serving.completion import DEFAULT_INFERENCE_PARAMS

    signature = logged_model_signature(model_uri)
    param_names = {p.name for p in signature.params} if signature and signature.params else set()
    input_names = signature.inputs.input_names() if signature and signature.inputs else []
    if input_names != ["prompt"] or param_names != set(DEFAULT_INFERENCE_PARAMS):
        raise TrainpipeError(
            f"model {model_uri} was logged without the expected signature "
            f"(inputs {input_names}, params {sorted(param_names)})"
        )


def register_challenger(
    params: Params,
    model_dir: Path,
    metrics: dict,
    lineage: dict[str, str] | None = None,
    run_id: str | None = None,
) -> tuple[str, str]:
    """Log the model in model_dir (read by read_trained_model, with its metrics) into the run and
    register it as a new version with all its tags at once: (version, run id). The run is run_id,
    else the active run, else a new run of publish.experiment, which this call ends."""
    client = MlflowClient()
    weights_sha = str(metrics["weights_sha256"])  # read_trained_model checked it is model_dir's
    run_id, own_run = resolve_run(client, params.publish.experiment, run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="trainpipe-publish-") as tmp:
            _log_run_inputs(client, run_id, metrics, params.curate)
            _log_slice_metrics(client, run_id, params.evaluate, metrics)
            scores_path = _log_document_scores(client, params.evaluate, run_id, weights_sha)
            info = _log_model(client, params.serve, run_id, model_dir, Path(tmp))
            _check_signature(info.model_uri)
            # what serving will execute and load, as stored: serving refuses other files
            (Path(tmp) / "logged").mkdir()
            digests = served_digests(download(info.model_uri, Path(tmp) / "logged", waits_s=(1.0, 2.0)))
        pause_for_test("model-logged")
        tags = {k: str(v) for k, v in (lineage or {}).items() if v is not None}
        tags.update(
            val_bits_per_byte=repr(float(metrics["val_bits_per_byte"])),
            run_id=run_id,
            weights_sha256=weights_sha,
            score_key=str(metrics[SCORE_KEY_TAG]),
            **{PER_DOCUMENT_TAG: scores_path},
            **digests,
        )
        tags.update({field: tag_value(metrics[field]) for field in SCORE_KEY_FIELDS})
        tags.update({key: tag_value(metrics[key]) for key in MEMORIZATION_METRICS})
        tags.update(cost_tags(client, params.publish.model_name, run_id))
        tags.update(parent_tags(client, params.publish.model_name, model_dir))
        version = register_version(info.model_uri, params.publish.model_name, tags)
        pause_for_test("registered")
    except BaseException:
        if own_run:
            finish_run(client, run_id, "FAILED")
        raise
    if own_run:
        finish_run(client, run_id, "FINISHED")
    return version, run_id


def parent_tags(client: MlflowClient, name: str, model_dir: Path) -> dict[str, str]:
    """kind (train or finetune) from the model's train.json; for a fine-tune, its parent's version
    and weights sha256, and the parent's own training cost beside the fine-tune's cost_run_*."""
    made_path = model_dir / "train.json"
    if not made_path.is_file():  # a model dir not written by the train stage: nothing to say
        return {}
    parent = read_json(made_path).get("parent")
    if not parent:
        return {"kind": "train"}
    tags = {
        "kind": "finetune",
        "parent_version": str(parent["version"]),
        "parent_weights_sha256": parent["weights_sha256"],
    }
    found = find_version(client, name, str(parent["version"]))
    for key, value in (found.tags if found else {}).items():
        if key.startswith("cost_run_"):
            tags[f"parent_{key}"] = value
    return tags


def cost_tags(client: MlflowClient, name: str, run_id: str) -> dict[str, str]:
    """The cost ledger of a version about to be registered from run_id: its own run's device time
    and money (absent when the run logged no ledger: a `trainpipe publish` outside a flow), and
    their sums over every run started since the champion was registered, failed runs included:
    what arriving at this model cost. Seconds are kept by kind, so status can price them."""
    champion = get_champion(client, name)
    since_ms = champion.creation_timestamp if champion else 0
    runs = ledger_runs(client, run_experiment_id(client, run_id), since_ms, RUN_USD)
    own = run_metrics(client, run_id)
    tags = {
        "cost_since": f"v{champion.version}" if champion else "the first run",
        "cost_cumulative_runs": str(len(runs)),
        "cost_cumulative_failed_runs": str(sum(run["status"] == "FAILED" for run in runs)),
    }
    for key, metric in (("cpu_s", RUN_CPU_S), ("gpu_s", RUN_GPU_S), ("usd", RUN_USD)):
        tags[f"cost_cumulative_{key}"] = repr(sum(run["metrics"].get(metric, 0.0) for run in runs))
        if metric in own:
            tags[f"cost_run_{key}"] = repr(own[metric])
    return tags


def _log_run_inputs(client: MlflowClient, run_id: str, metrics: dict, curate: CurateParams) -> None:
    """Metrics (those the run lacks), the workspace dvc.lock, which a later restart reads, and the
    curated data's profile, which the data gate of later runs compares with (drift)."""
    log_missing_metrics(client, run_id, metrics)
    if Path("dvc.lock").is_file():
        log_run_artifact(client, run_id, "dvc.lock")
    profile = Path(curate.reports_dir) / PROFILE_ARTIFACT
    if profile.is_file():
        log_run_artifact(client, run_id, str(profile))


def _log_slice_metrics(client: MlflowClient, run_id: str, evaluate: EvaluateParams, metrics: dict) -> None:
    """Each evaluation slice's bits per byte and documents (val_bpb_slice_<name>, ...), those the run
    lacks: from the per-document scores and evaluate.slices, as evaluate's reports/slices.json."""
    log_missing_metrics(
        client, run_id, slice_metrics(read_document_scores(evaluate, metrics), evaluate.slices)
    )


def _log_document_scores(
    client: MlflowClient, evaluate: EvaluateParams, run_id: str, weights_sha: str
) -> str:
    """Log reports/per_document.json into the run, under a folder of these weights (a run may hold
    more than one version): its artifact path, for the version's PER_DOCUMENT_TAG."""
    folder = f"scores/{weights_sha[:16]}"
    log_run_artifact(client, run_id, str(Path(evaluate.reports_dir) / PER_DOCUMENT_FILE), folder)
    return f"{folder}/{PER_DOCUMENT_FILE}"


def _log_model(client: MlflowClient, serve: ServeParams, run_id: str, model_dir: Path, work_dir: Path):
    from pipelines.serving.completion import (
        EXAMPLE_PROMPT,
        LIMITS_FILE,
        MODEL_VERSION_KEY,
        model_limits,
        serving_limits,
    )

    limits_path = work_dir / LIMITS_FILE
    block_size = int(read_json(model_dir / CONFIG_FILE)["block_size"])
    limits = model_limits(serving_limits(serve), block_size)  # what the model will enforce
    write_json(limits_path, limits)
    return log_model_from_code(
        client,
        run_id,
        python_model=str(served_code.MODEL_FILE),  # MLflow runs this file to load the model
        artifacts={
            "weights": str(model_dir / WEIGHTS_FILE),
            "config": str(model_dir / CONFIG_FILE),
            "tokenizer": str(model_dir / TOKENIZER_FILE),
            "limits": str(limits_path),
        },
        code_paths=[str(served_code.code_dir(work_dir))],
        model_config={MODEL_VERSION_KEY: None},  # a loader names the version it loads
        pip_requirements=serving_requirements(),
        signature=model_signature(limits),
        input_example=(
            pd.DataFrame({"prompt": [EXAMPLE_PROMPT]}),
            {"max_new_tokens": min(8, limits["max_new_tokens_limit"])},  # a block_size of 8 allows 7
        ),
    )
