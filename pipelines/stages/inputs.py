"""Inputs stage: record the pipeline's inputs from outside the workspace, which DVC cannot hash.

    python -m pipelines.stages.inputs            # what `dvc repro` runs first, every time

Writes two small files that later stages list as DVC dependencies:
    data/inputs/source.json     a manifest of data.source: the source string and every file's
                                path, size and sha256 of its contents (python-stdlib: the
                                interpreter's stdlib .py files; a folder: the files that
                                data.include / data.exclude take). ingest depends on it, so an
                                added, removed or edited file re-runs ingest, and only a real
                                change does (a touched mtime changes nothing here).
    data/inputs/champion.json   the data profile of models:/<publish.model_name>@champion with its
                                version, or why there is none (no registry, no champion, drift off),
                                or that the registry could not be read. curate takes its drift
                                reference from this file, never from the registry, so a cached
                                curate verdict always belongs to the champion this file names.

DVC cannot see a folder outside the workspace, the interpreter's stdlib or the registry, so the
stage is `always_changed` in dvc.yaml: it runs on every `dvc repro` as a check. Each file's
content changes only when what it describes changes, so an unchanged run still skips ingest,
curate and everything after them.
"""

import sys
from pathlib import Path

from pipelines.adapters import dvc_repo
from pipelines.core.data import read_json, sha256_file, write_json
from pipelines.core.errors import ConfigError, SourceError, TrainpipeError
from pipelines.core.params import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Params
from pipelines.stages import data_gate as gates
from pipelines.stages.ingest import resolve_source

SOURCE_FILE = "source.json"
CHAMPION_FILE = "champion.json"


def source_manifest(
    source: str, include: list[str] = DEFAULT_INCLUDE, exclude: list[str] = DEFAULT_EXCLUDE
) -> dict:
    """Every file of the source, sorted, with size and content hash: a folder's files as ingest
    takes them (data.include / data.exclude), so a file they leave out changes nothing. A source
    that cannot be listed is recorded as such (ingest stops on it with its own one-line reason)."""
    try:
        root, files, *_ = resolve_source(source, include, exclude)
    except SourceError as exc:
        return {"source": source, "error": str(exc), "files": []}
    entries = []
    for file in files:
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.as_posix()
        entries.append({"path": name, "size": file.stat().st_size, "sha256": sha256_file(file)})
    entries.sort(key=lambda e: e["path"])
    return {"source": source, "files": entries}


def champion_reference(params: Params) -> tuple[dict, str]:
    """(champion.json's record, the error behind an unreachable registry or "")."""
    base = {"model": params.publish.model_name, "drift_enabled": params.curate.gate.drift.enabled}
    if not base["drift_enabled"]:
        # the registry is not read at all: drift off must work with no registry in reach
        return {**base, "status": "off", "note": "drift checks are off (curate.gate.drift.enabled)"}, ""
    record, error = gates.champion_profile(params.publish.model_name)
    return {**base, **record}, error


def read_champion_reference(params: Params) -> dict:
    """champion.json as curate reads it: present, and written for the params curate runs with."""
    path = Path(params.data.inputs_dir) / CHAMPION_FILE
    if not path.is_file():
        raise SourceError(
            f"{path} is missing: run `dvc repro` (or `python -m pipelines.stages.inputs`), which records "
            "the champion's data profile for the drift check"
        )
    record = read_json(path)
    expected = (params.publish.model_name, params.curate.gate.drift.enabled)
    if (record.get("model"), record.get("drift_enabled")) != expected:
        raise ConfigError(
            f"{path} was recorded for model {record.get('model')!r} with drift "
            f"{'on' if record.get('drift_enabled') else 'off'}, not for the params now in force: "
            "run `python -m pipelines.stages.inputs` again (`dvc repro` does)"
        )
    return record


def run(params: Params) -> dict:
    inputs_dir = Path(params.data.inputs_dir)
    manifest = source_manifest(params.data.source, params.data.include, params.data.exclude)
    reference, error = champion_reference(params)
    write_json(inputs_dir / SOURCE_FILE, manifest)
    write_json(inputs_dir / CHAMPION_FILE, reference)
    if error:  # the file holds the stable part; the details go to the log
        print(f"trainpipe inputs: warning: {reference['note']}: {error}", file=sys.stderr)
    return {
        "source": manifest["source"],
        "source_error": manifest.get("error"),
        "files": len(manifest["files"]),
        "bytes": sum(e["size"] for e in manifest["files"]),
        "source_sha256": sha256_file(inputs_dir / SOURCE_FILE),
        "champion": {k: reference.get(k) for k in ("status", "version", "note", "profile_sha256")},
    }


def describe(summary: dict, params: Params) -> str:
    source = (
        f"source {summary['source']}: {summary['source_error']}"
        if summary["source_error"]
        else f"source {summary['source']}: {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, "
        f"manifest sha256 {summary['source_sha256'][:12]}"
    )
    champion = summary["champion"]
    if champion["status"] == "champion":
        reference = (
            f"drift reference: champion v{champion['version']} (profile {champion['profile_sha256'][:12]})"
        )
    elif champion["status"] == "unreachable":
        reference = f"warning: {champion['note']}"
    else:
        reference = f"drift reference: {champion['note']}"
    return f"inputs: {source}; {reference}"


def check_inputs(params: Params) -> list[str]:
    """The inputs check, as `dvc repro --single-item inputs` does it: the stage's own run() (here,
    in this process, where MLflow is loaded already for the flow's run; its command would start
    Python and import MLflow again only to read the champion), then `dvc commit` of the stage,
    which records its outputs in the cache and dvc.lock exactly as repro does after a command
    (the stage is always_changed: DVC keeps no run-cache entry for it either way). Its summary line."""
    try:
        summary = run(params)
    except (TrainpipeError, FileNotFoundError) as exc:  # as the stage's command would exit
        raise dvc_repo.StageFailed(str(exc), getattr(exc, "exit_code", 2)) from None
    dvc_repo.in_process(
        f"dvc commit {dvc_repo.INPUTS_CHECK} failed",
        lambda repo: repo.commit(dvc_repo.INPUTS_CHECK, force=True),
    )
    return [describe(summary, params)]


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("inputs", run, describe, argv)


if __name__ == "__main__":
    main()
