"""Evaluation slices for real: evaluate's reports/slices.json from a real scoring, and the promotion
gate on a real MLflow registry (SQLite in tmp_path) refusing a challenger that is better overall
but surely worse on one slice, through `trainpipe publish`, with `trainpipe compare` after."""

import itertools
import json
from pathlib import Path

import pytest
from conftest import METRICS_DOC_BYTES, SNIPPETS, make_model_dir, write_metrics
from mlflow import MlflowClient

from pipelines.cli import main
from pipelines.core.data import read_json, sha256_hex, write_documents, write_json
from pipelines.core.params import PublishParams, load_params
from pipelines.core.slices import SLICES_FILE, read_slice_tags, slice_metrics
from pipelines.stages import evaluate

NAME = PublishParams().model_name
N_TESTS = 6  # of write_metrics' 12 documents, the first six are test files, the rest modules
_seeds = itertools.count(1)


def test_evaluate_writes_each_slices_bits_per_byte(tmp_path):
    """A real scoring by a tiny untrained model of a curated set with tests, modules, prose and C."""
    kinds = {"test/test_{}.py": 0, "pkg/mod_{}.py": 1, "docs/page_{}.md": 2, "native/ext_{}.c": 3}
    docs = []
    for i in range(40):
        pattern = list(kinds)[i % 4]
        text = SNIPPETS[i % len(SNIPPETS)] * (2 + i % 3)
        docs.append(
            {"path": pattern.format(i), "text": text, "sha256": sha256_hex(text), "n_bytes": len(text)}
        )
    params = load_params(
        tmp_path / "absent.yaml",
        [
            f"data.curated_dir={tmp_path}/curated",
            f"data.tokens_dir={tmp_path}/tokens",
            f"train.model_dir={tmp_path}/models",
            f"evaluate.reports_dir={tmp_path}/reports",
            "tokenize.val_fraction=0.45",
            "train.bf16=off",
            "evaluate.num_samples=0",
        ],
    )
    write_documents(docs, params.data.curated_dir)
    write_json(Path(params.data.tokens_dir) / "meta.json", {"val_set_sha256": "0" * 64})
    make_model_dir(params.train.model_dir)
    write_json(Path(params.train.model_dir) / "train.json", {"history": []})

    evaluate.evaluate_model(params)

    reports = Path(params.evaluate.reports_dir)
    scored = read_json(reports / evaluate.PER_DOCUMENT_FILE)["documents"]
    found = read_json(reports / SLICES_FILE)
    assert found == slice_metrics(scored, params.evaluate.slices)
    tests = [d for d in scored if d["path"].startswith("test/")]
    assert len(tests) >= 3 and any(d["path"].startswith("native/") for d in scored)  # what this test needs
    assert found["val_documents_slice_tests"] == len(tests)
    assert found["val_bpb_slice_tests"] == pytest.approx(
        sum(d["bits"] for d in tests) / sum(d["bytes"] for d in tests), rel=1e-12
    )
    assert found["val_documents_slice_prose"] == sum(d["path"].endswith(".md") for d in scored)
    assert found["val_documents_in_no_slice"] == sum(d["path"].endswith(".c") for d in scored)
    # the DVC metrics file: numbers only, the slices' bits per byte first
    assert all(isinstance(v, int | float) for v in found.values())
    assert list(found)[:3] == ["val_bpb_slice_tests", "val_bpb_slice_modules", "val_bpb_slice_prose"]


@pytest.fixture
def project(mlflow_env, tmp_path) -> Path:
    """A registry in tmp_path (the cwd) and a params.yaml whose gate takes slices of 5 documents."""
    (tmp_path / "params.yaml").write_text("publish:\n  slice_min_documents: 5\n")
    return tmp_path


def publish(capsys, tests_bpb: list[float], modules_bpb: list[float], *overrides: str) -> list[str]:
    """`trainpipe publish` of new weights scoring tests_bpb on the six test files and modules_bpb on
    the six modules; its printed lines."""
    params = load_params("params.yaml")
    make_model_dir(params.train.model_dir, seed=next(_seeds))
    write_metrics(params.evaluate.reports_dir, 0.0, doc_bits_per_byte=tests_bpb + modules_bpb)
    path = Path(params.evaluate.reports_dir) / evaluate.PER_DOCUMENT_FILE
    scores = read_json(path)
    for i, doc in enumerate(scores["documents"][:N_TESTS]):
        doc["path"] = f"test/test_mod{i}.py"
    write_json(path, scores)
    main(["publish", *(a for o in overrides for a in ("-S", o))])
    return capsys.readouterr().out.splitlines()


CHAMPION = [2.0] * 6
WORSE_TESTS = [2.08, 2.12, 2.1, 2.09, 2.11, 2.1]  # about +0.1 bits per byte on every test file
BETTER_MODULES = [1.5, 1.6, 1.55, 1.45, 1.58, 1.52]  # about -0.45 on every module


def test_a_challenger_better_overall_but_worse_on_a_slice_is_refused_naming_the_slice(project, capsys):
    client = MlflowClient()
    publish(capsys, CHAMPION, CHAMPION)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    lines = publish(capsys, WORSE_TESTS, BETTER_MODULES)

    tags = client.get_model_version(NAME, "2").tags
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert float(tags["bpb_delta_high"]) < 0  # surely better on the whole set: only the slice stops it
    record = read_slice_tags(tags)
    tests = record["slices"]["tests"]
    assert (record["vs"], record["tolerance"], record["min_documents"]) == ("1", 0.01, 5)
    assert tests["verdict"] == "blocks" and tests["documents"] == N_TESTS and tests["low"] > 0.01
    assert record["slices"]["modules"]["verdict"] == "passes"
    assert record["slices"]["prose"] == {"documents": 0, "verdict": "empty"}
    tests_bytes = METRICS_DOC_BYTES[:N_TESTS]
    expected_delta = sum((r - 2.0) * n for r, n in zip(WORSE_TESTS, tests_bytes, strict=True)) / sum(
        tests_bytes
    )
    assert tests["delta"] == pytest.approx(expected_delta)
    interval = f"{tests['delta']:+.4f} bpb [{tests['low']:+.4f}, {tests['high']:+.4f}]"
    # the reason, as recorded on the version and printed, names the slice and by how much
    assert f"better overall, but worse on slice tests by {interval} (6 documents)" in tags["alias_decision"]
    assert "champion v1 keeps serving" in tags["alias_decision"]
    assert lines[0] == f"registered models:/{NAME}/2 version 2: {tags['alias_decision']}"
    assert lines[1:] == [
        f"  slice tests: {interval} on 6 documents, surely worse by more than the tolerance: blocks",
        lines[2],
        "  slice prose: no documents, not gated",
    ]
    assert lines[2].startswith("  slice modules: -0.4") and lines[2].endswith("on 6 documents, passes")
    # each slice's bits per byte in the version's run, for the MLflow UI's compare view
    run = client.get_run(client.get_model_version(NAME, "2").run_id).data.metrics
    assert run["val_bpb_slice_tests"] == pytest.approx(
        sum(r * n for r, n in zip(WORSE_TESTS, tests_bytes, strict=True)) / sum(tests_bytes)
    )
    assert (run["val_documents_slice_tests"], run["val_documents_slice_modules"]) == (6, 6)

    # trainpipe compare shows them, and the slice's interval of B - A from v2's gate
    main(["compare", "1", "2"])
    shown = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(shown) if line.startswith("metrics (last logged value)"))
    metric_names = [line.split()[0] for line in shown[start + 1 : shown.index("", start)]]
    # right after the headline: held-out bits per byte, the compressors, the loss
    assert metric_names[:6] == [
        "val_bits_per_byte",
        "gzip_bits_per_byte",
        "xz_bits_per_byte",
        "val_loss",
        "val_bpb_slice_modules",
        "val_bpb_slice_tests",
    ]
    slice_row = next(line for line in shown if line.startswith("slice tests, B - A"))
    assert f"{interval} on 6 documents: blocks in v2's gate" in slice_row

    # the same scores with a slice minimum above six documents: reported, not gated, promoted
    lines = publish(capsys, WORSE_TESTS, BETTER_MODULES, "publish.slice_min_documents=7")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    lines = lines[lines.index(next(line for line in lines if line.startswith("registered"))) :]
    assert "becomes champion in place of v1" in lines[0]  # after the smoke test's line
    assert lines[1].startswith("  slice tests: +0.1") and lines[1].endswith("reported, not gated")
    assert json.loads(client.get_model_version(NAME, "3").tags["bpb_delta_slices"])["min_documents"] == 7
