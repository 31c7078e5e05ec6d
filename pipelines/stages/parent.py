"""Parent: pin the registered version a fine-tune starts from, as files DVC versions.

    python -m pipelines.stages.parent            # what `dvc repro parent` runs
    trainpipe finetune                           # sets finetune.parent_version to @champion's version

With finetune.parent_version set, fetch that version of publish.model_name from the MLflow
registry, check its weights against the sha256 recorded at registration, and write into
finetune.parent_dir (data/parent):

    model.safetensors, config.json, tokenizer.json   the parent, as registered
    parent.json                                      its version, weights sha256, run and costs

With it null (`trainpipe run`, a training from scratch), parent.json alone says so. tokenize and
train depend on this folder: they encode with the parent's tokenizer and start from its weights.
The stage re-runs only when finetune.parent_version or the model name changes, and DVC keeps its
output, so `dvc repro` reproduces a fine-tune from the same pinned weights even after @champion
has moved on or the registry is out of reach.
"""

import shutil
import tempfile
from pathlib import Path

from pipelines.core.data import TOKENIZER_FILE, atomic_path, read_json, sha256_file, write_json
from pipelines.core.errors import ConfigError, TrainpipeError
from pipelines.core.model_dir import CONFIG_FILE, MODEL_FILES, WEIGHTS_FILE
from pipelines.core.params import Params

PARENT_FILE = "parent.json"
# the logged model's artifact keys (publish._log_model) -> the model dir's file names
ARTIFACT_FILES = {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "tokenizer": TOKENIZER_FILE}
# the version's ledger tags carried into parent.json: the fine-tune's cost sits next to them
COST_TAGS = ("cost_run_cpu_s", "cost_run_gpu_s", "cost_run_usd")


class ParentMismatch(TrainpipeError):
    """The parent's files are not what the registry recorded: nothing is pinned."""

    exit_code = 2


def check_architecture(params: Params, parent_dir: Path, version: int) -> None:
    """The parent's model config (config.json) against the one train's params and
    tokenize.vocab_size build: a fine-tune keeps its parent's architecture and tokenizer, so any
    difference is a ConfigError naming each field."""
    found = read_json(parent_dir / CONFIG_FILE)
    ours = {
        k: params.tokenize.vocab_size if k == "vocab_size" else getattr(params.train, k, None) for k in found
    }
    differ = [
        f"{where(k)} {ours[k]!r} (the parent's: {found[k]!r})" for k in sorted(found) if ours[k] != found[k]
    ]
    if differ:
        raise ConfigError(
            f"finetune: version {version} was trained with another architecture or tokenizer: "
            f"{'; '.join(differ)}. A fine-tune keeps its parent's: set them back, or train anew with `trainpipe run`"
        )


def where(field: str) -> str:
    return "tokenize.vocab_size" if field == "vocab_size" else f"train.{field}"


def read_parent(params: Params) -> dict:
    """parent.json as tokenize and train read it: written for the params now in force, with
    weights whose sha256 is the registered one and an architecture the params build.
    {"version": None} means training from scratch."""
    wanted = params.finetune.parent_version
    if not wanted:  # from random weights: nothing of data/parent is read
        return {"version": None}
    parent_dir = Path(params.finetune.parent_dir)
    path = parent_dir / PARENT_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: run `dvc repro` (or `python -m pipelines.stages.parent`)")
    record = read_json(path)
    if record.get("version") != wanted or record.get("model") != params.publish.model_name:
        raise ConfigError(
            f"{path} pins version {record.get('version')} of {record.get('model')!r}, not "
            f"finetune.parent_version {wanted}: run `python -m pipelines.stages.parent` (`dvc repro` does)"
        )
    found = sha256_file(parent_dir / WEIGHTS_FILE)
    if found != record["weights_sha256"]:
        raise ParentMismatch(
            f"{parent_dir / WEIGHTS_FILE} has sha256 {found[:12]}, not the registered "
            f"{record['weights_sha256'][:12]} of version {wanted}: run `dvc repro -f parent`"
        )
    check_architecture(params, parent_dir, wanted)
    return record


def fetch_parent(params: Params, version: int, out_dir: Path) -> dict:
    """Download version's weights, config and tokenizer into out_dir and check the weights
    against the version's weights_sha256 tag; the record parent.json keeps."""
    from mlflow import MlflowClient

    from pipelines.adapters.registry import download_model_artifacts, get_version

    name = params.publish.model_name
    found = get_version(MlflowClient(), name, version)  # ConfigError when there is no such version
    recorded = found.tags.get("weights_sha256")
    if not recorded:
        raise ParentMismatch(f"version {version} of {name} has no weights_sha256 tag: it cannot be checked")
    with tempfile.TemporaryDirectory(prefix="trainpipe-parent-") as tmp:
        artifacts = download_model_artifacts(f"models:/{name}/{version}", tmp)
        missing = sorted(set(ARTIFACT_FILES) - set(artifacts))
        if missing:
            raise ParentMismatch(f"version {version} of {name} lacks the artifacts {missing}")
        weights_sha = sha256_file(artifacts["weights"])
        if weights_sha != recorded:
            raise ParentMismatch(
                f"version {version} of {name}: the stored weights have sha256 {weights_sha[:12]}, "
                f"not the {recorded[:12]} recorded at registration; nothing pinned"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, file in ARTIFACT_FILES.items():
            with atomic_path(out_dir / file) as dst:
                shutil.copyfile(artifacts[key], dst)
    return {
        "model": name,
        "version": version,
        "weights_sha256": weights_sha,
        "run_id": found.run_id,
        "kind": found.tags.get("kind", "train"),
        "cost": {tag: float(found.tags[tag]) for tag in COST_TAGS if tag in found.tags},
    }


def run(params: Params) -> dict:
    out_dir = Path(params.finetune.parent_dir)
    version = params.finetune.parent_version
    # what a previous parent left must not be mistaken for this one's
    for file in (PARENT_FILE, *MODEL_FILES):
        (out_dir / file).unlink(missing_ok=True)
    record = fetch_parent(params, version, out_dir) if version else {"version": None}
    if version:  # before anything downstream runs: a bad fine-tune fails in seconds
        check_architecture(params, out_dir, version)
    write_json(out_dir / PARENT_FILE, record)  # last: a failed fetch leaves no parent.json
    return record


def describe(record: dict, params: Params) -> str:
    if not record["version"]:
        return "parent: none (finetune.parent_version is null): training starts from random weights"
    return (
        f"parent: version {record['version']} of {record['model']}, weights sha256 "
        f"{record['weights_sha256'][:12]} checked, pinned in {params.finetune.parent_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("parent", run, describe, argv)


if __name__ == "__main__":
    main()
