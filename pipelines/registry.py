"""Registry reads shared by publishing, restart and serving: the version behind an alias.

Kept apart from pipelines.publish so that the serving side can read the champion without
importing publish (which imports the served model's module).
"""

import json

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CHAMPION = "champion"


def get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # An unknown model is RESOURCE_DOES_NOT_EXIST; an unknown alias, INVALID_PARAMETER_VALUE.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind an alias, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
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


def get_version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    """A registered version; ConfigError naming it when there is no such version."""
    from pipelines.errors import ConfigError

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"model {name} has no version {version}") from None
        raise


def run_artifact_bytes(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    """A run's artifact at path (a top-level file), or None when the run has none there."""
    import tempfile
    from pathlib import Path

    if path not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="trainpipe-artifact-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
