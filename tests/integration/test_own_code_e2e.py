"""README "Train on your own code", end to end: `trainpipe run -S data.source=FOLDER` on a generated
repository with stray files, then a very different corpus that the drift check blocks with the
way forward, and both ways forward taken. Every component real: Prefect flow runs through the
`trainpipe` command, `dvc repro` underneath, an MLflow registry on SQLite (issue 12, part 4)."""

import json
import random
from pathlib import Path

import pytest
from conftest import BIN, MODEL, REPO, make_project, sh
from mlflow import MlflowClient
from test_catalogue import module, prose

from pipelines.core.shards import iter_documents

pytestmark = pytest.mark.slow

NEW_LINE = "e2e-own-code"
# Fewer steps than the other end-to-end tests: this one trains twice; the model's quality is not its subject
FAST = ["train.max_steps=20", "train.checkpoint_every=10", "train.warmup_steps=5"]
GATE = ["curate.gate.min_documents=10", "curate.gate.min_bytes=20000"]


def own_repository(root: Path) -> list[str]:
    """A small Python project as a user would point at it, with what is not a document in it: a
    stray .json, an image, a binary file named like text, a .git folder, a __pycache__. Returns
    the paths of the files that are documents."""
    documents = {}
    for i in range(40):
        documents[f"pkg/{['parse', 'render', 'store', 'fetch'][i % 4]}_{i:02d}.py"] = module(
            i, f"step{i % 4}"
        )
    for i in range(8):
        documents[f"docs/guide_{i}.md"] = f"# Guide {i}\n\n{prose(i, 120)}\n"
    stray = {
        "config/settings.json": json.dumps({"debug": True, "retries": 3}),  # a table with no text column
        ".git/HEAD": "ref: refs/heads/main\n",
        ".git/config": "[core]\n\trepositoryformatversion = 0\n",
        ".git/hooks/pre_commit.py": module(90, "hook"),  # code, but in .git: never walked
        "pkg/__pycache__/parse_00.cpython-311.py": module(91, "cached"),
    }
    for name, text in {**documents, **stray}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "docs/logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(3000))
    (root / "docs/dump.txt").write_bytes(
        b"\x00\x01" + random.Random(1).randbytes(3000)
    )  # binary, named like text
    return sorted(documents)


RECIPE_WORDS = (
    "recipe flour butter sugar oven bake minutes stir bowl mixture golden serve warm cream eggs".split()
)


def recipes(root: Path, n: int = 120) -> None:
    """Another corpus altogether: more documents (2.5 times), and prose with not a word of code."""
    root.mkdir(parents=True)
    for i in range(n):
        rng = random.Random(1000 + i)
        (root / f"recipe_{i:03d}.txt").write_text(
            " ".join(rng.choice(RECIPE_WORDS) for _ in range(110)) + ".\n"
        )


def trainpipe(proj: Path, env: dict, *args: str):
    # a flow run that trains: on a shared 2-core machine this can take over 5 minutes
    return sh([str(BIN / "trainpipe"), *args], proj, env, timeout=1200)


def last_line(run) -> str:
    return run.stderr.strip().splitlines()[-1]


def test_train_on_your_own_code(tmp_path, mlflow_template_db):
    proj, env = make_project(tmp_path, mlflow_template_db)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    readme = (REPO / "README.md").read_text()
    assert "trainpipe run -S data.source=/path/to/repo" in readme  # the command this test runs
    repo, other = tmp_path / "repo", tmp_path / "recipes"
    documents = own_repository(repo)
    recipes(other)

    first = trainpipe(
        proj, env, "run", "-S", f"data.source={repo}", *sum((["-S", o] for o in FAST + GATE), [])
    )
    assert first.returncode == 0, first.stderr[-3000:]
    raw = [row["path"] for row in iter_documents(proj / "data/raw", columns=["path"])]
    assert raw == documents  # no .json, .png, binary .txt, .git or __pycache__ file among them
    skipped = json.loads((proj / "data/raw/ingest.json").read_text())["skipped"]
    assert skipped == {"left_out": 2, "binary": 1, "binary_examples": ["docs/dump.txt"]}  # .json, .png
    assert "1 binary files skipped (e.g. docs/dump.txt)" in first.stdout
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    # a very different corpus: drift against the champion's data blocks it, and says how to go on
    blocked = trainpipe(proj, env, "run", "-S", f"data.source={other}")
    assert blocked.returncode == 3, blocked.stderr[-3000:]
    line = last_line(blocked)
    assert line.startswith("trainpipe run: data gate failed: ") and "Traceback" not in blocked.stderr
    assert "drift_documents (observed 120 vs champion " in line and "drift_word_distribution" in line
    forward_1 = "`trainpipe run -S publish.model_name=NEW_NAME`"
    forward_2 = "`trainpipe run -S curate.gate.drift.enabled=false`"
    assert line.endswith("set it back to true after)") and forward_1 in line and forward_2 in line
    assert "Running stage 'train'" not in blocked.stdout
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1

    # way forward 2, as the line gives it: drift off for this run, the same model line
    drift_off = trainpipe(proj, env, "run", "-S", "curate.gate.drift.enabled=false")
    assert drift_off.returncode == 0, drift_off.stderr[-3000:]
    assert "Running stage 'train'" in drift_off.stdout
    curation = json.loads((proj / "reports/curation.json").read_text())
    assert curation["drift"]["note"].startswith("drift checks are off") and curation["gate"]["passed"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")) == ["1", "2"]

    # way forward 1: a new model line, with drift back on (as the line says): the new line has no
    # champion to drift from; the data and weights are the last run's, so nothing trains again
    new_line = trainpipe(
        proj, env, "run", "-S", f"publish.model_name={NEW_LINE}", "-S", "curate.gate.drift.enabled=true"
    )
    assert new_line.returncode == 0, new_line.stderr[-3000:]
    assert "Running stage 'train'" not in new_line.stdout
    curation = json.loads((proj / "reports/curation.json").read_text())
    assert curation["drift"]["note"] == f"no models:/{NEW_LINE}@champion yet: drift not checked"
    assert str(client.get_model_version_by_alias(NEW_LINE, "champion").version) == "1"
    assert f"champion: models:/{NEW_LINE}@champion is version 1" in new_line.stdout
