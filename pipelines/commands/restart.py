"""Restart from the last good state: put the workspace back to the data, tokens and model
behind the champion (or any registered version), discarding the outputs of a bad run.

    trainpipe restart                     # the champion's state
    trainpipe restart --from 3            # version 3's state

Publish logs the run's dvc.lock next to the model. Restoring first makes sure the DVC cache
holds every object that dvc.lock names (`dvc fetch` from the remote for those it lacks), and
only then writes that dvc.lock and the params it records into the workspace for good and runs
`dvc checkout`. When an object is in neither the cache nor the remote, params.yaml, dvc.lock
and the outputs are left byte for byte as they were and a one-line error names what is
missing. It is also the way back from a stale committed dvc.lock (`git checkout -- .` after a
run), whose `dvc checkout` would delete outputs. Checkpoints of the bad run are left in
checkpoints/: train only resumes one whose config and data match.
"""

import hashlib
import json
import tempfile
from pathlib import Path

from pipelines.core.data import atomic_write_bytes
from pipelines.core.errors import ConfigError
from pipelines.core.params import PARAMS_FILE, override_text, save_overrides

LOCK_FILE = "dvc.lock"
# Stages whose outputs are never pushed (dvc.yaml `push: false`): the raw snapshot holds the source
# byte for byte, secrets included. Restart goes on without it when the cache lacks it (a fresh
# clone); `trainpipe ingest` re-creates it from data.source with the same hash.
LOCAL_ONLY_STAGES = ("ingest",)


def lock_params(lock: dict) -> list[str]:
    """The params.yaml values a dvc.lock recorded, as key=value overrides."""
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
    return [override_text(k, v) for k, v in sorted(out.items())]


def file_md5(path: Path) -> str | None:
    """DVC 3's hash of a file (plain md5 of its bytes); None if there is no such file."""
    if not path.is_file():
        return None
    h = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def missing_outputs(lock: dict, cache_dir: Path, skip: tuple[str, ...] = LOCAL_ONLY_STAGES) -> list[str]:
    """The outputs a dvc.lock names that `dvc checkout` could not produce, as 'PATH' or
    'PATH (N of M files)': a file whose object is neither in the local DVC cache nor already in
    the workspace; the outputs of the stages in `skip` are not looked at. The layout is DVC 3's:
    files/md5/ab/cdef..., a directory's file list in the object of its md5 ending in .dir."""

    def obj(md5: str) -> Path:
        return cache_dir / "files" / "md5" / md5[:2] / md5[2:]

    def have(md5: str, path: Path) -> bool:
        return obj(md5).is_file() or file_md5(path) == md5  # checkout keeps a matching file

    missing = []
    for stage_name, stage in lock.get("stages", {}).items():
        if stage_name in skip:
            continue
        for out in stage.get("outs", []):
            md5, path = out.get("md5", ""), Path(out["path"])
            if not md5.endswith(".dir"):
                if not have(md5, path):
                    missing.append(out["path"])
                continue
            if not obj(md5).is_file():
                missing.append(f"{out['path']} (its file list)")
                continue
            entries = json.loads(obj(md5).read_text())
            lacking = sum(not have(e["md5"], path / e["relpath"]) for e in entries)
            if lacking:
                missing.append(f"{out['path']} ({lacking} of {len(entries)} files)")
    return missing


def local_only_missing(lock: dict, cache_dir: Path) -> list[str]:
    """Outputs of LOCAL_ONLY_STAGES that the cache lacks: restart goes on without them."""
    only = {k: v for k, v in lock.get("stages", {}).items() if k in LOCAL_ONLY_STAGES}
    return missing_outputs({"stages": only}, cache_dir, skip=())


def recorded_params_text(lock: dict) -> bytes:
    """params.yaml as it is now, with the values the dvc.lock recorded written in: computed
    in a temporary copy, so a value the schema no longer accepts fails before anything is written."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / PARAMS_FILE
        copy.write_bytes(Path(PARAMS_FILE).read_bytes())
        save_overrides(copy, lock_params(lock))
        return copy.read_bytes()


def put_back(saved: dict[str, bytes | None]) -> None:
    """Rewrite the files as they were, byte for byte (None: the file did not exist)."""
    for path, data in saved.items():
        if data is None:
            Path(path).unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, data)


def _fetch_missing(lock: dict, cache_dir: Path) -> list[str]:
    """`dvc fetch` (it writes only the cache) when objects are missing; what is still missing.
    It reads the dvc.lock in the workspace, so the recorded one must be in place."""
    from pipelines.adapters.dvc_repo import StageFailed, dvc, remote_args

    if not missing_outputs(lock, cache_dir):
        return []
    try:
        dvc(["fetch", "-q", *remote_args()], quiet=True)
    except StageFailed:
        pass  # the objects it could not download are named from the cache below
    return missing_outputs(lock, cache_dir)


def restore_version(params, version: str | None = None) -> dict:
    import yaml
    from mlflow import MlflowClient

    from pipelines.adapters.dvc_repo import dvc
    from pipelines.adapters.registry import get_champion, get_version, run_artifact_bytes

    client = MlflowClient()
    name = params.publish.model_name
    mv = get_version(client, name, version) if version else get_champion(client, name)
    if mv is None:
        raise ConfigError(f"no champion registered for model {name!r}: nothing to restore")
    lock_bytes = run_artifact_bytes(client, mv.run_id, LOCK_FILE)
    if lock_bytes is None:
        raise ConfigError(f"version {mv.version} of {name!r} has no dvc.lock recorded: cannot restore")
    lock = yaml.safe_load(lock_bytes)
    params_bytes = recorded_params_text(lock)
    cache_dir = Path(dvc(["cache", "dir"], quiet=True).strip())
    saved = {p: Path(p).read_bytes() if Path(p).is_file() else None for p in (PARAMS_FILE, LOCK_FILE)}
    try:
        atomic_write_bytes(PARAMS_FILE, params_bytes)
        atomic_write_bytes(LOCK_FILE, lock_bytes)
        missing = _fetch_missing(lock, cache_dir)
        if missing:
            raise ConfigError(
                f"version {mv.version} of {name!r} cannot be restored: {', '.join(missing)} in neither "
                "the DVC cache nor the DVC remote; params.yaml, dvc.lock and outputs left as they were"
            )
        not_restored = local_only_missing(lock, cache_dir)
        dvc(["checkout", "--force", "-q", *(["--allow-missing"] if not_restored else [])], quiet=True)
    except BaseException:
        # also on Ctrl-C: never leave a recorded dvc.lock over outputs it does not describe
        put_back(saved)
        raise
    return {"version": str(mv.version), "run_id": mv.run_id, "not_restored": not_restored}
