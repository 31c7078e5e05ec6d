"""The data a run used, as MLflow dataset inputs: the run page's "Datasets used" names the data
that trained and scored the model, by DVC's own hashes.

    name        what                                          digest                   context
    curated     data/curated: the corpus after the data gate  its md5 in dvc.lock      training
    tokens      data/tokens: what train reads                 its md5 in dvc.lock      training
    validation  the held-out documents evaluate scores        val_set_sha256 (32 hex)  evaluation

An md5 of dvc.lock is what `dvc checkout`, the DVC cache and the DVC remote know the data by. The
validation split is no DVC output of its own (evaluate takes it from data/curated by a hash of each
path): its digest is the hash that scores compare under, so two runs scored on the same documents
show the same digest. Each source names the workspace path, the DVC stage that wrote it and the
git commit of the code. The flow logs them once its stages have run (flows/training.py).
"""

from pathlib import Path

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

from pipelines.core.data import read_json
from pipelines.core.params import DataParams

LOCK_FILE = "dvc.lock"


class DvcPathSource(DatasetSource):
    """A path that DVC tracks in this project's workspace, the stage that writes it and the git
    commit of the code. Its type is MLflow's "local" and it keeps the path under "uri", as
    MLflow's own local source does: the UI shows a path only for the source types it knows."""

    def __init__(self, path: str, stage: str, git_commit: str = ""):
        self.path, self.stage, self.git_commit = path, stage, git_commit

    @staticmethod
    def _get_source_type() -> str:
        return "local"

    def load(self) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source) -> bool:
        return False  # made explicitly, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source) -> "DvcPathSource":
        raise NotImplementedError("DvcPathSource is made explicitly")

    def to_dict(self) -> dict:
        return {"uri": self.path, "dvc_stage": self.stage, "git_commit": self.git_commit}

    @classmethod
    def from_dict(cls, source_dict: dict) -> "DvcPathSource":
        return cls(source_dict["uri"], source_dict.get("dvc_stage", ""), source_dict.get("git_commit", ""))


class DvcDataset(MetaDataset):
    """MLflow's metadata-only dataset (nothing is uploaded) with a small profile: documents,
    tokens and bytes, shown in the UI's dataset drawer."""

    def __init__(self, source: DvcPathSource, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict:
        import json

        return super().to_dict() | {"profile": json.dumps(self._profile)}


def locked_outs(lock_path: str | Path = LOCK_FILE) -> dict[str, tuple[str, str]]:
    """{output path: (md5, stage)} as dvc.lock records them; {} without a dvc.lock."""
    import yaml

    lock = Path(lock_path)
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        Path(out["path"]).as_posix(): (out["md5"], stage)
        for stage, entry in stages.items()
        for out in entry.get("outs", [])
        if out.get("md5")
    }


def run_datasets(data: DataParams, git_commit: str = "", lock_path: str | Path = LOCK_FILE) -> list[tuple]:
    """[(DvcDataset, context)] of the data this workspace's last stages used; those whose record is
    missing (no dvc.lock, no tokens yet) are left out."""
    outs = locked_outs(lock_path)
    meta_path = Path(data.tokens_dir) / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    train, val = meta.get("train", {}), meta.get("val", {})
    found = []
    curated, tokens = Path(data.curated_dir).as_posix(), Path(data.tokens_dir).as_posix()
    if curated in outs:
        md5, stage = outs[curated]
        profile = {k: train.get(k, 0) + val.get(k, 0) for k in ("documents", "bytes")} if meta else {}
        found.append(
            (DvcDataset(DvcPathSource(curated, stage, git_commit), "curated", md5, profile), "training")
        )
    if tokens in outs and meta:
        md5, stage = outs[tokens]
        profile = {"vocab_size": meta.get("vocab_size"), **train}
        found.append(
            (DvcDataset(DvcPathSource(tokens, stage, git_commit), "tokens", md5, profile), "training")
        )
    if curated in outs and meta.get("val_set_sha256"):
        source = DvcPathSource(curated, outs[curated][1], git_commit)
        # MLflow keeps at most 36 characters of a digest
        found.append((DvcDataset(source, "validation", meta["val_set_sha256"][:32], val), "evaluation"))
    return found


def log_run_datasets(data: DataParams, git_commit: str = "", lock_path: str | Path = LOCK_FILE) -> list[str]:
    """Log the run's datasets (run_datasets) as inputs of the active MLflow run: their names."""
    import mlflow

    found = run_datasets(data, git_commit, lock_path)
    if found:
        datasets, contexts = zip(*found, strict=True)
        mlflow.log_inputs(list(datasets), contexts=list(contexts), tags_list=[None] * len(found))
    return [dataset.name for dataset, _ in found]
