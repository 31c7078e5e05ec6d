"""Every call trainpipe makes to MLflow's client lives here: the registry (versions, aliases,
tags, the champion's history, endpoint records), the runs publish logs into and the model it logs.

Publish, promote, rollback, restart, status, serve and curate's drift check all read and write
through these functions, so an unknown model, alias or version means the same everywhere (None or
a one-line ConfigError) while an unreachable server always raises. Nothing here decides anything:
the promotion gate and the smoke test are pipelines.commands.promotion's; this module only speaks MLflow.
(pipelines/serving/smoke.py downloads the version it tests itself: it runs as a script that must import
nothing of this checkout, so that the version's own code is what loads.)
"""

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.core.code_scope import own_code_scope

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG_PREFIX = "champion_move/"  # + a sortable UTC time and a random suffix: one tag per move
LEGACY_HISTORY_TAG = "champion_history"  # versions, comma-separated: written before the records
MAX_REASON_CHARS = 500


def get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    return get_alias(client, name, CHAMPION)


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind an alias, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # An unknown model is RESOURCE_DOES_NOT_EXIST; an unknown alias, INVALID_PARAMETER_VALUE.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_version_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


# An endpoint records what it serves on the registered model (one tag per endpoint), so that
# `trainpipe status` and the flow find it on any machine that reads the registry.
ENDPOINT_TAG_PREFIX = "endpoint/"


def endpoint_tag(host: str, port: int) -> str:
    return f"{ENDPOINT_TAG_PREFIX}{host}-{port}"


def write_endpoint_record(client: MlflowClient, name: str, key: str, record: dict) -> None:
    client.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))


def delete_endpoint_record(client: MlflowClient, name: str, key: str) -> None:
    try:
        client.delete_registered_model_tag(name, key)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def endpoint_records(client: MlflowClient, name: str) -> list[dict]:
    """What each endpoint of the model last recorded: {url, version, since, pid, failure, ...}."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    records = []
    for key in sorted(k for k in tags if k.startswith(ENDPOINT_TAG_PREFIX)):
        try:
            record = json.loads(tags[key])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("url"):
            records.append({**record, "key": key})
    return records


# MLflow 3 marks an experiment's kind with this tag: GenAI ("genai_development") or model training
# ("custom_model_development", the UI's "Machine learning"). Untagged, the UI asks or shows GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def training_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created as a model-training experiment if there is none. One
    that exists without a kind gets it, so that older projects' UIs switch too; a kind somebody
    chose stays."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except MlflowException as exc:  # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return found.experiment_id


def set_training_experiment(name: str) -> str:
    """Make `name` (a model-training experiment, see training_experiment) the experiment of the
    fluent mlflow calls that follow: its id."""
    import mlflow

    experiment_id = training_experiment(MlflowClient(), name)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def last_flow_run(client: MlflowClient, experiment: str) -> dict | None:
    """The latest MLflow run of the training flow in the experiment (one per flow run)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.prefect_flow_run_id != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "prefect_flow_run_id": run.data.tags.get("prefect_flow_run_id"),
        "published": run.data.tags.get("published"),
    }


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


def run_experiment_id(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id


def ledger_runs(client: MlflowClient, experiment_id: str, started_after_ms: int, metric: str) -> list[dict]:
    """Every run of the experiment started after started_after_ms that logged the ledger's metric
    (flow runs: finished, failed or killed alike), oldest first: {run_id, status, start_time, metrics}."""
    found, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.start_time > {int(started_after_ms)} and metrics.`{metric}` >= 0",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        found += [
            {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "metrics": dict(run.data.metrics),
            }
            for run in page
        ]
        token = page.token
        if not token:
            return found


def get_version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    """A registered version; ConfigError naming it when there is no such version."""
    from pipelines.core.errors import ConfigError

    found = find_version(client, name, str(version))
    if found is None:
        raise ConfigError(f"model {name} has no version {version}")
    return found


def run_artifact_bytes(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    """A run's artifact at path (a top-level file), or None when the run has none there."""
    import tempfile

    if path not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="trainpipe-artifact-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def find_version_with_weights(client: MlflowClient, name: str, weights_sha: str) -> ModelVersion | None:
    """A registered version holding exactly these weights, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise  # an unreachable tracking server must not look like "not registered yet"
    return found[0] if found else None


def find_version(client: MlflowClient, name: str, version: str) -> ModelVersion | None:
    """A registered version, or None when it does not exist (deleted, say)."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def model_versions(client: MlflowClient, name: str, run_id: str | None = None) -> list[ModelVersion]:
    """Every version of the model (of run_id's only, when given), newest first; [] for an unknown model."""
    query = f"name = '{name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    return sorted(client.search_model_versions(query), key=lambda v: int(v.version), reverse=True)


def model_aliases(client: MlflowClient, name: str) -> dict[str, str] | None:
    """{alias: version} of the model, or None when there is no such registered model."""
    try:
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def find_run(client: MlflowClient, run_id: str):
    """An MLflow run (mlflow.entities.Run), or None when there is no run with that id."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def delete_version_tag(client: MlflowClient, name: str, version: str, key: str) -> None:
    client.delete_model_version_tag(name, str(version), key)


def register_version(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register model_uri as a new version of name with all its tags at once: its number."""
    import mlflow

    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def champion_history(client: MlflowClient, name: str) -> list[dict]:
    """Every move of @champion, oldest first: {time, from, to, reason, flow_run, command}.
    Versions of a registry written before the records (the CSV tag) come first, without a time."""
    tags = client.get_registered_model(name).tags
    legacy = [v for v in tags.get(LEGACY_HISTORY_TAG, "").split(",") if v]
    moves = [
        {
            "time": "",
            "from": prev,
            "to": v,
            "reason": "recorded before trainpipe kept one record per move",
            "flow_run": None,
            "command": None,
        }
        for prev, v in zip([None, *legacy], legacy, strict=False)
    ]
    for key in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX)):
        try:
            record = json.loads(tags[key])
        except json.JSONDecodeError:
            continue  # not written by trainpipe: not a move it can vouch for
        if isinstance(record, dict) and record.get("to"):
            moves.append(record)
    return moves


def record_move(
    client: MlflowClient,
    name: str,
    moved_from: str | None,
    to: str,
    reason: str,
    command: str,
    flow_run: str | None,
) -> None:
    """One registered-model tag per move of @champion, never rewritten: concurrent moves lose none."""
    now = datetime.now(UTC)
    # The key sorts by time; the random suffix keeps two moves in one microsecond apart.
    key = f"{HISTORY_TAG_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"
    record = {
        "time": now.isoformat(timespec="seconds"),
        "from": moved_from,
        "to": to,
        "reason": reason[:MAX_REASON_CHARS],
        "flow_run": flow_run,
        "command": command,
    }
    client.set_registered_model_tag(name, key, json.dumps(record))


def download_model_artifacts(model_uri: str, dst: str) -> dict[str, Path]:
    """A registered pyfunc model's artifacts (models:/name/version), downloaded into dst:
    {artifact key: local path}, the keys those it was logged with (log_model_from_code)."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst))
    artifacts = mlflow.models.Model.load(str(local)).flavors["python_function"]["artifacts"]
    return {key: local / artifact["path"] for key, artifact in artifacts.items()}


def download_run_artifact(client: MlflowClient, run_id: str, path: str, dst: str) -> str:
    return client.download_artifacts(run_id, path, dst)


# The runs publish logs into.


def resolve_run(client: MlflowClient, experiment: str, run_id: str | None) -> tuple[str, bool]:
    """(run id, whether we created it): the given run, else the active run, else a new run."""
    import mlflow

    if run_id:
        return run_id, False
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    run = client.create_run(
        training_experiment(client, experiment), run_name="publish", tags={"trainpipe.stage": "publish"}
    )
    return run.info.run_id, True


def last_logged_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The highest step at which the run logged metric key; 0 when it has none."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def log_step_metrics(client: MlflowClient, run_id: str, points: list[tuple[int, dict[str, float]]]) -> None:
    """[(step, {key: value})] into the run, in batches of MLflow's limit of 1000 metrics a call."""
    import time

    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now_ms, step) for step, values in points for key, value in values.items()
    ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status)


def log_missing_metrics(client: MlflowClient, run_id: str, metrics: dict) -> None:
    """The numeric metrics the run does not have yet."""
    have = client.get_run(run_id).data.metrics
    for key, value in metrics.items():
        if key not in have and isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run_id, key, float(value))


def log_run_artifact(client: MlflowClient, run_id: str, path: str, folder: str | None = None) -> None:
    client.log_artifact(run_id, path, folder)


def create_logged_model(client: MlflowClient, run_id: str) -> str:
    """A logged model in the run's experiment: its id. Given only a run id, MLflow 3.17 would file
    the model under the default experiment (or the active run's), not the run's."""
    experiment_id = client.get_run(run_id).info.experiment_id
    return client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id


def log_model_from_code(
    client: MlflowClient,
    run_id: str,
    python_model: str,
    artifacts: dict[str, str],
    code_paths: list[str],
    model_config: dict,
    pip_requirements: list[str],
    signature,
    input_example,
):
    """Log a pyfunc model from code (python_model, the file MLflow runs to load it: no pickle) into
    the run, as a logged model of the run's experiment: its mlflow.models.model.ModelInfo."""
    import mlflow

    # Model.log rather than mlflow.pyfunc.log_model: it takes the run id, so the flow's run
    # (possibly active in another thread) need not be the active run, nor is it ended here.
    # The logged model is created first, in the run's experiment (create_logged_model).
    # Model.log loads the model to check input_example, which leaves its code dir on sys.path.
    with own_code_scope():
        return mlflow.models.Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=create_logged_model(client, run_id),
            python_model=python_model,
            artifacts=artifacts,
            code_paths=code_paths,
            model_config=model_config,
            pip_requirements=pip_requirements,
            signature=signature,
            input_example=input_example,
        )


def logged_model_signature(model_uri: str):
    """The signature a logged model was stored with (mlflow.models.ModelSignature), or None."""
    import mlflow

    return mlflow.models.get_model_info(model_uri).signature


# Where MLflow is, and why it failed.


def get_tracking_uri() -> str:
    """The tracking URI this process resolved: MLFLOW_TRACKING_URI, else MLflow's default."""
    import mlflow

    return mlflow.get_tracking_uri()


def mlflow_failure(exc: MlflowException) -> str:
    """A short reason: an unreachable server's message is a long URL and a retry count."""
    text = (exc.message or str(exc)).strip()
    if "Max retries exceeded" in text or "Connection refused" in text or "timed out" in text:
        return "the tracking server did not answer, after MLflow's HTTP retries"
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
