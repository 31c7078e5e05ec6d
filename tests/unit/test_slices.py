"""Evaluation slices: which documents each slice holds, its figures, its verdict in the promotion
gate, and the checks of evaluate.slices in params.yaml."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.commands.promotion import decide_promotion_by_slices
from pipelines.core.bootstrap import BpbDelta, paired_bootstrap
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, load_params
from pipelines.core.slices import (
    DEFAULT_SLICES,
    SliceCheck,
    check_slices,
    read_slice_tags,
    slice_lines,
    slice_members,
    slice_metrics,
    slice_tags,
    slice_verdict,
)

ROOT = Path(__file__).resolve().parents[2]


def slices_of(path: str, slices=DEFAULT_SLICES) -> set[str]:
    return {name for name, idx in slice_members([path], slices).items() if idx}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # the default job's paths, as curated holds them (relative to the stdlib's folder)
        ("test/test_os.py", {"tests"}),
        ("test/test_importlib/frozen/test_loader.py", {"tests"}),
        ("test/crashers/underlying_dict.py", {"tests"}),  # under test/: a test file whatever its name
        ("ctypes/test/test_buffers.py", {"tests"}),
        ("distutils/tests/test_check.py", {"tests"}),
        ("idlelib/idle_test/test_format.py", {"tests"}),
        ("os.py", {"modules"}),
        ("email/header.py", {"modules"}),
        ("encodings/cp437.py", {"modules"}),
        ("typing.pyi", {"modules"}),
        # a user's own code
        ("src/pkg/test_util.py", {"tests"}),
        ("src/pkg/util_test.py", {"tests"}),
        ("src/pkg/tests.py", {"modules"}),  # tests/ is a folder; a module named tests.py is not in it
        ("src/contest.py", {"modules"}),
        ("README.md", {"prose"}),
        ("docs/guide.rst", {"prose"}),
        ("tests/README.txt", {"tests", "prose"}),  # in several slices
        ("Modules/_io.c", set()),  # in none
        ("data/table.json", set()),
    ],
)
def test_default_slices_hold_the_documents_their_names_say(path, expected):
    assert slices_of(path) == expected


@pytest.mark.parametrize(
    ("patterns", "path", "member"),
    [
        (["*.py", "!test/"], "test/test_os.py", False),  # the last pattern that matches decides
        (["!test/", "*.py"], "test/test_os.py", True),
        (["*.py", "!test/"], "os.py", True),
        (["/test/"], "test/test_os.py", True),  # anchored at the root of the path
        (["/test/"], "ctypes/test/test_buffers.py", False),
        (["test/"], "ctypes/test/test_buffers.py", True),  # a folder at any depth
        (["lib/**/*.py"], "lib/a/b/c.py", True),
        (["lib/*.py"], "lib/a/b.py", False),  # * stops at a slash
        (["*.py"], "notes.txt", False),
    ],
)
def test_slice_patterns_follow_gitignore_rules(patterns, path, member):
    assert slice_members([path], {"s": patterns}) == {"s": [0] if member else []}


def test_slice_metrics_weigh_each_document_by_its_bytes():
    documents = [
        {"path": "test/test_a.py", "bits": 100.0, "bytes": 100},  # 1 bit a byte
        {"path": "test/test_b.py", "bits": 900.0, "bytes": 300},  # 3 bits a byte
        {"path": "a.py", "bits": 50.0, "bytes": 25},
        {"path": "Modules/x.c", "bits": 10.0, "bytes": 10},
    ]
    assert slice_metrics(documents, DEFAULT_SLICES) == {
        "val_bpb_slice_tests": 1000 / 400,  # not the mean of 1 and 3
        "val_bpb_slice_modules": 2.0,
        # no bits per byte for prose: it holds no document
        "val_documents_slice_tests": 2,
        "val_documents_slice_modules": 1,
        "val_documents_slice_prose": 0,
        "val_documents_in_no_slice": 1,
    }


BELOW = math.nextafter(0.01, 0.0)
ABOVE = math.nextafter(0.01, 1.0)


@pytest.mark.parametrize(
    ("interval", "documents", "tolerance", "min_documents", "verdict"),
    [
        ((0.05, 0.03, 0.07), 30, 0.01, 20, "blocks"),  # surely worse by more than the tolerance
        ((0.02, ABOVE, 0.03), 30, 0.01, 20, "blocks"),  # the lower bound just above it
        ((0.02, 0.01, 0.03), 30, 0.01, 20, "passes"),  # at it: not surely more
        ((0.02, BELOW, 0.03), 30, 0.01, 20, "passes"),
        ((0.008, 0.005, 0.011), 30, 0.01, 20, "passes"),  # surely worse, but within the tolerance
        ((0.008, 0.005, 0.011), 30, 0.0, 20, "blocks"),  # ... which may be zero
        ((0.03, -0.01, 0.07), 30, 0.01, 20, "passes"),  # not surely worse
        ((-0.05, -0.07, -0.03), 30, 0.01, 20, "passes"),  # better
        ((0.05, 0.03, 0.07), 19, 0.01, 20, "too small"),  # worse, but reported only
        ((0.05, 0.03, 0.07), 20, 0.01, 20, "blocks"),
    ],
)
def test_slice_verdict_blocks_only_a_slice_surely_worse_by_more_than_the_tolerance(
    interval, documents, tolerance, min_documents, verdict
):
    delta = BpbDelta(*interval, documents=documents, resamples=2000)
    assert slice_verdict(delta, documents, tolerance, min_documents) == verdict


def test_a_slice_without_documents_is_empty():
    assert slice_verdict(None, 0, 0.01, 20) == "empty"


def regressed_on_tests(n_tests: int = 24, n_modules: int = 24) -> tuple[list, list, list, list]:
    """Per-document scores where the challenger is 0.3 bits per byte better on every module and
    0.05 worse on every test file: better overall, surely worse on tests."""
    paths = [f"test/test_{i}.py" for i in range(n_tests)] + [f"pkg/mod_{i}.py" for i in range(n_modules)]
    doc_bytes = [200 + 37 * (i % 7) for i in range(len(paths))]
    champion = [2.0 * n for n in doc_bytes]
    challenger = [(2.05 if p.startswith("test/") else 1.7) * n for p, n in zip(paths, doc_bytes, strict=True)]
    return paths, challenger, champion, doc_bytes


def test_check_slices_bootstraps_each_slice_on_its_own_documents_with_the_gates_seed():
    paths, challenger, champion, doc_bytes = regressed_on_tests()
    checks = check_slices(
        paths, challenger, champion, doc_bytes, DEFAULT_SLICES,
        resamples=2000, seed=5, tolerance=0.01, min_documents=20, vs="3",
    )  # fmt: skip
    by_name = {c.name: c for c in checks}
    assert [c.name for c in checks] == ["tests", "modules", "prose"]
    assert by_name["tests"].verdict == "blocks" and by_name["tests"].delta.low == pytest.approx(0.05)
    assert by_name["modules"].verdict == "passes" and by_name["modules"].delta.high == pytest.approx(-0.3)
    assert by_name["prose"] == SliceCheck("prose", 0, None, "empty")
    # the same bootstrap as the whole set's, on the slice's documents
    assert by_name["tests"].delta == paired_bootstrap(
        challenger[:24], champion[:24], doc_bytes[:24], 2000, 5, vs="3"
    )
    whole = paired_bootstrap(challenger, champion, doc_bytes, 2000, 5)
    assert whole.high < 0  # better overall: only the slice stops it
    # fewer test files than the minimum: the same regression is reported, not gated
    small = check_slices(
        *regressed_on_tests(n_tests=5),
        DEFAULT_SLICES,
        resamples=2000,
        seed=5,
        tolerance=0.01,
        min_documents=20,
    )
    assert small[0].verdict == "too small" and not any(c.blocks for c in small)


def test_slice_tags_read_back_and_print_a_line_a_slice():
    paths, challenger, champion, doc_bytes = regressed_on_tests()
    checks = check_slices(
        paths, challenger, champion, doc_bytes, DEFAULT_SLICES,
        resamples=2000, seed=0, tolerance=0.01, min_documents=20, vs="3",
    )  # fmt: skip
    found = read_slice_tags(slice_tags(checks, 0.01, 20, "3"))
    assert (found["vs"], found["tolerance"], found["min_documents"]) == ("3", 0.01, 20)
    assert found["slices"]["tests"] == {
        "documents": 24,
        "verdict": "blocks",
        "delta": checks[0].delta.delta,
        "low": checks[0].delta.low,
        "high": checks[0].delta.high,
    }
    assert slice_lines(found) == [
        "slice tests: +0.0500 bpb [+0.0500, +0.0500] on 24 documents, surely worse by more than the "
        "tolerance: blocks",
        "slice modules: -0.3000 bpb [-0.3000, -0.3000] on 24 documents, passes",
        "slice prose: no documents, not gated",
    ]
    assert read_slice_tags({}) is None and read_slice_tags({"bpb_delta_slices": "{"}) is None


WORSE_TESTS = SliceCheck("tests", 36, BpbDelta(0.03, 0.02, 0.04, 36, 2000), "blocks")
WORSE_SMALL = SliceCheck("prose", 4, BpbDelta(0.3, 0.2, 0.4, 4, 2000), "too small")
WORSE_WITHIN = SliceCheck("modules", 27, BpbDelta(0.008, 0.005, 0.011, 27, 2000), "passes")
BETTER = BpbDelta(-0.05, -0.06, -0.04, documents=63, resamples=2000, vs="3")
DETAILS = "(2.0500 vs 2.1000 bpb on 63 documents)"


@pytest.mark.parametrize(
    ("delta", "checks", "promoted", "reason"),
    [
        (
            BETTER,
            [WORSE_WITHIN, WORSE_SMALL],
            True,
            f"challenger {BETTER.text()}: better, v4 becomes champion in place of v3 {DETAILS}",
        ),
        (
            BETTER,
            [WORSE_TESTS, WORSE_WITHIN],
            False,
            f"challenger {BETTER.text()}: better overall, but worse on slice tests by +0.0300 bpb "
            f"[+0.0200, +0.0400] (36 documents), surely by more than publish.slice_tolerance "
            f"(0.01 bpb): champion v3 keeps serving {DETAILS}",
        ),
        (
            BpbDelta(0.01, -0.01, 0.03, documents=63, resamples=2000, vs="3"),
            [WORSE_TESTS],
            False,
            "challenger +0.0100 bpb [-0.0100, +0.0300]: not significant, champion v3 keeps serving "
            f"{DETAILS}; also worse on slice tests by +0.0300 bpb [+0.0200, +0.0400] (36 documents), "
            "surely by more than publish.slice_tolerance (0.01 bpb)",
        ),
    ],
)
def test_a_slice_that_blocks_keeps_the_champion_even_when_the_challenger_is_better_overall(
    delta, checks, promoted, reason
):
    assert decide_promotion_by_slices("4", 2.05, "3", 2.10, delta, 0.0, checks, 0.01) == (promoted, reason)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("evaluate.slices.x=['[z-a]']", "slice 'x': pattern '[z-a]' is not a valid gitignore-style pattern"),
        ("evaluate.slices.x=[]", "slice 'x' needs a pattern that takes documents in"),
        ("evaluate.slices.x=['!test/']", "slice 'x' needs a pattern that takes documents in"),
        ("evaluate.slices.x=['#note']", "slice 'x': pattern '#note' matches nothing"),
        ("evaluate.slices.x=a.py", "parameter 'evaluate.slices.x'"),  # a list, not a string
        ("evaluate.slices.x.y=[a]", "'evaluate.slices.x' is a value"),
        ("publish.slice_tolerance=-0.1", "parameter 'publish.slice_tolerance'"),
        ("publish.slice_min_documents=0", "parameter 'publish.slice_min_documents'"),
    ],
)
def test_bad_slices_are_one_line_errors_naming_the_key(override, says):
    with pytest.raises(ConfigError, match="evaluate.slices|publish.slice") as err:
        load_params(ROOT / "params.yaml", [override])
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a.b", "x" * 41])
def test_a_slice_name_that_cannot_name_a_metric_is_refused(tmp_path, name):
    (tmp_path / "params.yaml").write_text(f"evaluate:\n  slices:\n    '{name}': ['*.py']\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value) == (
        f"{tmp_path / 'params.yaml'}: parameter 'evaluate.slices': Value error, slice name {name!r} must be "
        "a letter or digit, then up to 39 letters, digits, '_' or '-' (it names the metric val_bpb_slice_<name>)"
    )


def test_slices_are_overridden_one_at_a_time_as_dvc_exp_run_does():
    params = load_params(ROOT / "params.yaml", ["evaluate.slices.c=['*.c', '*.h']", "~evaluate.slices.prose"])
    assert params.evaluate.slices == {
        **{k: DEFAULT_SLICES[k] for k in ("tests", "modules")},
        "c": ["*.c", "*.h"],
    }
    assert Params().evaluate.slices == DEFAULT_SLICES


def test_a_bad_slice_on_the_command_line_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "history", "-S", "evaluate.slices.x=['[z-a]']"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "trainpipe history: params.yaml: parameter 'evaluate.slices': Value error, slice 'x': pattern "
        "'[z-a]' is not a valid gitignore-style pattern (bad character range z-a at position 10)"
    ]
