"""A folder as the data source (issue 12, part 4): the files data.include names and data.exclude
does not, as documents; tables inside a folder read as text; binary files skipped and counted;
the source manifest that decides when ingest re-runs taking the same files; the drift block's
way forward. Real files in tmp_path; the gate message from a real GateResult."""

import json

import pytest

from pipelines.core.errors import ConfigError, SourceError
from pipelines.core.params import load_params
from pipelines.stages import ingest
from pipelines.stages.data_gate import GateResult
from pipelines.stages.inputs import source_manifest

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


def repo_tree(root):
    """A small repository as a user would point at it: code, docs, and what is not a document."""
    files = {
        "pkg/__init__.py": "",
        "pkg/core.py": "def add(a, b):\n    return a + b\n",
        "pkg/types.pyi": "def add(a: int, b: int) -> int: ...\n",
        "README.md": "# Project\n",
        "docs/guide.rst": "Guide\n=====\n",
        "notes.txt": "plain notes\n",
        "config/settings.json": '{"debug": true}\n',  # the stray table: no "text" column
        "data/rows.jsonl": '{"body": "x"}\n',
        "pyproject.toml": "[project]\n",
        ".git/config": "[core]\n",
        ".git/hooks/pre-commit.py": "print('hook')\n",
        ".venv/lib/site.py": "import os\n",
        "pkg/__pycache__/core.cpython-311.py": "compiled\n",
        "build/lib/pkg/core.py": "def add(a, b):\n    return a + b\n",
        "node_modules/left/index.md": "# left\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "docs" / "logo.png").write_bytes(PNG)
    (root / "docs" / "dump.txt").write_bytes(b"header\x00\x01\x02" * 50)  # named like text, binary
    return root


DOCUMENTS = ["README.md", "docs/guide.rst", "notes.txt", "pkg/__init__.py", "pkg/core.py", "pkg/types.pyi"]


def test_a_folder_takes_its_code_and_prose_and_leaves_the_rest(tmp_path):
    root = repo_tree(tmp_path / "repo")
    records, skipped = ingest.open_source(str(root))
    assert [r["path"] for r in records] == DOCUMENTS  # the stream read whole: skipped is complete
    assert skipped.to_dict() == {"left_out": 4, "binary": 1, "binary_examples": ["docs/dump.txt"]}
    # left out: the two tables, pyproject.toml and logo.png; .git, .venv, __pycache__, build and
    # node_modules are not walked, so not counted


def test_ingest_reports_what_it_skipped(tmp_path, capsys):
    root = repo_tree(tmp_path / "repo")
    params = load_params(tmp_path / "none.yaml", [f"data.source={root}", f"data.raw_dir={tmp_path / 'raw'}"])
    summary = ingest.run(params)
    assert summary["documents"] == len(DOCUMENTS) and summary["skipped"]["binary"] == 1
    assert json.loads((tmp_path / "raw" / "ingest.json").read_text())["skipped"]["left_out"] == 4
    line = ingest.describe(summary, params)
    assert "4 files left out by data.include/data.exclude" in line
    assert "1 binary files skipped (e.g. docs/dump.txt)" in line


def test_a_table_inside_a_folder_is_text_when_included(tmp_path):
    root = repo_tree(tmp_path / "repo")
    records = ingest.collect_documents(str(root), include=["*.json", "**/*.jsonl"])
    # the whole file, as bytes: a table without a "text" column does not stop the folder
    assert {r["path"]: r["content"] for r in records} == {
        "config/settings.json": b'{"debug": true}\n',
        "data/rows.jsonl": b'{"body": "x"}\n',
    }


def test_a_table_named_directly_is_read_by_rows(tmp_path):
    folder = tmp_path / "tables"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(2)))
    for source in (str(folder / "a.jsonl"), f"{folder}/*.jsonl"):  # a file, a glob
        records = ingest.collect_documents(source)
        assert all("#" in r["path"] for r in records) and b"a.jsonl 1" in [r["content"] for r in records][1]
    assert len(ingest.collect_documents(f"{folder}/*.jsonl")) == 4
    with pytest.raises(SourceError, match="no files found; data.include/data.exclude left out all 2"):
        ingest.collect_documents(str(folder))  # as a folder: not documents under the defaults


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (["docs/*"], [], ["docs/dump.txt", "docs/guide.rst", "docs/logo.png"]),  # binaries: skipped later
        (["*.py"], [], ["pkg/__init__.py", "pkg/core.py"]),  # no slash: at any depth, as .gitignore
        (["**/*.py"], ["pkg/__init__.py"], ["pkg/core.py"]),
        (["**/*.py"], ["pkg/"], []),  # the folder is not walked
        (["**/*.py", "**/*.md"], [], ["README.md", "pkg/__init__.py", "pkg/core.py"]),
    ],
)
def test_include_and_exclude_patterns(tmp_path, include, exclude, expected):
    root = repo_tree(tmp_path / "repo")
    exclude = exclude + [".*", "build/", "node_modules/", "__pycache__/"]
    files = ingest.folder_files(root, include, exclude)[0]
    assert sorted(f.relative_to(root).as_posix() for f in files) == expected


def test_the_manifest_lists_only_the_files_ingest_takes(tmp_path):
    """An edit to a left-out file (the .git folder, a stray .json) does not re-run ingest; an edit
    to a document does, and so do other patterns."""
    root = repo_tree(tmp_path / "repo")
    before = source_manifest(str(root))
    assert [e["path"] for e in before["files"]] == sorted(DOCUMENTS + ["docs/dump.txt"])
    (root / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (root / "config" / "settings.json").write_text("{}\n")
    (root / "docs" / "new.png").write_bytes(PNG)
    assert source_manifest(str(root)) == before
    (root / "pkg" / "core.py").write_text("def add(a, b):\n    return b + a\n")
    assert source_manifest(str(root)) != before
    only_md = source_manifest(str(root), include=["*.md"])
    assert [e["path"] for e in only_md["files"]] == ["README.md"]


@pytest.mark.parametrize(
    "override, reason",
    [
        ("data.include=[]", "'data.include': List should have at least 1 item"),
        (
            "data.include=['!']",
            "'data.include': Value error, pattern '!' is not a valid gitignore-style pattern",
        ),
        ("data.exclude=['# notes']", "'data.exclude': Value error, pattern '# notes' matches nothing"),
        ("data.exclude=5", "'data.exclude': Input should be a valid list"),
    ],
)
def test_bad_patterns_are_one_line_errors(tmp_path, override, reason):
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "none.yaml", [override])
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_one_pattern_needs_no_list(tmp_path):
    # `*` opens a YAML alias, so `-S data.include=**/*.py` reaches the schema as a plain string
    assert load_params(tmp_path / "none.yaml", ["data.include=**/*.py"]).data.include == ["**/*.py"]


def test_a_drift_block_ends_with_the_way_forward():
    drift = GateResult(
        passed=False,
        failed=[{"check": "drift_documents", "observed": "120 vs champion 50, ratio 2.4", "need": "ratio"}],
        report_path="reports/gate.json",
        data_docs_path="reports/data_docs/index.html",
    )
    line = drift.message()
    assert "\n" not in line and line.index("drift_documents") < line.index("reports/gate.json")
    assert line.endswith(
        "to train on this data on purpose, start a new model line "
        "(`trainpipe run -S publish.model_name=NEW_NAME`) or turn the drift checks off for this run "
        "(`trainpipe run -S curate.gate.drift.enabled=false`, saved in params.yaml: set it back to true after)"
    )
    other = GateResult(
        passed=False, failed=[{"check": "expect_table_row_count", "observed": 3, "need": ">= 5"}]
    )
    assert "publish.model_name" not in other.message()  # only drift has this way out
