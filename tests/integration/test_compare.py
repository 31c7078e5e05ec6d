"""`trainpipe compare` on a real MLflow registry (SQLite in tmp_path): two versions published by
the project's own publish code into runs that carry what a flow run logs (params, cost metrics,
dvc.lock, lineage), read back side by side; the default pair; one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from conftest import copy_mlflow_db, free_port, make_model_dir, write_metrics
from mlflow import MlflowClient

from pipelines.cli import main
from pipelines.commands.compare import compare, format_comparison
from pipelines.core.errors import ConfigError
from pipelines.core.ledger import format_usd, price
from pipelines.core.params import Params, PublishParams, flatten, load_params

NAME = PublishParams().model_name
TRAINPIPE = str(Path(sys.executable).parent / "trainpipe")
COMMIT_1, COMMIT_2 = "a" * 40, "b" * 40 + "-dirty"


def dvc_lock(tokens_md5: str, models_md5: str) -> dict:
    """A dvc.lock as a flow run leaves it: the data stages' and train's outputs with their md5."""

    def outs(path: str, md5: str) -> dict:
        return {"outs": [{"path": path, "hash": "md5", "md5": md5, "size": 1, "nfiles": 1}]}

    return {
        "schema": "2.0",
        "stages": {
            "ingest": outs("data/raw", "1" * 32 + ".dir"),
            "curate": outs("data/curated", "2" * 32 + ".dir"),
            "tokenize": outs("data/tokens", tokens_md5),
            "train": outs("models", models_md5),
        },
    }


def flow_run_publish(client: MlflowClient, tmp_path: Path, seed: int, bpb: float, overrides: list, lock: dict, commit: str, cpu_s: float) -> dict:  # fmt: skip
    """A run as the flow leaves it before publish (its params, cost metrics, the workspace's
    dvc.lock), then the project's publish of newly trained weights into it."""
    params = load_params(tmp_path / "params.yaml", overrides)
    experiment = client.get_experiment_by_name(params.publish.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(params.publish.experiment)
    )
    run_id = client.create_run(experiment_id, run_name=f"flow-{seed}").info.run_id
    for key, value in flatten(params).items():
        client.log_param(run_id, key, str(value))
    ledger = {"cost.cpu_s": cpu_s, "cost.gpu_s": 0.0, "cost.device_s": cpu_s, "cost.train_flops": 1e12 * seed}
    ledger["cost.usd"] = price(cpu_s, 0.0, params.cost)
    for key, value in ledger.items():
        client.log_metric(run_id, key, value)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    from pipelines.commands.promotion import publish_model

    make_model_dir(params.train.model_dir, seed=seed)
    write_metrics(params.evaluate.reports_dir, bpb)
    lineage = {"git_commit": commit, "data_version": lock["stages"]["tokenize"]["outs"][0]["md5"]}
    published = publish_model(params, lineage=lineage, run_id=run_id)
    client.set_terminated(run_id, "FINISHED")
    return {**published, "run_id": run_id, "experiment_id": experiment_id}


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory, mlflow_template_db) -> dict:
    """v1 (the champion, 60 steps) and v2 (3 steps, worse: @challenger, its gate measured +0.5
    bpb against v1); the same raw and curated data, tokens of another vocabulary. Published once
    for the module (the champion's smoke test is a fresh process): each test gets a copy."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", copy_mlflow_db(mlflow_template_db, root))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(root)
        (root / "params.yaml").write_text("")
        client = MlflowClient()
        v1 = flow_run_publish(client, root, 1, 2.0, ["train.max_steps=60"], dvc_lock("3" * 32 + ".dir", "4" * 32 + ".dir"), COMMIT_1, 100.0)  # fmt: skip
        v2 = flow_run_publish(client, root, 2, 2.5, ["train.max_steps=3", "tokenize.vocab_size=400"], dvc_lock("5" * 32 + ".dir", "6" * 32 + ".dir"), COMMIT_2, 36.0)  # fmt: skip
    assert (v1["version"], v2["version"], v2["champion_version"]) == ("1", "2", "1")
    return {"db": root / "mlflow.db", "v1": v1, "v2": v2}


@pytest.fixture
def two_versions(registry_db, tmp_path, monkeypatch) -> dict:
    """A copy of the module's registry (its artifacts stay where they were logged), cwd tmp_path."""
    shutil.copy(registry_db["db"], tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    return {**registry_db, "client": MlflowClient()}


def compare_url(runs: list[str], experiments: list[str], base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's compare page, as its web app builds the link (getCompareRunPageRoute)."""
    return f"{base}/#/compare-runs?runs={json.dumps(runs)}&experiments={json.dumps(experiments)}"


def shown(capsys, *args: str) -> list[str]:
    main(["compare", *args])
    return capsys.readouterr().out.splitlines()


def row(lines: list[str], label: str) -> list[str]:
    """The cells of the row whose label is `label` (cells are at least two spaces apart)."""
    found = [line for line in lines if line[:40].rstrip() == label]
    assert len(found) == 1, (label, lines)
    return [cell.strip() for cell in [found[0][42:74], found[0][76:108], found[0][110:]]]


def wide(lines: list[str], label: str) -> str:
    """A text row across both value columns, its wrapped lines joined."""
    start = next(i for i, line in enumerate(lines) if line[:40].rstrip() == label)
    more = [line[42:] for line in lines[start + 1 :]]
    more = more[
        : next((i for i, line in enumerate(more) if not lines[start + 1 + i].startswith(" " * 42)), len(more))
    ]
    return " ".join([lines[start][42:], *more])


def test_champion_against_challenger_side_by_side(two_versions, capsys):
    v1, v2 = two_versions["v1"], two_versions["v2"]
    lines = shown(capsys)
    url, start = lines[-2:]
    assert lines[0] == f"model {NAME}: A is v1 @champion, B is v2 @challenger"
    # the side-by-side fits 120 columns; the URL and the command are kept whole
    assert all(len(line) <= 120 for line in lines[:-2]), [line for line in lines if len(line) > 120]
    assert row(lines, "run") == [v1["run_id"], v2["run_id"], ""]
    # the params that differ, and only those
    assert "params that differ (2 of " in "\n".join(lines)
    assert row(lines, "train.max_steps") == ["60", "3", ""]
    assert row(lines, "tokenize.vocab_size") == ["4096", "400", ""]
    assert not any(line.startswith("train.lr ") for line in lines)
    # metrics, headline first, with B - A
    metrics = lines.index(next(line for line in lines if line.startswith("metrics (last logged value)")))
    assert lines[metrics + 1].startswith("val_bits_per_byte")
    assert row(lines, "val_bits_per_byte") == ["2.0000", "2.5000", "+0.5000"]
    assert row(lines, "gzip_bits_per_byte") == ["1.8700", "1.8700", "+0.0000"]
    # the gate's interval, as v2's publish measured it against v1 (flat scores: zero width)
    assert (
        wide(lines, "bits per byte, B - A")
        == "+0.5000 bpb [+0.5000, +0.5000] from v2's gate against v1, on 12 documents"
    )
    assert wide(lines, "v1 decision") == "no champion yet: v1 (2.0000 bpb) becomes champion"
    assert "worse, champion v1 keeps serving" in wide(lines, "v2 decision")
    # data versions: the same raw and curated data, other tokens
    assert row(lines, "data/raw") == ["111111111111", "111111111111", "same"]
    assert row(lines, "data/curated") == ["222222222222", "222222222222", "same"]
    assert row(lines, "data/tokens") == ["333333333333", "555555555555", "differs"]
    assert wide(lines, "data") == "different data: data/tokens differ"
    assert row(lines, "code (git commit)") == ["aaaaaaaaaaaa", "bbbbbbbbbbbb-dirty", "differs"]
    # cost, priced at params.yaml's rates as status prices it
    rates = Params().cost
    assert row(lines, "training run") == [
        format_usd(price(100.0, 0.0, rates)),
        format_usd(price(36.0, 0.0, rates)),
        "-" + format_usd(price(64.0, 0.0, rates)),
    ]
    assert row(lines, "runs counted") == ["1 since the first run", "1 since v1", ""]
    assert row(lines, "training FLOPs") == ["1e+12", "2e+12", ""]
    # the MLflow UI's own compare page for the two runs, on the default `mlflow ui` port
    assert lines[-3] == "MLflow UI, the two runs side by side:"
    assert unquote(url) == compare_url([v1["run_id"], v2["run_id"]], [v1["experiment_id"]]).replace(" ", "")
    assert " " not in url and '"' not in url  # percent-encoded: a terminal links it whole
    assert start == f"(start the UI first: mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']})"


def test_named_the_other_way_round_the_interval_is_read_as_b_minus_a(two_versions, capsys):
    found = compare(Params(), "v2", "@champion")
    assert (found["a"]["label"], found["b"]["label"]) == ("v2 @challenger", "v1 @champion")
    interval = found["gate"]["b_minus_a"]
    assert (interval["delta"], interval["low"], interval["high"]) == (-0.5, -0.5, -0.5)
    assert (interval["measured_by"], interval["against"]) == ("v2", "v1")
    assert [m["diff"] for m in found["metrics"] if m["key"] == "val_bits_per_byte"] == [-0.5]
    main(["compare", "--json", "2", "1"])  # the same as JSON, with the hashes whole
    record = json.loads(capsys.readouterr().out)
    assert record["gate"]["b_minus_a"] == interval
    assert {r["key"]: r["a"] for r in record["data"]["rows"]}["data/tokens"] == "5" * 32 + ".dir"


def test_run_ids_name_their_versions_and_one_argument_is_compared_with_the_champion(two_versions):
    v1, v2 = two_versions["v1"], two_versions["v2"]
    by_runs = compare(Params(), v1["run_id"], v2["run_id"])
    by_versions = compare(Params(), "1", "challenger")
    for key in ("params", "metrics", "gate", "data", "code", "cost", "ui"):
        assert by_runs[key] == by_versions[key], key
    one = compare(Params(), "2")
    assert (one["a"]["label"], one["b"]["label"]) == ("v1 @champion", "v2 @challenger")
    # a run that registered no version is compared as a run
    client = two_versions["client"]
    bare = client.create_run(v1["experiment_id"], run_name="bare").info.run_id
    client.log_param(bare, "train.max_steps", "7")
    found = compare(Params(), "@champion", bare)
    assert found["b"]["label"] == f"run {bare[:8]}" and found["b"]["version"] is None
    assert found["gate"]["b_minus_a"] is None and found["data"]["verdict"] == (
        f"unknown: no DVC record of run {bare[:8]} (a run that logged no dvc.lock)"
    )
    lines = format_comparison(found)
    assert "no interval: neither version's gate measured it against the other" in "\n".join(lines)
    assert f"no cost ledger for run {bare[:8]}" in "\n".join(lines)


def test_default_b_when_the_challenger_is_the_champion_itself(two_versions, capsys):
    client = two_versions["client"]
    client.set_registered_model_alias(NAME, "challenger", "1")  # as a promoting publish leaves it
    lines = shown(capsys)
    assert lines[0] == f"model {NAME}: A is v1 @champion @challenger, B is v2"
    assert lines[1] == "(@challenger is the champion itself: B is v2, the newest other version)"


def trainpipe(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TRAINPIPE, "compare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_what_does_not_exist_is_one_line(two_versions, tmp_path):
    missing_run = "0" * 32
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cases = [
        ("1", "@staging", f"model {NAME} has no alias @staging (its aliases: @challenger, @champion)"),
        ("1", missing_run, f"no MLflow run {missing_run} in {uri}"),
        ("v0", "2", f"model {NAME} has no version 0 (its versions: v1 to v2)"),
    ]
    for a, b, reason in cases:
        with pytest.raises(ConfigError) as info:
            compare(Params(), a, b)
        assert str(info.value) == reason
    with pytest.raises(ConfigError) as info:
        compare(Params(publish={"model_name": "other"}))
    assert str(info.value) == f"no registered model other in {uri}: nothing was published yet"
    # and as the command says it: one line, exit code 2
    result = trainpipe(tmp_path, "9")
    assert result.returncode == 2
    assert last_line(result) == f"trainpipe compare: model {NAME} has no version 9 (its versions: v1 to v2)"


def test_no_champion_or_nothing_to_compare_with_is_one_line(two_versions, tmp_path):
    client = two_versions["client"]
    client.delete_registered_model_alias(NAME, "challenger")
    client.delete_model_version(NAME, "2")
    with pytest.raises(ConfigError) as info:
        compare(Params())
    assert str(info.value) == f"model {NAME} has only its champion, v1: nothing to compare it with yet"
    client.delete_registered_model_alias(NAME, "champion")
    no_champion = f"model {NAME} has no champion yet: name both sides, e.g. `trainpipe compare 1 2`"
    for args in ([], ["1"], ["@champion", "1"]):
        with pytest.raises(ConfigError) as info:
            compare(Params(), *args)
        assert str(info.value) == no_champion, args
    result = trainpipe(tmp_path)
    assert result.returncode == 2
    assert last_line(result) == f"trainpipe compare: {no_champion}"


def test_an_unreachable_registry_is_one_line_without_its_password(tmp_path):
    port = free_port()  # nothing listens there
    result = trainpipe(
        tmp_path,
        MLFLOW_TRACKING_URI=f"http://admin:secret@127.0.0.1:{port}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
    assert result.returncode == 1
    assert last_line(result) == (
        f"trainpipe compare: MLflow at http://127.0.0.1:{port} failed "
        "(the tracking server did not answer, after MLflow's HTTP retries)"
    )
    assert "secret" not in result.stderr + result.stdout


def test_the_ui_link_of_a_tracking_server_is_the_server_itself(two_versions):
    from pipelines.commands.compare import ui_base

    assert ui_base("http://admin:secret@mlflow.example:15000/") == ("http://mlflow.example:15000", None)
    assert ui_base("sqlite:///mlflow.db", "http://ui.example/") == ("http://ui.example", None)
    found = compare(Params(), ui_url="https://mlflow.example/prefix")
    v1, v2 = two_versions["v1"], two_versions["v2"]
    expected = compare_url(
        [v1["run_id"], v2["run_id"]], [v1["experiment_id"]], "https://mlflow.example/prefix"
    )
    assert unquote(found["ui"]["url"]) == expected.replace(" ", "")
    assert found["ui"]["start_with"] is None and format_comparison(found)[-1] == found["ui"]["url"]
