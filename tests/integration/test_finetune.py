"""`trainpipe finetune` on a small project: training starts from a registered version's weights,
pinned by the parent stage and checked against their registered sha256, with lineage in the
registry, DVC and the CLI; a changed architecture, tokenizer or an unknown parent is one line."""

import json

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import BIN, MODEL, make_project, sh, trainpipe

TRAINPIPE = str(BIN / "trainpipe")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, mlflow_template_db):
    """A project trained from scratch (v1, the champion), then fine-tuned from it (v2)."""
    proj, env = make_project(tmp_path_factory.mktemp("finetune"), mlflow_template_db)
    first = sh([TRAINPIPE, "run"], proj, env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    scratch_train = json.loads((proj / "models" / "train.json").read_text())
    tuned = sh([TRAINPIPE, "finetune", "-S", "finetune.max_steps=20"], proj, env, timeout=900)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    return proj, env, scratch_train, tuned


def version_tags(env, version: str) -> dict:
    return MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version(MODEL, version).tags


def test_finetune_starts_from_the_champions_weights_and_registers_its_lineage(tuned):
    proj, env, scratch_train, run = tuned
    assert "a fine-tune of version 1" in run.stdout, run.stdout[-2000:]
    parent, child = version_tags(env, "1"), version_tags(env, "2")
    assert parent["kind"] == "train" and "parent_version" not in parent
    assert child["kind"] == "finetune"
    assert child["parent_version"] == "1"
    assert child["parent_weights_sha256"] == parent["weights_sha256"]
    # the ledger: the fine-tune's own cost beside its parent's training cost
    assert float(child["parent_cost_run_cpu_s"]) == float(parent["cost_run_cpu_s"])
    assert float(child["cost_run_cpu_s"]) > 0
    made = json.loads((proj / "models" / "train.json").read_text())
    assert made["kind"] == "finetune" and made["steps"] == 20
    assert made["parent"] == {"version": 1, "weights_sha256": parent["weights_sha256"]}
    # it starts where the parent ended: after 10 steps its loss is far below a scratch run's
    assert made["history"][0][0] == scratch_train["history"][0][0] == 10
    assert made["history"][0][1] < scratch_train["history"][0][1] - 0.5, (made["history"], scratch_train)
    # the same tokenizer as the parent: tokenize took it instead of training one
    assert (proj / "data/tokens/tokenizer.json").read_bytes() == (
        proj / "data/parent/tokenizer.json"
    ).read_bytes()


def test_the_parent_is_pinned_in_dvc_and_dvc_repro_reproduces_the_finetune(tuned):
    proj, env, _, _ = tuned
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert lock["parent"]["params"]["params.yaml"]["finetune.parent_version"] == 1
    assert any(d["path"] == "data/parent" for d in lock["train"]["deps"])
    assert json.loads((proj / "data/parent/parent.json").read_text())["version"] == 1
    weights = (proj / "models/model.safetensors").read_bytes()
    # the champion moves away: the pinned parent stays version 1, and training is exact
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    client.set_registered_model_alias(MODEL, "champion", "2" if champion == "1" else "1")
    try:
        repro = sh([str(BIN / "dvc"), "repro", "-f", "-s", "train"], proj, env)
        assert repro.returncode == 0, repro.stderr[-2000:]
        assert (proj / "models/model.safetensors").read_bytes() == weights
        status = sh([str(BIN / "dvc"), "status", "parent", "tokenize", "train"], proj, env)
        assert "up to date" in status.stdout, status.stdout
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion)


def test_status_compare_and_history_show_the_lineage(tuned):
    proj, env, _, _ = tuned
    compare = trainpipe(proj, env, "compare", "1", "2")
    assert compare.returncode == 0, compare.stderr[-2000:]
    made = next(line for line in compare.stdout.splitlines() if line.startswith("made by"))
    assert "training" in made and "fine-tune of v1" in made, made
    champion = str(
        MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(MODEL, "champion").version
    )
    status = trainpipe(proj, env, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    if champion == "2":  # the fine-tune passed the gate (more training on the same data)
        assert "a fine-tune of v1" in status.stdout, status.stdout
        assert "its parent v1's training run" in status.stdout, status.stdout
        history = trainpipe(proj, env, "history")
        assert "(v2: a fine-tune of v1)" in history.stdout, history.stdout
    else:
        assert "fine-tune" not in status.stdout.split("challenger:")[0], status.stdout


def test_a_tampered_parent_is_refused_before_training(tuned):
    proj, env, _, _ = tuned
    weights = proj / "data/parent/model.safetensors"
    original = weights.read_bytes()
    try:
        weights.unlink()  # a new file: never write through a link into DVC's cache
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        run = sh([str(BIN / "python"), "-m", "pipelines.stages.train"], proj, env)
        assert run.returncode == 2
        assert "not the registered" in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
    finally:
        weights.unlink()
        weights.write_bytes(original)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--from", "99"], "has no version 99 to fine-tune from"),
        (["--from", "@nope"], "has no alias @nope"),
        (["-S", "train.n_layer=3"], "train.n_layer 3 (the parent's: 2)"),
        (["-S", "tokenize.vocab_size=500"], "tokenize.vocab_size 500 (the parent's: 400)"),
    ],
)
def test_a_parent_that_cannot_be_fine_tuned_is_one_line_and_exit_2(tuned, args, expected):
    proj, env, _, _ = tuned
    before = (proj / "params.yaml").read_text()
    try:
        run = trainpipe(proj, env, "finetune", *args)
        assert run.returncode == 2, run.stderr[-2000:]
        last = run.stderr.strip().splitlines()[-1]
        assert expected in last, run.stderr[-2000:]
    finally:
        (proj / "params.yaml").write_text(before)
        assert sh([str(BIN / "dvc"), "checkout", "-q"], proj, env).returncode == 0  # what the failure removed
    assert (
        "Running stage 'tokenize'" not in run.stdout + run.stderr
    )  # the parent stage failed first, in seconds
