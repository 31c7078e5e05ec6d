"""publish: logging, registration, the promotion gate, promote and rollback, on a real MLflow registry."""

import itertools
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import METRICS_DOC_BYTES, SNIPPETS, copy_mlflow_db, load_pyfunc, make_model_dir, write_metrics
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import pipelines
from pipelines.adapters.registry import champion_history
from pipelines.commands import promotion
from pipelines.commands.promote import promote_version, rollback_champion
from pipelines.commands.promotion import DECISION_TAG, GATE_RUNS, decide_promotion, publish_model
from pipelines.core.bootstrap import BpbDelta, paired_bootstrap, read_bpb_delta
from pipelines.core.data import read_json, sha256_file, sha256_hex, write_documents, write_json
from pipelines.core.errors import ChampionMovedError, ConfigError, TrainpipeError
from pipelines.core.params import Params, PublishParams, ServeParams
from pipelines.stages import evaluate, tokenize
from pipelines.stages.device import use_bf16
from pipelines.stages.publish import PER_DOCUMENT_TAG

NAME = PublishParams().model_name


_seeds = itertools.count(1)


def publish(params: Params, bpb: float, sha: str = "a" * 64, doc_bpb: list | None = None, **kwargs) -> dict:
    """Publish a newly trained model (new weights each call) with the given held-out score: the
    same on each document, or doc_bpb per document."""
    make_model_dir(params.train.model_dir, seed=next(_seeds))
    write_metrics(params.evaluate.reports_dir, bpb, sha, doc_bits_per_byte=doc_bpb)
    return publish_model(params, **kwargs)


def champion_version(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def history(client: MlflowClient) -> str:
    """The versions @champion moved to, oldest first, from the per-move records."""
    return ",".join(m["to"] for m in champion_history(client, NAME))


BELOW_ZERO = math.nextafter(0.0, -1.0)  # the largest float below zero


@pytest.mark.parametrize(
    ("interval", "margin", "promoted", "verdict"),
    [
        ((-0.17, -0.2, -0.15), 0.0, True, "better, v4 becomes champion in place of v3"),
        (
            (-0.01, -0.02, BELOW_ZERO),
            0.0,
            True,
            "better, v4 becomes champion in place of v3",
        ),  # just below zero
        ((-0.01, -0.02, 0.0), 0.0, False, "not significant, champion v3 keeps serving"),  # touches zero
        ((-0.004, -0.011, 0.003), 0.0, False, "not significant, champion v3 keeps serving"),
        ((0.0, 0.0, 0.0), 0.0, False, "not significant, champion v3 keeps serving"),  # identical scores
        ((0.02, 0.01, 0.03), 0.0, False, "worse, champion v3 keeps serving"),
        ((0.02, 0.0, 0.03), 0.0, False, "not significant, champion v3 keeps serving"),
        (
            (-0.25, -0.3, -0.2),
            0.2,
            False,
            "better, but not surely by more than 0.2 bpb, champion v3 keeps serving",
        ),
        (
            (-0.25, -0.3, math.nextafter(-0.2, -1.0)),
            0.2,
            True,
            "better by more than 0.2 bpb, v4 becomes champion in place of v3",
        ),
        (
            (-0.1, -0.15, -0.05),
            0.2,
            False,
            "better, but not surely by more than 0.2 bpb, champion v3 keeps serving",
        ),
        ((-0.1, -0.3, 0.1), 0.2, False, "not significant, champion v3 keeps serving"),
    ],
)
def test_decide_promotion_promotes_only_when_the_whole_interval_is_below_minus_the_margin(
    interval, margin, promoted, verdict
):
    delta = BpbDelta(*interval, documents=90, resamples=2000, vs="3")
    got, reason = decide_promotion("4", 2.05, "3", 2.10, delta, margin)
    assert got is promoted
    assert reason == f"challenger {delta.text()}: {verdict} (2.0500 vs 2.1000 bpb on 90 documents)"


def test_decide_promotion_reason_prints_the_interval():
    delta = BpbDelta(-0.004, -0.011, 0.003, documents=90, resamples=2000, vs="4")
    assert decide_promotion("5", 2.096, "4", 2.1, delta, 0.0, "champion re-scored as the challenger was") == (
        False,
        "challenger -0.0040 bpb [-0.0110, +0.0030]: not significant, champion v4 keeps serving "
        "(2.0960 vs 2.1000 bpb on 90 documents; champion re-scored as the challenger was)",
    )
    assert decide_promotion("1", 2.0, None, None, None, 0.0) == (
        True,
        "no champion yet: v1 (2.0000 bpb) becomes champion",
    )


@pytest.fixture
def trained(mlflow_env, model_dir) -> Params:
    """A registry in tmp_path and a trained model at models/ (cwd is tmp_path)."""
    return Params()


def test_first_publish_becomes_champion_with_lineage(trained, tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    lineage = {"git_commit": "abc123", "data_version": "md5:42", "prefect_flow_run_id": "run-1"}
    result = publish(trained, 2.1, lineage=lineage)

    assert result["version"] == "1" and result["promoted"] is True
    assert result["champion_version"] == "1"
    assert result["model_uri"] == f"models:/{NAME}/1"
    assert "\n" not in result["reason"] and "champion" in result["reason"]
    client = MlflowClient()
    version = client.get_model_version(NAME, "1")
    assert set(version.aliases) == {"champion", "challenger"}
    assert {k: version.tags[k] for k in lineage} == lineage
    assert float(version.tags["val_bits_per_byte"]) == 2.1
    assert version.tags["val_set_sha256"] == "a" * 64
    assert "promoted_at" in version.tags
    assert history(client) == "1"
    assert read_bpb_delta(version.tags) is None and result["bpb_delta"] is None  # nothing to compare with
    # its per-document scores are kept in its run, for the gate of later challengers
    stored = Path(client.download_artifacts(result["run_id"], version.tags[PER_DOCUMENT_TAG], str(tmp_path)))
    assert json.loads(stored.read_text()) == read_json(tmp_path / "reports/per_document.json")
    # A run of its own in the configured experiment, finished, with metrics and dvc.lock.
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == trained.publish.experiment
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_bits_per_byte"] == 2.1
    assert "dvc.lock" in [a.path for a in client.list_artifacts(result["run_id"])]
    # The logged model lives in the run's experiment (not MLflow's default experiment 0).
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [result["run_id"]]


def test_publish_leaves_this_process_importing_the_checkouts_pipelines(trained):
    """MLflow loads the model it logs (to check the input example) and would leave its code dir,
    a `pipelines` package of only the inference modules, first on sys.path: a stage's spawned
    workers, which copy sys.path, then found pipelines.core there and not pipelines.core.errors."""
    path_before = list(sys.path)
    publish(trained, 2.1)
    assert sys.path == path_before
    checkout = Path(pipelines.__file__).parent
    project = {k: m for k, m in sys.modules.items() if k.split(".")[0] == "pipelines"}
    assert all(Path(m.__file__).is_relative_to(checkout) for m in project.values() if m.__file__)
    probe = "import pipelines.core.errors, pipelines.stages.tokenize; print(pipelines.core.errors.__file__)"
    # a child with this process's sys.path, as multiprocessing's spawn starts one
    child = f"import sys; sys.path[:] = {sys.path!r}; {probe}"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).is_relative_to(checkout)


def test_gate_promotes_only_a_better_challenger(trained):
    client = MlflowClient()
    assert publish(trained, 2.10)["promoted"] is True

    # write_metrics scores every document alike: the difference is the same on each document,
    # so every resample gives it and the interval is that one point
    worse = publish(trained, 2.30)
    assert worse["promoted"] is False and worse["champion_version"] == "1"
    assert worse["reason"] == (
        "challenger +0.2000 bpb [+0.2000, +0.2000]: worse, champion v1 keeps serving "
        "(2.3000 vs 2.1000 bpb on 12 documents)"
    )
    assert champion_version(client) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert "promoted_at" not in tags
    assert asdict(read_bpb_delta(tags)) == pytest.approx(asdict(BpbDelta(0.2, 0.2, 0.2, 12, 2000, "1")))
    assert worse["bpb_delta"] == asdict(read_bpb_delta(tags))

    same = publish(trained, 2.10)  # new weights, the same score on every document
    assert same["promoted"] is False
    assert same["reason"].startswith("challenger +0.0000 bpb [+0.0000, +0.0000]: not significant")

    better = publish(trained, 1.93)
    assert better["promoted"] is True and better["champion_version"] == "4"
    assert better["reason"] == (
        "challenger -0.1700 bpb [-0.1700, -0.1700]: better, v4 becomes champion in place of v1 "
        "(1.9300 vs 2.1000 bpb on 12 documents)"
    )
    assert champion_version(client) == "4"
    assert history(client) == "1,4"
    assert champion_history(client, NAME)[-1]["reason"] == better["reason"]  # what `history` shows
    assert client.get_model_version(NAME, "4").tags["bpb_delta_vs"] == "1"


def test_a_lower_score_that_is_not_significant_keeps_the_champion(trained):
    client = MlflowClient()
    publish(trained, 2.10)
    # lower in all, but better on some documents and worse on others: the interval spans zero
    doc_bpb = [2.5, 1.6, 2.4, 1.7, 2.3, 1.9, 2.25, 2.0, 2.35, 1.8, 2.2, 1.75]
    result = publish(trained, 0.0, doc_bpb=doc_bpb)
    bits = [r * n for r, n in zip(doc_bpb, METRICS_DOC_BYTES, strict=True)]
    expected = paired_bootstrap(
        bits, [2.1 * n for n in METRICS_DOC_BYTES], METRICS_DOC_BYTES, 2000, 0, vs="1"
    )
    assert expected.delta < 0 < expected.high and expected.low < 0  # the case this test is about
    assert result["promoted"] is False and champion_version(client) == "1"
    assert asdict(read_bpb_delta(client.get_model_version(NAME, "2").tags)) == pytest.approx(asdict(expected))
    assert result["reason"].startswith(
        f"challenger {expected.text()}: not significant, champion v1 keeps serving"
    )
    # another seed of the bootstrap, the same decision; the seed is a parameter
    trained.publish.bootstrap_seed = 7
    again = publish(trained, 0.0, doc_bpb=doc_bpb)
    assert again["promoted"] is False and again["bpb_delta"]["high"] > 0
    assert again["bpb_delta"]["delta"] == pytest.approx(expected.delta)


def test_the_same_weights_are_not_registered_twice(trained):
    client = MlflowClient()
    first = publish(trained, 2.10)
    write_metrics(trained.evaluate.reports_dir, 2.10)
    again = publish_model(trained)  # models/ unchanged: an unchanged re-run of the flow
    assert again["version"] == first["version"] == "1" and again["promoted"] is False
    assert "already registered as v1" in again["reason"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert publish(trained, 2.0)["version"] == "2"  # new weights register as usual


def test_gate_requires_the_margin(trained):
    trained.publish.min_improvement_bpb = 0.2
    publish(trained, 2.10)
    short = publish(trained, 2.00)  # surely better, but by less than the margin
    assert short["promoted"] is False
    assert short["reason"].startswith(
        "challenger -0.1000 bpb [-0.1000, -0.1000]: better, but not surely by more than 0.2 bpb, "
        "champion v1 keeps serving"
    )
    assert publish(trained, 1.85)["promoted"] is True
    assert champion_version(MlflowClient()) == "3"


def during_smoke_test_of(monkeypatch, version: str, action) -> None:
    """Run action() each time the gate's move smoke-tests `version`: another writer moving
    @champion in the minutes between the gate's read of it and its move."""
    real = promotion.smoke_test

    def smoke_test(client, name, v, timeout_s):
        result = real(client, name, v, timeout_s)
        if str(v) == version:
            action()
        return result

    monkeypatch.setattr(promotion, "smoke_test", smoke_test)


@pytest.mark.parametrize(("other_bpb", "promoted"), [(1.50, False), (2.00, True)])
def test_a_champion_moved_under_the_gate_is_gated_against_again(
    trained, tmp_path, monkeypatch, other_bpb, promoted
):
    client = MlflowClient()
    publish(trained, 2.10)  # v1 champion
    other = Params()  # a second workspace publishing to the same registry
    other.train.model_dir = str(tmp_path / "other" / "models")
    other.evaluate.reports_dir = str(tmp_path / "other" / "reports")
    moved = []
    # v2 passes the gate against v1; while it is smoke-tested the other workspace publishes v3,
    # which passes against v1 too and becomes champion. v2 must then be gated against v3.
    during_smoke_test_of(monkeypatch, "2", lambda: moved or moved.append(publish(other, other_bpb)))
    result = publish(trained, 1.90)

    assert moved[0]["version"] == "3" and moved[0]["promoted"] is True
    assert result["promoted"] is promoted
    tags = client.get_model_version(NAME, "2").tags
    assert tags["bpb_delta_vs"] == "3"  # the interval recorded is against the champion it replaced or kept
    assert (
        tags[DECISION_TAG] == result["reason"] and "v3" in result["reason"] and "v1" not in result["reason"]
    )
    if promoted:
        assert result["reason"].startswith(
            "challenger -0.1000 bpb [-0.1000, -0.1000]: better, v2 becomes champion in place of v3 "
        )
        assert champion_version(client) == "2" and history(client) == "1,3,2"
        last = champion_history(client, NAME)[-1]
        assert (last["from"], last["to"], last["reason"]) == ("3", "2", result["reason"])
    else:
        assert result["reason"].startswith("challenger +0.4000 bpb [+0.4000, +0.4000]: worse, champion v3")
        assert result["champion_version"] == "3"
        assert champion_version(client) == "3" and history(client) == "1,3"
        assert "promoted_at" not in tags


def test_a_champion_that_keeps_moving_under_the_gate_fails_the_publish_in_one_line(trained, monkeypatch):
    client = MlflowClient()
    publish(trained, 2.10)  # v1 champion
    publish(trained, 2.30)  # v2, worse: not champion
    # each time v3 is about to replace the champion it was gated against, someone moves it by hand
    hand_moves = itertools.cycle(["2", "1"])
    during_smoke_test_of(monkeypatch, "3", lambda: promote_version(trained, next(hand_moves)))
    with pytest.raises(ChampionMovedError) as info:
        publish(trained, 1.90)
    message = str(info.value)
    assert "\n" not in message and f"({GATE_RUNS} times; last compared with v1, then found v2)" in message
    assert message.endswith("v3 did not become champion; run `trainpipe publish` again")
    assert champion_version(client) == "2" and history(client) == "1,2,1,2"  # only the hand moves
    assert DECISION_TAG not in client.get_model_version(NAME, "3").tags  # a re-run decides


def test_rollback_does_not_roll_back_a_champion_it_did_not_see(trained, monkeypatch):
    client = MlflowClient()
    publish(trained, 2.10)  # v1
    publish(trained, 1.90)  # v2 champion
    publish(trained, 2.50)  # v3, not champion
    # rollback chose v1 because v2 served; while v1 is smoke-tested a person promotes v3
    during_smoke_test_of(monkeypatch, "1", lambda: promote_version(trained, 3))
    with pytest.raises(ChampionMovedError, match=r"moved from v2 to v3 while v1 was about to replace it"):
        rollback_champion(trained)
    assert champion_version(client) == "3" and history(client) == "1,2,3"
    assert "rolled_back_at" not in client.get_model_version(NAME, "2").tags


def test_publish_logs_into_a_given_run_and_leaves_it_open(trained):
    client = MlflowClient()
    experiment_id = client.create_experiment("flow-runs")
    run_id = client.create_run(experiment_id).info.run_id
    result = publish(trained, 2.0, run_id=run_id)
    assert result["run_id"] == run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # the flow ends its own run
    assert client.get_model_version(NAME, "1").run_id == run_id
    assert [m.source_run_id for m in client.search_logged_models(experiment_ids=[experiment_id])] == [run_id]


def test_publish_uses_the_active_run(trained):
    with mlflow.start_run() as run:
        result = publish(trained, 2.0)
        assert mlflow.active_run().info.run_id == run.info.run_id
    assert result["run_id"] == run.info.run_id


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("models/model.safetensors", "no trained model at models/"),
        ("reports/metrics.json", "trainpipe evaluate"),
    ],
)
def test_missing_inputs_are_one_line_errors(tmp_path, monkeypatch, remove, expected):
    monkeypatch.chdir(tmp_path)
    make_model_dir(tmp_path / "models")
    write_metrics(tmp_path / "reports", 2.0)
    (tmp_path / remove).unlink()
    with pytest.raises(TrainpipeError) as info:
        publish_model(Params())
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_model_dir_names_the_stage_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no trained model at models/ .*run `trainpipe train` first"):
        publish_model(Params())


def test_promote_and_rollback_move_the_alias_and_record_history(trained):
    client = MlflowClient()
    publish(trained, 2.1)
    publish(trained, 1.9)  # v2 champion
    publish(trained, 2.5)  # v3 challenger only

    back = rollback_champion(trained)
    assert (back["version"], back["previous_champion"]) == ("1", "2")
    assert champion_version(client) == "1" and history(client) == "1,2,1"
    assert "rolled_back_at" in client.get_model_version(NAME, "2").tags
    # v2 was rolled back, so there is nothing earlier than v1 to return to.
    with pytest.raises(ConfigError, match="no earlier champion"):
        rollback_champion(trained)

    promoted = promote_version(trained, 3)
    assert promoted["promoted"] is True and promoted["previous_champion"] == "1"
    assert champion_version(client) == "3" and history(client) == "1,2,1,3"
    assert "promoted_at" in client.get_model_version(NAME, "3").tags
    assert promote_version(trained, "3")["promoted"] is False  # already champion: no new entry
    assert history(client) == "1,2,1,3"

    assert rollback_champion(trained)["version"] == "1"
    promote_version(trained, 2)  # promoting by hand clears the rolled-back mark
    assert "rolled_back_at" not in client.get_model_version(NAME, "2").tags
    assert rollback_champion(trained)["version"] == "1"


def test_promote_unknown_version_and_rollback_without_champion_are_errors(trained):
    with pytest.raises(ConfigError, match="no champion registered"):
        rollback_champion(trained)
    publish(trained, 2.0)
    with pytest.raises(ConfigError) as info:
        promote_version(trained, 99)
    assert str(info.value) == f"model {NAME} has no version 99"
    with pytest.raises(ConfigError, match="no earlier champion"):
        rollback_champion(trained)


def test_metrics_of_other_weights_are_refused_in_one_line(trained, tmp_path):
    client = MlflowClient()
    publish(trained, 2.1)
    scored_sha = sha256_file(tmp_path / "models/model.safetensors")
    make_model_dir(tmp_path / "models", seed=99)  # what `trainpipe train` leaves: new weights, old metrics
    new_sha = sha256_file(tmp_path / "models/model.safetensors")
    with pytest.raises(ConfigError) as info:
        publish_model(trained)
    assert str(info.value) == (
        f"reports/evaluation.json scored other weights (sha256 {scored_sha[:12]}) than "
        f"models/model.safetensors (sha256 {new_sha[:12]}): run `trainpipe evaluate` first"
    )
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    # metrics written before weights were named are refused too, not trusted
    evaluation = read_json(tmp_path / "reports/evaluation.json")
    del evaluation["weights_sha256"]
    write_json(tmp_path / "reports/evaluation.json", evaluation)
    with pytest.raises(ConfigError, match=r"has no 'weights_sha256': run `trainpipe evaluate` again"):
        publish_model(trained)


def test_metrics_of_other_scoring_code_are_refused(trained, tmp_path):
    write_metrics(tmp_path / "reports", 2.0)
    evaluation = read_json(tmp_path / "reports/evaluation.json")
    write_json(tmp_path / "reports/evaluation.json", {**evaluation, "scoring_code_sha256": "0" * 64})
    with pytest.raises(ConfigError) as info:
        publish_model(trained)
    assert str(info.value) == (
        "reports/evaluation.json was scored by other code than this checkout's score_texts and "
        "pipelines/core/model.py: run `trainpipe evaluate` first"
    )


# --- scores compared only under equal score keys, with the real evaluate stage on tiny data ---


@pytest.fixture
def corpus(trained) -> Params:
    """A curated corpus of 12 snippets, tokenized: evaluate runs for real on its validation split."""
    trained.tokenize.val_fraction = 0.45
    trained.evaluate.sample_tokens = 4
    write_corpus(trained, 12)
    return trained


def write_corpus(params: Params, n: int) -> None:
    texts = [SNIPPETS[i % len(SNIPPETS)] + f"# module {i}\n" for i in range(n)]
    docs = [
        {"path": f"pkg/mod{i}.py", "text": t, "sha256": sha256_hex(t), "n_bytes": len(t.encode())}
        for i, t in enumerate(texts)
    ]
    write_documents(docs, params.data.curated_dir)
    tokenize.run(params)


def evaluate_new_model(
    params: Params, tmp_path, tag_bpb: float | None = None, seed: int | None = None, **model
) -> tuple[dict, Path]:
    """New weights in models/, scored by the real evaluate stage: (metrics, a copy of the model dir).
    tag_bpb scales each document's bits so that the stored scores say tag_bpb in all: a score no
    re-score gives, so that it shows whether a champion's stored scores were used or re-scored."""
    make_model_dir(params.train.model_dir, seed=next(_seeds) if seed is None else seed, **model)
    write_json(Path(params.train.model_dir) / "train.json", {"history": []})
    metrics = evaluate.evaluate_model(params)
    if tag_bpb is not None:
        path = Path(params.evaluate.reports_dir) / evaluate.PER_DOCUMENT_FILE
        scores = read_json(path)
        for doc in scores["documents"]:
            doc["bits"] *= tag_bpb / metrics["val_bits_per_byte"]
        write_json(path, scores)
        metrics["val_bits_per_byte"] = tag_bpb
        metrics_path = Path(params.evaluate.reports_dir) / evaluate.METRICS_FILE
        write_json(metrics_path, {**read_json(metrics_path), "val_bits_per_byte": tag_bpb})
    return metrics, shutil.copytree(params.train.model_dir, tmp_path / f"kept-{next(_seeds)}")


def with_settings(params: Params, settings: dict) -> tuple[Params, dict]:
    """(params with the "section.field" settings, make_model_dir's keyword arguments)."""
    params = params.model_copy(deep=True)
    model = {k: v for k, v in settings.items() if "." not in k}
    for key, value in settings.items():
        if "." in key:
            section, field = key.split(".")
            setattr(getattr(params, section), field, value)
    return params, model


def doc_bits(params: Params) -> tuple[list[float], list[int]]:
    """(bits, bytes) per document, from the reports/per_document.json evaluate wrote last."""
    scores = read_json(Path(params.evaluate.reports_dir) / evaluate.PER_DOCUMENT_FILE)["documents"]
    return [d["bits"] for d in scores], [d["bytes"] for d in scores]


def bootstrap(params: Params, bits, champion_bits, doc_bytes, champion: str) -> BpbDelta:
    return paired_bootstrap(
        bits,
        champion_bits,
        doc_bytes,
        params.publish.bootstrap_resamples,
        params.publish.bootstrap_seed,
        vs=champion,
    )


def version_delta(version: str) -> dict:
    return asdict(read_bpb_delta(MlflowClient().get_model_version(NAME, version).tags))


def test_champion_with_the_same_score_key_is_not_rescored(corpus, tmp_path):
    evaluate_new_model(corpus, tmp_path, tag_bpb=9.0)
    publish_model(corpus)
    champion_bits, _ = doc_bits(corpus)
    metrics, _ = evaluate_new_model(corpus, tmp_path, tag_bpb=8.5)
    second = publish_model(corpus)
    # the same key: the champion's per-document scores, stored with v1, are paired, not re-scored
    assert second["champion_val_bits_per_byte"] == pytest.approx(9.0, rel=1e-12)
    bits, doc_bytes = doc_bits(corpus)
    expected = bootstrap(corpus, bits, champion_bits, doc_bytes, "1")
    assert second["bpb_delta"] == pytest.approx(asdict(expected)) == version_delta("2")
    assert second["promoted"] is (expected.high < 0)
    assert second["reason"].startswith(f"challenger {expected.text()}: ")
    assert second["reason"].endswith(f"(8.5000 vs 9.0000 bpb on {len(bits)} documents)")
    tags = MlflowClient().get_model_version(NAME, "2").tags
    named = ("score_key", "val_set_sha256", "scoring_code_sha256", "weights_sha256")
    assert {k: tags[k] for k in named} == {k: metrics[k] for k in named}
    bf16 = json.dumps(use_bf16(corpus.train.bf16, torch.device("cpu")))
    assert (tags["score_context"], tags["score_max_tokens"], tags["score_bf16"]) == ("32", "null", bf16)
    assert tags["val_bits_per_byte"] == "8.5"


def test_champion_published_before_per_document_scores_is_rescored(corpus, tmp_path):
    _, v1 = evaluate_new_model(corpus, tmp_path, tag_bpb=9.0)
    publish_model(corpus)
    MlflowClient().delete_model_version_tag(NAME, "1", PER_DOCUMENT_TAG)  # as a version of before
    evaluate_new_model(corpus, tmp_path)
    result = publish_model(corpus)
    bits, doc_bytes = doc_bits(corpus)
    bf16 = use_bf16(corpus.train.bf16, torch.device("cpu"))
    rescored = evaluate.score_saved_model(v1, evaluate.validation_texts(corpus), bf16=bf16)
    assert result["champion_val_bits_per_byte"] == pytest.approx(rescored["nll_bits"] / rescored["bytes"])
    expected = bootstrap(corpus, bits, rescored["doc_bits"], doc_bytes, "1")
    assert result["bpb_delta"] == pytest.approx(asdict(expected))
    assert result["promoted"] is (expected.high < 0)
    assert result["reason"].endswith(
        "; champion re-scored as the challenger was: it has no per-document scores (published before them))"
    )


def test_champion_scored_on_another_validation_set_is_rescored(corpus, tmp_path):
    _, v1 = evaluate_new_model(corpus, tmp_path, tag_bpb=9.0)  # v1's scores: 9.0 bpb on its documents
    publish_model(corpus)
    write_corpus(corpus, 24)  # the corpus grows, and its validation set with it
    bf16 = use_bf16(corpus.train.bf16, torch.device("cpu"))
    actual = evaluate.score_model_dir(v1, evaluate.validation_texts(corpus), bf16=bf16)

    evaluate_new_model(corpus, tmp_path, tag_bpb=actual + 0.5)
    stale_winner = publish_model(corpus)
    assert stale_winner["promoted"] is False, "compared with the stale 9.0 instead of re-scoring"
    assert stale_winner["champion_val_bits_per_byte"] == pytest.approx(actual, rel=1e-9)
    assert stale_winner["reason"].startswith("challenger +0.5")
    assert stale_winner["reason"].endswith(
        "; champion re-scored as the challenger was: it was scored with another validation set)"
    )
    evaluate_new_model(corpus, tmp_path, tag_bpb=actual - 0.5)
    assert publish_model(corpus)["promoted"] is True


@pytest.mark.parametrize(
    ("champion_settings", "challenger_settings", "differs"),
    [
        ({"train.bf16": "off"}, {"train.bf16": "on"}, "precision"),
        ({"train.bf16": "on"}, {"train.bf16": "off"}, "precision"),
        ({"evaluate.max_tokens": None}, {"evaluate.max_tokens": 40}, "token cap"),
        ({"block_size": 64}, {"block_size": 32}, "context"),  # the champion scored at the shorter context
    ],
)
def test_champion_scored_otherwise_is_rescored_as_the_challenger_was(
    corpus, tmp_path, champion_settings, challenger_settings, differs
):
    params, model = with_settings(corpus, champion_settings)
    own, v1 = evaluate_new_model(params, tmp_path, tag_bpb=9.0, **model)
    publish_model(params)
    params, model = with_settings(corpus, challenger_settings)
    metrics, _ = evaluate_new_model(params, tmp_path, **model)
    result = publish_model(params)

    texts = evaluate.validation_texts(params)
    as_challenger = evaluate.score_saved_model(
        v1,
        texts,
        bf16=metrics["score_bf16"],
        max_tokens=metrics["score_max_tokens"],
        context=metrics["score_context"],
    )
    bits, doc_bytes = doc_bits(params)
    assert as_challenger["doc_bytes"] == doc_bytes  # the very documents the challenger was scored on
    champion_bpb = as_challenger["nll_bits"] / as_challenger["bytes"]
    assert result["champion_val_bits_per_byte"] == pytest.approx(champion_bpb, rel=1e-9)
    expected = bootstrap(params, bits, as_challenger["doc_bits"], doc_bytes, "1")
    assert result["bpb_delta"] == pytest.approx(asdict(expected)) == version_delta("2")
    assert result["promoted"] is (expected.high < 0)
    assert result["reason"].endswith(
        f"; champion re-scored as the challenger was: it was scored with another {differs})"
    )
    # The champion's own setting gives another score, so a re-score in it would have been caught.
    as_champion = evaluate.score_model_dir(
        v1, texts, bf16=own["score_bf16"], max_tokens=own["score_max_tokens"], context=own["score_context"]
    )
    assert abs(as_champion - champion_bpb) > 1e-6


def test_champion_with_a_shorter_context_scores_both_at_its_context(corpus, tmp_path):
    _, v1 = evaluate_new_model(corpus, tmp_path, tag_bpb=9.0, block_size=32)
    publish_model(corpus)
    metrics, v2 = evaluate_new_model(corpus, tmp_path, block_size=64)
    result = publish_model(corpus)

    texts, bf16 = evaluate.validation_texts(corpus), metrics["score_bf16"]
    champion = evaluate.score_saved_model(v1, texts, bf16=bf16, context=32)
    challenger = evaluate.score_saved_model(v2, texts, bf16=bf16, context=32)
    champion_bpb = champion["nll_bits"] / champion["bytes"]
    challenger_bpb = challenger["nll_bits"] / challenger["bytes"]
    assert abs(challenger_bpb - metrics["val_bits_per_byte"]) > 1e-6  # its own score, at 64, is not compared
    assert result["champion_val_bits_per_byte"] == pytest.approx(champion_bpb, rel=1e-9)
    expected = bootstrap(corpus, challenger["doc_bits"], champion["doc_bits"], champion["doc_bytes"], "1")
    assert result["bpb_delta"] == pytest.approx(asdict(expected))
    assert result["promoted"] is (expected.high < 0)
    assert f"({challenger_bpb:.4f} vs {champion_bpb:.4f} bpb" in result["reason"]
    assert result["reason"].endswith(
        "; champion re-scored as the challenger was: it was scored with another context; both scored at "
        "the champion's context of 32 tokens, not the challenger's 64)"
    )


def test_models_that_differ_only_in_seed_flip_the_champion_only_when_their_interval_excludes_zero(
    corpus, tmp_path
):
    """Untrained models of one config, seeds apart, scored by the real evaluate stage on 22
    documents: their bits per byte differ a little, and mostly not beyond what the choice of
    documents explains. Only a challenger whose whole interval lies below zero becomes champion."""
    write_corpus(corpus, 40)
    client = MlflowClient()
    evaluate_new_model(corpus, tmp_path, seed=1)
    publish_model(corpus)
    outcomes = []
    for seed in (3, 4, 5, 2):
        before = champion_version(client)
        evaluate_new_model(corpus, tmp_path, seed=seed)
        result = publish_model(corpus)
        delta = read_bpb_delta(client.get_model_version(NAME, result["version"]).tags)
        assert asdict(delta) == result["bpb_delta"] and delta.vs == before
        assert result["promoted"] is (delta.high < -corpus.publish.min_improvement_bpb), (seed, delta)
        assert champion_version(client) == (result["version"] if result["promoted"] else before)
        assert result["reason"].startswith(f"challenger {delta.text()}: ")
        outcomes.append((delta.delta < 0, result["promoted"]))
    # both cases occur here: a lower score whose interval spans zero keeps the champion, and one
    # whose interval lies below zero replaces it
    assert (True, False) in outcomes and (True, True) in outcomes, outcomes
    promoted = [str(i + 2) for i, (_, up) in enumerate(outcomes) if up]
    assert history(client) == ",".join(["1", *promoted])


def test_a_rescore_needs_the_documents_the_challenger_was_scored_on(corpus, tmp_path):
    evaluate_new_model(corpus, tmp_path, block_size=64)
    publish_model(corpus)
    evaluate_new_model(corpus, tmp_path)  # another context: the champion must be re-scored
    write_corpus(corpus, 24)  # ... but the curated data changed after evaluate
    with pytest.raises(ConfigError) as info:
        publish_model(corpus)
    assert str(info.value) == (
        "reports/evaluation.json was scored on another validation set than data/curated/ holds now: "
        "run `trainpipe evaluate` first"
    )
    # refused before anything was registered
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{NAME}'")] == ["1"]


# --- the logged model, loaded back through the registry ------------------------------------


@pytest.fixture(scope="module")
def champion_model(tmp_path_factory, mlflow_template_db):
    """One published champion (block_size 64; limits: 100 prompt chars, 40 new tokens), loaded with pyfunc."""
    root = tmp_path_factory.mktemp("champion")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.chdir(root)
        params = Params(serve=ServeParams(max_prompt_chars=100, max_new_tokens_limit=40))
        make_model_dir(params.train.model_dir, block_size=64)
        write_metrics(params.evaluate.reports_dir, 2.0)
        publish_model(params)
        yield load_pyfunc(f"models:/{NAME}@champion")


def test_loaded_model_completes_and_is_seeded(champion_model):
    prompt = pd.DataFrame({"prompt": ["def fibonacci(n):", "import os\n"]})
    out = champion_model.predict(prompt, params={"max_new_tokens": 12, "seed": 3})
    assert list(out.columns) == ["completion", "model_version"] and len(out) == 2
    assert out["model_version"].tolist() == [None, None]  # loaded without a model_config
    assert all(isinstance(c, str) and c for c in out["completion"])
    again = champion_model.predict(prompt, params={"max_new_tokens": 12, "seed": 3})
    assert again["completion"].tolist() == out["completion"].tolist()
    # Defaults from the signature; max_new_tokens is capped at the model's limit (40 < 64).
    assert champion_model.metadata.get_params_schema().to_dict()[0] == {
        "name": "max_new_tokens", "type": "long", "default": 40, "shape": None,
    }  # fmt: skip
    assert isinstance(champion_model.predict(pd.DataFrame({"prompt": ["x = "]}))["completion"][0], str)


def test_loaded_model_truncates_long_prompts(champion_model):
    # ~100 chars of code is more than block_size (64) - max_new_tokens (40) tokens for this tokenizer:
    # the prompt's start is cropped so that prompt and completion fit the context.
    prompt = "for i in range(10):\n    print(i * i)\n" * 2 + "def list_files(path):\n"
    assert len(prompt) <= 100
    out = champion_model.predict(pd.DataFrame({"prompt": [prompt[:100]]}), params={"max_new_tokens": 40})
    assert isinstance(out["completion"][0], str)


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        ({"text": ["x"]}, {}, "prompt"),
        ({"prompt": [""]}, {}, "empty"),
        ({"prompt": ["x" * 101]}, {}, "limit is 100"),
        ({"prompt": ["x"]}, {"max_new_tokens": 0}, "between 1 and 40"),
        ({"prompt": ["x"]}, {"max_new_tokens": 41}, "between 1 and 40"),
        ({"prompt": ["x"]}, {"temperature": -1.0}, "temperature"),
        ({"prompt": ["x"]}, {"temperature": 2.5}, "temperature"),
        ({"prompt": ["x"]}, {"top_k": -1}, "top_k"),
    ],
)
def test_loaded_model_rejects_bad_requests(champion_model, frame, params, message):
    with pytest.raises(MlflowException, match=message) as info:
        champion_model.predict(pd.DataFrame(frame), params=params)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
