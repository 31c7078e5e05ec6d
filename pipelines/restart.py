"""Restart from the last good state: put the workspace back to the data, tokens and model
behind the champion (or any registered version), discarding the outputs of a bad run.

    trainpipe restart                     # the champion's state
    trainpipe restart --from 3            # version 3's state

Publish logs the run's dvc.lock next to the model. Restoring writes that dvc.lock and the
params it records into the workspace, then `dvc checkout` brings the outputs back from the DVC
cache (`dvc pull` from the remote when the cache lacks them). Checkpoints of the bad run are
left in checkpoints/: train only resumes one whose config and data match.
"""

import shutil
import tempfile
from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.params import PARAMS_FILE, save_overrides


def lock_params(lock: dict) -> list[str]:
    """The params.yaml values a dvc.lock recorded, as key=value overrides."""
    import json

    out: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for stage in lock.get("stages", {}).values():
        for key, value in stage.get("params", {}).get(PARAMS_FILE, {}).items():
            walk(key, value)
    return [f"{k}={json.dumps(v)}" for k, v in sorted(out.items())]


def restore_version(params, version: str | None = None) -> dict:
    import mlflow
    import yaml
    from mlflow import MlflowClient

    from flows.dvc import StageFailed, dvc
    from pipelines.publish import _get_version, get_champion

    client = MlflowClient()
    name = params.publish.model_name
    mv = _get_version(client, name, version) if version else get_champion(client, name)
    if mv is None:
        raise ConfigError(f"no champion registered for model {name!r}: nothing to restore")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lock_path = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="dvc.lock", dst_path=tmp
            )
        except Exception:
            raise ConfigError(
                f"version {mv.version} of {name!r} has no dvc.lock recorded: cannot restore"
            ) from None
        lock = yaml.safe_load(Path(lock_path).read_text())
        save_overrides(PARAMS_FILE, lock_params(lock))
        shutil.copyfile(lock_path, "dvc.lock")
    try:
        dvc(["checkout", "--force", "-q"], quiet=True)
    except StageFailed:
        dvc(["pull", "--force", "-q"], quiet=True)  # not in the local cache: fetch from the remote
    return {"version": str(mv.version), "run_id": mv.run_id}
