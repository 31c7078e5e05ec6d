"""Publish the trained model to the MLflow registry and decide which version serves.

    trainpipe publish                # log + register models/ as a new version @challenger; gate @champion
    trainpipe promote -S ... 7       # move @champion to version 7
    trainpipe rollback               # move @champion back to the previous champion

The flow runs publish after evaluate, outside DVC: registry side effects do not belong in a
reproducible stage. Publish reads the score from reports/metrics.json and how it was made from
reports/evaluation.json; it refuses them unless they scored the weights in models/ (the
weights_sha256), and reports/per_document.json unless it is the same score per document.

The promotion gate pairs the challenger's and the champion's bits on each validation document
and bootstraps the difference in bits per byte (pipelines.core.bootstrap): the challenger is promoted
only if the whole 95% interval lies below -publish.min_improvement_bpb. Each version keeps its
per-document scores in its run (the tag per_document_scores names the artifact) and the interval
in its tags (bpb_delta, bpb_delta_low, bpb_delta_high, bpb_delta_vs, ...). The champion's stored
scores are paired only under equal score keys (validation set, token cap, context, precision,
scoring code: see pipelines.stages.evaluate) and the same documents; otherwise, or when it has none
(published before per-document scores), it is re-scored exactly as the challenger was: the same
documents, context and precision. A champion whose block_size is shorter than the challenger's
context cannot be scored at that context: then both are re-scored at the champion's block_size,
and the reason says so.

Every move of @champion is recorded: a `promoted_at` tag on the version and, on
the registered model, one tag per move (`champion_move/<time>-<random>`, a JSON record), which
`trainpipe history` lists and rollback walks back. A tag per move, never rewritten, so
concurrent moves cannot lose a record.
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version as installed_version
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    champion_history,
    delete_version_tag,
    download_model_artifacts,
    download_run_artifact,
    find_version,
    find_version_with_weights,
    finish_run,
    get_champion,
    get_tracking_uri,
    get_version,
    ledger_runs,
    log_missing_metrics,
    log_model_from_code,
    log_run_artifact,
    logged_model_signature,
    mlflow_failure,
    record_move,
    register_version,
    resolve_run,
    run_experiment_id,
    run_metrics,
    set_alias,
    set_version_tags,
)
from pipelines.core.bootstrap import BpbDelta, paired_bootstrap, read_bpb_delta
from pipelines.core.data import TOKENIZER_FILE, read_json, sha256_file, write_json
from pipelines.core.errors import ConfigError, SmokeTestError, TrainpipeError
from pipelines.core.ledger import RUN_CPU_S, RUN_GPU_S, RUN_USD
from pipelines.core.model_dir import CONFIG_FILE, MODEL_FILES, WEIGHTS_FILE
from pipelines.core.params import Params
from pipelines.core.scoring import (
    EVALUATION_FILE,
    METRICS_FILE,
    PER_DOCUMENT_FILE,
    SCORE_KEY_FIELDS,
    scoring_code_sha256,
)
from pipelines.serving import served_code
from pipelines.stages.data_gate import PROFILE_ARTIFACT
from pipelines.stages.tokenize import validation_set_hash

# The served model's code (pipelines.serving.completion) and the scorer (pipelines.stages.evaluate) import torch:
# they are imported in the functions that log or score a model. An unchanged run, which publishes
# nothing, then spends no 2.2 s on torch.

SCORE_KEY_TAG = "score_key"
PER_DOCUMENT_TAG = "per_document_scores"  # the artifact, in the version's run, of its per-document scores
# what each score-key field is called in a reason
SCORE_FIELD_NAMES = {
    "val_set_sha256": "validation set",
    "score_max_tokens": "token cap",
    "score_context": "context",
    "score_bf16": "precision",
    "scoring_code_sha256": "scoring code",
}
REQUIRED_METRICS = ("val_bits_per_byte", "val_documents", "weights_sha256", SCORE_KEY_TAG, *SCORE_KEY_FIELDS)
SERVING_REQUIREMENTS = ("torch", "tokenizers", "safetensors", "numpy", "pandas")
DECISION_TAG = "alias_decision"  # set last: a version without it had its publish cut short
# Tests only: the name of a point in publish_model at which to stop (print a line, sleep), so
# that a test can SIGKILL a real `trainpipe publish` there.
PAUSE_ENV = "TRAINPIPE_TEST_PUBLISH_PAUSE_AT"


def _test_pause(point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        print(f"publish: paused at {point}", flush=True)
        time.sleep(600)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _bpb_text(value: float) -> str:
    return f"{value:.4f}"


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
    for key in REQUIRED_METRICS:
        if key not in metrics:
            where = metrics_path if key in ("val_bits_per_byte", "val_documents") else evaluation_path
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
    read_document_scores(params, metrics)
    return model_dir, metrics


def _read_report(path: Path, missing: str):
    """An evaluate report, or a one-line ConfigError: `missing` when it is not there."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON: run `trainpipe evaluate` again") from None


def read_document_scores(params: Params, metrics: dict) -> list[dict]:
    """reports/per_document.json, which must be the per-document form of the score in metrics:
    the same weights, score key and documents. One record per document: path, sha256, bits, bytes."""
    path = Path(params.evaluate.reports_dir) / PER_DOCUMENT_FILE
    scores = _read_report(path, f"no per-document scores at {path}: run `trainpipe evaluate` again")
    documents = scores.get("documents") if isinstance(scores, dict) else None
    if (
        not isinstance(documents, list)
        or scores.get("weights_sha256") != metrics["weights_sha256"]
        or scores.get("score_key") != metrics[SCORE_KEY_TAG]
        or len(documents) != int(metrics["val_documents"])
    ):
        raise ConfigError(
            f"{path} is not the per-document score of {Path(params.evaluate.reports_dir) / EVALUATION_FILE}: "
            f"run `trainpipe evaluate` again"
        )
    return documents


def _tag_value(value) -> str:
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


def read_history(params: Params) -> list[dict]:
    """Every move of the configured model's @champion, oldest first (`trainpipe history`)."""
    name = params.publish.model_name
    try:
        return champion_history(MlflowClient(), name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(
                f"no registered model {name} in {get_tracking_uri()}: nothing was published yet"
            ) from None
        raise


def _flow_run_id() -> str | None:
    """The Prefect flow run this move happens in, if any. Only the flow imports Prefect, so a
    plain `trainpipe promote` does not pay seconds to import it just to learn there is none."""
    import sys

    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT__FLOW_RUN_ID") or None
    from prefect.runtime import flow_run

    return flow_run.get_id() or None


def smoke_test(client: MlflowClient, name: str, version: str, timeout_s: float) -> str:
    """Load the version in a fresh process as serving does and check its answers (pipelines.serving.smoke);
    the result is stored on the version. SmokeTestError when it fails: it never becomes champion.
    A version is immutable, so a pass is reused while the serving environment and the test are
    the same (smoke_test_key): a rollback does not wait for a test its target already passed."""
    from pipelines.serving.smoke import run_smoke_test, smoke_test_key

    key = smoke_test_key()
    tags = get_version(client, name, version).tags
    if tags.get("smoke_test", "").startswith("passed") and tags.get("smoke_test_key") == key:
        return tags["smoke_test"]
    print(f"smoke test of {name} v{version}: loading it in a fresh process", flush=True)
    passed, result, throughput = run_smoke_test(f"models:/{name}/{version}", version, timeout_s)
    tags = {"smoke_test": result, "smoke_test_key": key, "smoke_tested_at": _now()}
    if throughput:  # the version's inference speed, which status prices (pipelines/core/ledger.py)
        tags |= {
            "inference_tokens_per_s": repr(float(throughput["tokens_per_s"])),
            "inference_device": str(throughput["device"]),
            "inference_measured": f"smoke test: {throughput['new_tokens']} new tokens in "
            f"{throughput['seconds']:.2f} s, 3 prompts one after another, warm",
        }
    set_version_tags(client, name, version, tags)
    if not passed:
        why = result.removeprefix("failed: ")
        raise SmokeTestError(
            f"v{version} of {name} failed its smoke test ({why}): it does not become champion"
        )
    return result


def _move_champion(
    client: MlflowClient,
    name: str,
    version: str,
    reason: str | None = None,
    command: str | None = None,
    smoke_timeout_s: float = 120.0,
) -> None:
    """Point @champion at version and record the move (as its own tag: nothing read and rewritten).
    Called again for a version that is already champion, it records the move once: a killed
    publish may have moved the alias without recording it."""
    version = str(version)
    champion = get_champion(client, name)
    moved_from = str(champion.version) if champion else None
    finishing, recorded = moved_from == version, False
    if finishing:
        last = (champion_history(client, name) or [{}])[-1]
        recorded = last.get("to") == version
        moved_from = last.get("to")  # the champion before the move that was cut short
    else:
        smoke_test(
            client, name, version, smoke_timeout_s
        )  # raises SmokeTestError: the alias stays where it is
        set_alias(client, name, CHAMPION, version)
    _test_pause("champion-alias-set")
    set_version_tags(client, name, version, {"promoted_at": _now()})
    delete_version_tag(client, name, version, "rolled_back_at")
    if recorded:
        return
    reason = reason or "passed the promotion gate"
    if finishing:
        reason += " (recorded by the run that finished the move)"
    from pipelines.adapters.runlock import current_command

    command = command or current_command() or "publish"
    record_move(client, name, moved_from, version, reason, f"trainpipe {command}", _flow_run_id())


def _log_run_inputs(client: MlflowClient, run_id: str, metrics: dict, params: Params) -> None:
    """Metrics (those the run lacks), the workspace dvc.lock, which a later restart reads, and the
    curated data's profile, which the data gate of later runs compares with (drift)."""
    log_missing_metrics(client, run_id, metrics)
    if Path("dvc.lock").is_file():
        log_run_artifact(client, run_id, "dvc.lock")
    profile = Path(params.curate.reports_dir) / PROFILE_ARTIFACT
    if profile.is_file():
        log_run_artifact(client, run_id, str(profile))


def _log_model(client: MlflowClient, params: Params, run_id: str, model_dir: Path, work_dir: Path):
    from pipelines.serving.completion import (
        EXAMPLE_PROMPT,
        LIMITS_FILE,
        MODEL_VERSION_KEY,
        model_limits,
        serving_limits,
    )

    limits_path = work_dir / LIMITS_FILE
    block_size = int(read_json(model_dir / CONFIG_FILE)["block_size"])
    limits = model_limits(serving_limits(params.serve), block_size)  # what the model will enforce
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


def _float_tag(version: ModelVersion, key: str) -> float | None:
    try:
        return float(version.tags[key])
    except (KeyError, ValueError):
        return None


def _download_champion(champion: ModelVersion, work_dir: Path) -> Path:
    """The champion's weights, config and tokenizer in a model dir as the train stage writes it."""
    uri = f"models:/{champion.name}/{champion.version}"
    artifacts = download_model_artifacts(uri, str(work_dir / "champion"))
    champion_dir = work_dir / "champion_model"
    champion_dir.mkdir()
    for key, filename in (("weights", WEIGHTS_FILE), ("config", CONFIG_FILE), ("tokenizer", TOKENIZER_FILE)):
        shutil.copy(artifacts[key], champion_dir / filename)
    return champion_dir


def _challenger_texts(params: Params, metrics: dict) -> list[str]:
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


def _check_rescorable(client: MlflowClient, params: Params, metrics: dict) -> None:
    """If the gate will have to re-score the champion, the challenger's documents must be at hand."""
    champion = get_champion(client, params.publish.model_name)
    if champion is not None and _rescore_why(champion, metrics):
        _challenger_texts(params, metrics)


def _rescore_why(champion: ModelVersion, metrics: dict) -> str:
    """Why the champion's stored scores do not pair with the challenger's; "" if they may (the
    documents are checked when they are read, _stored_document_scores)."""
    if "val_bits_per_byte" not in champion.tags:
        return "it had no score"
    if SCORE_KEY_TAG not in champion.tags:
        return "it was scored before score keys"
    if champion.tags[SCORE_KEY_TAG] != metrics[SCORE_KEY_TAG]:
        differ = [
            name for f, name in SCORE_FIELD_NAMES.items() if champion.tags.get(f) != _tag_value(metrics[f])
        ]
        return "it was scored with another " + ", ".join(differ or ["score key"])
    if PER_DOCUMENT_TAG not in champion.tags:
        return "it has no per-document scores (published before them)"
    return ""


def _stored_document_scores(
    client: MlflowClient, champion: ModelVersion, documents: list[dict], work_dir: Path
) -> tuple[list[float] | None, str]:
    """(the champion's bits on each of the challenger's documents, "") from the scores its publish
    logged, or (None, why they cannot be used)."""
    try:
        local = download_run_artifact(client, champion.run_id, champion.tags[PER_DOCUMENT_TAG], str(work_dir))
        stored = read_json(local)
    except (MlflowException, OSError, json.JSONDecodeError):
        return None, "its per-document scores could not be read"
    if not isinstance(stored, dict) or (stored.get("weights_sha256"), stored.get("score_key")) != (
        champion.tags.get("weights_sha256"),
        champion.tags.get(SCORE_KEY_TAG),
    ):
        return None, "its per-document scores are not of its weights and score key"
    theirs = stored.get("documents") or []
    if [(d.get("path"), d.get("sha256")) for d in theirs] != [(d["path"], d["sha256"]) for d in documents]:
        # equal keys, yet a token cap took other documents with another tokenizer
        return None, "its per-document scores are of other documents"
    return [float(d["bits"]) for d in theirs], ""


def _rescore_champion(
    params: Params,
    champion: ModelVersion,
    model_dir: Path,
    metrics: dict,
    documents: list[dict],
    why: str,
    work_dir: Path,
) -> tuple[list[float], list[float], str]:
    """(challenger bits, champion bits, note), per document: the champion scored exactly as the
    challenger was, on the same documents with the same precision and context. A champion with a
    shorter block_size cannot take the challenger's context: both are then scored at the champion's."""
    from pipelines.stages.evaluate import score_saved_model

    texts = _challenger_texts(params, metrics)
    champion_dir = _download_champion(champion, work_dir)
    bf16 = bool(metrics["score_bf16"])
    context = int(metrics["score_context"])
    bits = [float(d["bits"]) for d in documents]
    note = f"champion re-scored as the challenger was: {why}"
    champion_block = int(read_json(champion_dir / CONFIG_FILE)["block_size"])
    if champion_block < context:
        bits = score_saved_model(model_dir, texts, bf16=bf16, context=champion_block)["doc_bits"]
        note += (
            f"; both scored at the champion's context of {champion_block} tokens, "
            f"not the challenger's {context}"
        )
        context = champion_block
    return bits, score_saved_model(champion_dir, texts, bf16=bf16, context=context)["doc_bits"], note


def decide_promotion(
    version: str,
    bpb: float,
    champion_version: str | None,
    champion_bpb: float | None,
    delta: BpbDelta | None,
    margin: float,
    note: str = "",
) -> tuple[bool, str]:
    """The promotion gate: (promote?, one-line reason). Promote only when the whole interval of
    challenger minus champion lies below -margin; a first version becomes champion. bpb and
    champion_bpb are on the documents the interval was measured on; note says how the two were
    made comparable, if they had to be."""
    if champion_version is None:
        return True, f"no champion yet: v{version} ({_bpb_text(bpb)} bpb) becomes champion"
    if delta is None or champion_bpb is None:
        raise ValueError("a challenger is compared with a champion through the interval of their difference")
    details = f"{_bpb_text(bpb)} vs {_bpb_text(champion_bpb)} bpb on {delta.documents} documents"
    details += f"; {note}" if note else ""
    by = f" by more than {margin} bpb" if margin else ""
    if delta.high < -margin:
        return True, f"challenger {delta.text()}: better{by}, v{version} becomes champion ({details})"
    if delta.low > 0:
        verdict = "worse"
    elif delta.high < 0:
        verdict = f"better, but not surely{by}"
    else:
        verdict = "not significant"
    return (
        False,
        f"challenger {delta.text()}: {verdict}, champion v{champion_version} keeps serving ({details})",
    )


def publish_model(params: Params, lineage: dict[str, str] | None = None, run_id: str | None = None) -> dict:
    """Log models/ as a pyfunc model, register it @challenger, and move @champion if it is better.

    Safe to run again after it was killed at any point: a version is registered with all its
    tags in one call, after its model is logged; aliases move after that; DECISION_TAG is set
    last. A re-run that finds these weights registered without DECISION_TAG finishes that
    version's alias decision instead of registering the weights again."""
    model_dir, metrics = read_trained_model(params)
    try:
        return _publish(params, model_dir, metrics, lineage, run_id)
    except MlflowException as exc:
        raise TrainpipeError(
            f"publishing to MLflow at {get_tracking_uri()} failed ({mlflow_failure(exc)}); "
            f"the trained model stays in {model_dir}/: run `trainpipe publish` to finish"
        ) from None


def _publish(
    params: Params, model_dir: Path, metrics: dict, lineage: dict | None, run_id: str | None
) -> dict:
    name = params.publish.model_name
    bpb = float(metrics["val_bits_per_byte"])
    client = MlflowClient()
    weights_sha = str(metrics["weights_sha256"])  # read_trained_model checked it is models/'s
    existing = find_version_with_weights(client, name, weights_sha)
    if existing is not None and (DECISION_TAG in existing.tags or "rolled_back_at" in existing.tags):
        # an unchanged re-run: registering the same weights again adds nothing
        champion = get_champion(client, name)
        return {
            "version": str(existing.version),
            "model_uri": f"models:/{name}/{existing.version}",
            "run_id": existing.run_id,
            "champion_version": str(champion.version) if champion else None,
            "promoted": False,
            "reason": f"these weights are already registered as v{existing.version}: nothing new to publish",
            "val_bits_per_byte": bpb,
            "champion_val_bits_per_byte": _float_tag(champion, "val_bits_per_byte") if champion else None,
            "bpb_delta": _delta_dict(read_bpb_delta(existing.tags)),
        }
    if existing is None:
        _check_rescorable(client, params, metrics)  # fail before a version exists, not after
        version, run_id = _register(client, params, model_dir, metrics, lineage, run_id, weights_sha)
        finishing = ""
    else:
        version, run_id = str(existing.version), existing.run_id
        finishing = f" (finished the publish of v{version} that was cut short)"
    with tempfile.TemporaryDirectory(prefix="trainpipe-publish-") as tmp:
        promoted, reason, champion_version, champion_bpb, delta = _decide_aliases(
            client, params, version, model_dir, metrics, Path(tmp)
        )
    set_version_tags(client, name, version, {DECISION_TAG: reason})
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run_id,
        "champion_version": champion_version,
        "promoted": promoted,
        "reason": reason + finishing,
        "val_bits_per_byte": bpb,
        "champion_val_bits_per_byte": champion_bpb,
        "bpb_delta": _delta_dict(delta),  # challenger minus champion, with its 95% interval
    }


def _delta_dict(delta: BpbDelta | None) -> dict | None:
    return asdict(delta) if delta else None


def _register(client, params: Params, model_dir: Path, metrics: dict, lineage, run_id, weights_sha):
    """Log the model into the run and register it as a new version with all its tags at once:
    (version, run id)."""
    run_id, own_run = resolve_run(client, params.publish.experiment, run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="trainpipe-publish-") as tmp:
            _log_run_inputs(client, run_id, metrics, params)
            scores_path = _log_document_scores(client, params, run_id, weights_sha)
            info = _log_model(client, params, run_id, model_dir, Path(tmp))
            _check_signature(info.model_uri)
        _test_pause("model-logged")
        tags = {k: str(v) for k, v in (lineage or {}).items() if v is not None}
        tags.update(
            val_bits_per_byte=repr(float(metrics["val_bits_per_byte"])),
            run_id=run_id,
            weights_sha256=weights_sha,
            score_key=str(metrics[SCORE_KEY_TAG]),
            **{PER_DOCUMENT_TAG: scores_path},
        )
        tags.update({field: _tag_value(metrics[field]) for field in SCORE_KEY_FIELDS})
        tags.update(cost_tags(client, params.publish.model_name, run_id))
        version = register_version(info.model_uri, params.publish.model_name, tags)
        _test_pause("registered")
    except BaseException:
        if own_run:
            finish_run(client, run_id, "FAILED")
        raise
    if own_run:
        finish_run(client, run_id, "FINISHED")
    return version, run_id


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


def _log_document_scores(client: MlflowClient, params: Params, run_id: str, weights_sha: str) -> str:
    """Log reports/per_document.json into the run, under a folder of these weights (a run may hold
    more than one version): its artifact path, for the version's PER_DOCUMENT_TAG."""
    folder = f"scores/{weights_sha[:16]}"
    log_run_artifact(client, run_id, str(Path(params.evaluate.reports_dir) / PER_DOCUMENT_FILE), folder)
    return f"{folder}/{PER_DOCUMENT_FILE}"


def _decide_aliases(client, params: Params, version: str, model_dir: Path, metrics: dict, work_dir: Path):
    """@challenger, then the promotion gate: (promoted, reason, champion version, champion bpb,
    the interval of challenger minus champion or None). The interval's tags are set on the version
    before any alias moves, so a publish cut short after the move still has them."""
    name = params.publish.model_name
    bpb = float(metrics["val_bits_per_byte"])
    set_alias(client, name, CHALLENGER, version)
    _test_pause("challenger-alias-set")
    champion = get_champion(client, name)
    if champion is not None and str(champion.version) == version:
        # a killed publish had passed the gate and moved @champion: finish recording the move
        delta = read_bpb_delta(get_version(client, name, version).tags)
        passed = f": challenger {delta.text()} vs v{delta.vs}" if delta else ""
        _move_champion(client, name, version, reason=f"passed the promotion gate{passed}")
        return True, f"v{version} became champion ({_bpb_text(bpb)} bpb)", version, bpb, delta
    if champion is None:
        promoted, reason = decide_promotion(
            version, bpb, None, None, None, params.publish.min_improvement_bpb
        )
        _move_champion(client, name, version, reason=reason, smoke_timeout_s=params.serve.smoke_timeout_s)
        return promoted, reason, version, None, None
    documents = read_document_scores(params, metrics)
    why = _rescore_why(champion, metrics)
    if not why:
        champion_bits, why = _stored_document_scores(client, champion, documents, work_dir)
    if why:
        bits, champion_bits, note = _rescore_champion(
            params, champion, model_dir, metrics, documents, why, work_dir
        )
    else:
        bits, note = [float(d["bits"]) for d in documents], ""
    doc_bytes = [int(d["bytes"]) for d in documents]
    delta = paired_bootstrap(
        bits,
        champion_bits,
        doc_bytes,
        params.publish.bootstrap_resamples,
        params.publish.bootstrap_seed,
        vs=str(champion.version),
    )
    set_version_tags(client, name, version, delta.tags())
    bpb, champion_bpb = sum(bits) / sum(doc_bytes), sum(champion_bits) / sum(doc_bytes)
    promoted, reason = decide_promotion(
        version, bpb, str(champion.version), champion_bpb, delta, params.publish.min_improvement_bpb, note
    )
    if promoted:
        _move_champion(client, name, version, reason=reason, smoke_timeout_s=params.serve.smoke_timeout_s)
    return promoted, reason, version if promoted else str(champion.version), champion_bpb, delta


def promote_version(params: Params, version: int | str) -> dict:
    """Move @champion to a given version (by hand, past the gate) and record the move."""
    client = MlflowClient()
    name = params.publish.model_name
    target = get_version(client, name, version)
    champion = get_champion(client, name)
    previous = str(champion.version) if champion else None
    version = str(target.version)
    if previous == version:
        promoted, reason = False, f"v{version} is already champion"
    else:
        reason = f"v{version} promoted by hand" + (f" (was v{previous})" if previous else "")
        _move_champion(
            client,
            name,
            version,
            reason=reason,
            command="promote",
            smoke_timeout_s=params.serve.smoke_timeout_s,
        )
        promoted = True
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "previous_champion": previous,
        "champion_version": version,
        "promoted": promoted,
        "reason": reason,
    }


def rollback_champion(params: Params) -> dict:
    """Move @champion back to the most recent earlier champion that was not itself rolled back."""
    client = MlflowClient()
    name = params.publish.model_name
    champion = get_champion(client, name)
    if champion is None:
        raise ConfigError(f"no champion registered for model {name}: nothing to roll back")
    current = str(champion.version)
    history = [move["to"] for move in champion_history(client, name)]
    target = None
    for candidate in reversed(history):
        if candidate == current:
            continue
        version = find_version(client, name, candidate)
        if version is not None and "rolled_back_at" not in version.tags:
            target = version
            break
    if target is None:
        raise ConfigError(
            f"no earlier champion of model {name} to roll back to (champion v{current}, "
            f"history {','.join(history) or 'empty'})"
        )
    version = str(target.version)
    _move_champion(
        client,
        name,
        version,
        reason=f"rolled back from v{current}",
        command="rollback",
        smoke_timeout_s=params.serve.smoke_timeout_s,
    )
    set_version_tags(client, name, current, {"rolled_back_at": _now()})
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "previous_champion": current,
        "champion_version": version,
        "promoted": True,
        "reason": f"rolled back champion from v{current} to v{version}",
    }
