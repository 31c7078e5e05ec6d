"""The inputs DVC cannot hash, end to end: the champion's data profile in the MLflow registry and
the files of a local data.source, recorded by the always-changed `inputs` stage. Real `dvc repro`
in a temporary git repository and a real MLflow registry on SQLite (issue 8, items 4 and 5)."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import BIN, MODEL, free_port, make_project, sh, trainpipe
from mlflow import MlflowClient
from test_catalogue import good_corpus, module

from pipelines.core.params import save_overrides
from pipelines.stages.inputs import source_manifest


def dvc_repro(proj: Path, env: dict, *targets: str):
    return sh([str(BIN / "dvc"), "repro", *targets], proj, env)


def ran(result) -> set[str]:
    """The stages a `dvc repro` ran (DVC's "Running stage 'X'" lines)."""
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}


def curation(proj: Path) -> dict:
    return json.loads((proj / "reports/curation.json").read_text())


# --- unit: the source manifest -------------------------------------------------------------------


def test_source_manifest_changes_with_contents_not_mtimes(tmp_path):
    folder = tmp_path / "src"
    good_corpus(folder, n=3)
    before = source_manifest(str(folder))
    assert [e["path"] for e in before["files"]] == ["mod_000.py", "mod_001.py", "mod_002.py"]
    os.utime(folder / "mod_001.py", (1, 1))  # touched: same bytes
    assert source_manifest(str(folder)) == before
    text = (folder / "mod_001.py").read_text()
    (folder / "mod_001.py").write_text(text.replace("record 1", "record 9"))  # same size, other bytes
    edited = source_manifest(str(folder))
    assert edited != before and [e["size"] for e in edited["files"]] == [e["size"] for e in before["files"]]
    (folder / "mod_003.py").write_text(module(3))
    assert len(source_manifest(str(folder))["files"]) == 4
    (folder / "mod_000.py").unlink()
    assert [e["path"] for e in source_manifest(str(folder))["files"]] == [
        "mod_001.py",
        "mod_002.py",
        "mod_003.py",
    ]
    missing = source_manifest(str(tmp_path / "nowhere"))
    assert missing["files"] == [] and "no such file, folder or glob" in missing["error"]


# --- item 5: a local folder source ---------------------------------------------------------------


@pytest.mark.slow
def test_a_changed_local_source_reruns_ingest_and_only_then(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    folder = tmp_path / "corpus"  # outside the project: no DVC dependency could name it before
    good_corpus(folder, n=40)
    save_overrides(
        proj / "params.yaml",
        [
            f"data.source={folder}",
            "curate.gate.min_documents=10",
            "curate.gate.min_bytes=10000",
            "train.max_steps=5",
        ],
    )
    first = dvc_repro(proj, env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert ran(first) == {"inputs", "parent", "ingest", "curate", "tokenize", "train", "evaluate"}

    def documents() -> int:
        return json.loads((proj / "data/raw/ingest.json").read_text())["documents"]

    os.utime(folder / "mod_007.py", (1, 1))  # a touched mtime: the same bytes
    touched = dvc_repro(proj, env)
    assert touched.returncode == 0 and ran(touched) == {"inputs"}, touched.stdout

    # each change is followed by `dvc repro ingest` (inputs, then ingest only if needed), the last
    # by a plain `dvc repro`, which carries it through every stage after ingest
    text = (folder / "mod_011.py").read_text()
    (folder / "mod_011.py").write_text(text.replace("record 11", "record 99"))  # same size
    edited = dvc_repro(proj, env, "ingest")
    assert edited.returncode == 0 and ran(edited) == {"inputs", "ingest"}, edited.stderr[-2000:]
    raw = pq.read_table(proj / "data/raw/part-00000.parquet", filters=[("path", "==", "mod_011.py")])
    assert b"record 99" in raw.column("content")[0].as_py()

    (folder / "mod_040.py").write_text(module(40))
    added = dvc_repro(proj, env, "ingest")
    assert added.returncode == 0 and ran(added) == {"inputs", "ingest"} and documents() == 41

    (folder / "mod_003.py").unlink()
    removed = dvc_repro(proj, env)
    assert removed.returncode == 0, removed.stderr[-2000:]
    assert ran(removed) == {"inputs", "ingest", "curate", "tokenize", "train", "evaluate"}
    assert documents() == 40

    again = dvc_repro(proj, env)
    assert again.returncode == 0 and ran(again) == {"inputs"}, again.stdout


# --- item 4: the champion's profile is a declared input of curate ----------------------------------


def make_champion_with_profile(env: dict, profile: dict, where: Path) -> str:
    """Register a version whose run holds this data profile and make it @champion; its number."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("other-data", artifact_location=(where / "artifacts").as_uri())
    run = client.create_run(experiment)
    (where / "data_profile.json").write_text(json.dumps(profile))
    client.log_artifact(run.info.run_id, str(where / "data_profile.json"))
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", version.version)
    return str(version.version)


@pytest.mark.slow
def test_curate_reruns_against_a_new_champion_and_warns_when_the_registry_is_unreachable(
    tmp_path, mlflow_template_db
):
    proj, env = make_project(tmp_path, mlflow_template_db)
    save_overrides(proj / "params.yaml", ["train.max_steps=5"])
    first = dvc_repro(proj, env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert curation(proj)["drift"]["note"].startswith(f"no models:/{MODEL}@champion yet")

    published = trainpipe(proj, env, "publish")  # the first champion appears
    assert published.returncode == 0, published.stderr[-2000:]
    after_publish = dvc_repro(proj, env)
    assert after_publish.returncode == 0, after_publish.stderr[-2000:]
    # only curate re-checks the data; its curated table is the same, so nothing after it runs
    assert ran(after_publish) == {"inputs", "curate"}, after_publish.stdout
    assert curation(proj)["drift"]["reference"]["version"] == "1"
    assert {c["verdict"] for c in curation(proj)["drift"]["checks"]} == {"ok"}
    unchanged = dvc_repro(proj, env)
    assert unchanged.returncode == 0 and ran(unchanged) == {"inputs"}, unchanged.stdout

    # another champion, trained on ten times as many documents: the same data now drifts
    profile = json.loads((proj / "reports/data_profile.json").read_text())
    profile["documents"] *= 10
    version = make_champion_with_profile(env, profile, tmp_path)
    blocked = dvc_repro(proj, env)
    assert blocked.returncode != 0, blocked.stdout[-2000:]
    assert "drift_documents (observed " in blocked.stderr and " vs champion " in blocked.stderr
    assert curation(proj)["drift"]["reference"]["version"] == version

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.set_registered_model_alias(MODEL, "champion", "1")  # back: v1's verdict is valid again
    back = dvc_repro(proj, env)
    assert back.returncode == 0, back.stderr[-2000:]
    assert curation(proj)["drift"]["reference"]["version"] == "1"

    unreachable_env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    unreachable = dvc_repro(proj, unreachable_env)
    assert unreachable.returncode == 0, unreachable.stderr[-2000:]
    assert "curate" in ran(unreachable) and "train" not in ran(unreachable)
    warnings = {w["check"]: w for w in curation(proj)["gate"]["warnings"]}
    assert "unreachable" in warnings["drift"]["observed"], curation(proj)["gate"]
    assert "warning: drift (observed registry http://127.0.0.1:" in unreachable.stdout

    # restart puts back v1's dvc.lock: the inputs files restore from the DVC cache with the rest
    restart = trainpipe(proj, env, "restart")
    assert restart.returncode == 0, restart.stderr[-2000:]
    status = sh([str(BIN / "dvc"), "status", "ingest", "curate", "tokenize", "train", "evaluate"], proj, env)
    assert "up to date" in status.stdout, status.stdout
    assert json.loads((proj / "data/inputs/champion.json").read_text())["status"] == "none"
