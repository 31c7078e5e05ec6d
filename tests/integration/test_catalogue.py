"""The bad-input catalogue: broken corpora through the real ingest and curate entry points.

Each case either stops with a clear one-line reason (ingest's exit 2, the gate's exit 3) or is
curated correctly. In every case: no traceback, no curated table for training when it stops,
the raw snapshot left exactly as ingested, and every dropped document in the quarantine.
The drift cases compare with a champion published for real into a SQLite registry.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_model_dir, write_metrics

from pipelines.core.data import sha256_file
from pipelines.core.params import load_params, save_overrides
from pipelines.core.shards import list_shards, read_documents
from pipelines.core.spans import SPANS_FILE
from pipelines.stages import curate, ingest, inputs

GATE = ["curate.gate.min_documents=5", "curate.gate.min_bytes=3000", "curate.workers=1"]
BIN = Path(sys.executable).parent


def module(i: int, name: str = "item") -> str:
    """A small, valid, distinct Python module (about 2 KB)."""
    body = "".join(
        f"def {name}_{i}_{j}(value, scale={j + 1}):\n"
        f'    """Return value scaled by {j + 1} for record {i}."""\n'
        f"    result = value * scale + {i * 31 + j}\n"
        f"    return result if result > {j} else -result\n\n\n"
        for j in range(12)
    )
    return f'"""Module {i}: helpers for {name} records."""\n\nimport math\n\n\n{body}'


def good_corpus(folder: Path, n: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"mod_{i:03d}.py").write_text(module(i))


PROSE_WORDS = "the data pipeline stops bad input before training and reports every reason clearly".split()


def prose(i: int, words: int = 80) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(PROSE_WORDS) for _ in range(words)) + "."


class Workspace:
    """One project folder: params overrides pointing every path inside it, and the two stages."""

    def __init__(self, root: Path, capsys):
        self.root, self.capsys = root, capsys

    def overrides(self, source: Path | str, extra: list[str]) -> list[str]:
        r = self.root
        return [
            f"data.source={source}",
            f"data.raw_dir={r / 'raw'}",
            f"data.curated_dir={r / 'curated'}",
            f"data.quarantine_dir={r / 'quarantine'}",
            f"data.inputs_dir={r / 'inputs'}",
            f"curate.reports_dir={r / 'reports'}",
            *GATE,
            *extra,
        ]

    def stage(self, module, source, extra) -> tuple[int, str, str]:
        argv = ["--params", str(self.root / "none.yaml")]
        for override in self.overrides(source, extra):
            argv += ["-S", override]
        self.capsys.readouterr()
        try:
            module.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = self.capsys.readouterr()
        return code, out, err

    def run(self, source, *extra: str) -> tuple[str, int, str]:
        """(where it stopped: "ingest" / "curate" / "passed", exit code, stderr)."""
        code, _, err = self.stage(ingest, source, list(extra))
        assert "Traceback" not in err
        if code:
            assert not list_shards(self.root / "raw")
            return "ingest", code, err
        raw_sha = sha256_file(*list_shards(self.root / "raw"))
        code, _, err = self.stage(inputs, source, list(extra))  # the champion's profile, for drift
        assert code == 0, err
        code, _, err = self.stage(curate, source, list(extra))
        assert "Traceback" not in err
        assert sha256_file(*list_shards(self.root / "raw")) == raw_sha, (
            "the raw snapshot must stay as ingested"
        )
        if code:
            assert not list_shards(self.root / "curated"), "nothing may reach training"
        return ("curate" if code else "passed"), code, err

    def report(self) -> dict:
        return json.loads((self.root / "reports" / "curation.json").read_text())

    def curated(self) -> list[dict]:
        return read_documents(self.root / "curated")

    def quarantine(self) -> dict[str, dict]:
        return {row["path"]: row for row in read_documents(self.root / "quarantine")}

    def explain(self, path: str, *extra: str) -> str:
        return curate.explain(
            path, load_params(self.root / "none.yaml", self.overrides("unused", list(extra)))
        )


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-registry.db'}")
    return Workspace(tmp_path / "project", capsys)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- stops before curation, with one line -------------------------------------------------------


def test_empty_folder(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    where, code, err = ws.run(tmp_path / "empty")
    assert (where, code) == ("ingest", 2)
    assert one_line(err).endswith("no files found")


def test_truncated_parquet(ws, tmp_path):
    import pyarrow as pa

    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": [module(i) for i in range(20)]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    where, code, err = ws.run(path)
    assert (where, code) == ("ingest", 2)
    assert "corpus.parquet: cannot be read as .parquet" in one_line(err)


def test_jsonl_without_the_text_field(ws, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": prose(i)}) + "\n" for i in range(10)))
    where, code, err = ws.run(path)
    assert (where, code) == ("ingest", 2)
    assert "no column 'text' (columns: body)" in one_line(err)


# --- stops at the gate, with one line, quarantine written ----------------------------------------


def test_binary_files_under_source_names(ws, tmp_path):
    folder = tmp_path / "binary"
    folder.mkdir()
    for i in range(8):
        (folder / f"mod_{i}.py").write_bytes(random.Random(i).randbytes(4000))
    # a folder source skips binary files and counts them: here nothing is left
    where, code, err = ws.run(folder)
    assert (where, code) == ("ingest", 2)
    assert one_line(err).endswith("yielded no documents (8 binary files skipped)")
    # files named directly (a glob) reach curate, which quarantines them
    where, code, err = ws.run(f"{folder}/*.py")
    assert (where, code) == ("curate", 3)
    line = one_line(err)
    assert "expect_table_row_count_to_be_between (observed 0, need >= 5)" in line and "gate.json" in line
    assert {row["reasons"][0] for row in ws.quarantine().values()} == {"undecodable"}
    assert (
        ws.quarantine()[f"{folder}/mod_3.py"]["content"] == (folder / "mod_3.py").read_bytes()
    )  # kept as ingested


def test_one_file_copied_hundreds_of_times(ws, tmp_path):
    folder = tmp_path / "copies"
    good_corpus(folder, n=3)
    for i in range(300):
        (folder / f"copy_{i:03d}.py").write_text(module(99))
    where, code, err = ws.run(folder, "curate.gate.min_documents=10")
    assert (where, code) == ("curate", 3)  # 4 distinct documents are not a corpus
    assert "observed 4, need >= 10" in one_line(err)
    report = ws.report()
    assert report["dropped"]["duplicate"] == 299
    assert report["duplicate_clusters"][0]["kept"] == "copy_000.py"
    assert len(report["duplicate_clusters"][0]["copies"]) == 299
    assert "an exact copy of copy_000.py" in ws.explain("copy_250.py")


# --- curated correctly ------------------------------------------------------------------------------


def test_near_copies_with_renamed_identifiers(ws, tmp_path):
    folder = tmp_path / "near"
    good_corpus(folder)
    for k in range(20):
        renamed = module(5).replace("item_5_3", f"renamed_{k}").replace("item_5_7", f"other_{k}")
        (folder / f"z_near_{k:02d}.py").write_text(renamed)
    where, code, err = ws.run(folder)
    assert (where, code) == ("passed", 0), err
    assert len(ws.curated()) == 10
    cluster = ws.report()["duplicate_clusters"][0]
    assert cluster["kept"] == "mod_005.py" and len(cluster["copies"]) == 20
    assert {c["kind"] for c in cluster["copies"]} == {"near"}
    assert "near copy (estimated Jaccard" in ws.explain("z_near_07.py")


def test_legacy_encodings(ws, tmp_path):
    folder = tmp_path / "legacy"
    good_corpus(folder)
    text = module(50).replace("Return value", "Renvoie la valeur \u00e9chelonn\u00e9e")
    (folder / "declared.py").write_bytes(("# -*- coding: latin-1 -*-\n" + text).encode("latin-1"))
    (folder / "undeclared.py").write_bytes(text.encode("latin-1"))
    where, code, err = ws.run(folder)
    assert (where, code) == ("passed", 0), err
    kept = {doc["path"]: doc["text"] for doc in ws.curated()}
    assert "\u00e9chelonn\u00e9e" in kept["declared.py"]
    assert ws.quarantine()["undeclared.py"]["reasons"] == ["undecodable"]
    assert "not UTF-8" in ws.explain("undeclared.py")


def test_a_single_enormous_line(ws, tmp_path):
    folder = tmp_path / "huge"
    good_corpus(folder)
    (folder / "huge.py").write_text("x = [" + "1, " * 400_000 + "]\n")
    where, code, err = ws.run(folder)
    assert (where, code) == ("passed", 0), err
    assert ws.quarantine()["huge.py"]["reasons"][:2] == ["too_long", "long_line"]
    assert len(ws.curated()) == 10


def test_nulls_in_a_jsonl(ws, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": prose(i)} if i % 3 else {"text": None} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    where, code, err = ws.run(path, "curate.min_chars=100", "curate.gate.min_bytes=1000")
    assert (where, code) == ("passed", 0), err
    assert len(ws.curated()) == 16
    nulls = [row for row in ws.quarantine().values() if row["content"] == b""]
    assert len(nulls) == 8 and all("too_short" in row["reasons"] for row in nulls)


SECRETS = (
    "AWS_KEY = 'AKIAIOSFODNN7EXAMPLE'\n"
    "AWS_SECRET = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'\n"
    "GITHUB = 'ghp_" + "x1Y2" * 9 + "'\n"
    "GITLAB = 'glpat-" + "Ab1_" * 7 + "'\n"
    "PYPI = 'pypi-AgEIcHlwaS5vcmc" + "Q2x" * 20 + "'\n"
    "SLACK = 'https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX'\n"
    "DB = 'postgres://app:hunter2@db.internal:5432/app'\n"
    "db_password = 'correct-horse-battery'\n"
    "OWNER = 'jane.doe@corp.co.uk'\n"
    "KEY = '''-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----'''\n"
    "PGP = '''-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0Sm0oBCADJ8mXn\n-----END PGP PRIVATE KEY BLOCK-----'''\n"
)
# what must appear nowhere but the raw snapshot: one piece of each secret above
SECRET_BYTES = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI",
    "ghp_x1Y2",
    "glpat-Ab1_",
    "pypi-AgEIcHlwaS5vcmc",
    "T00000000/B00000000",
    "hunter2",
    "correct-horse",
    "jane.doe",
    "MIIEvQIBADAN",
    "lQOYBF0Sm0oBCADJ8mXn",
)


def test_files_full_of_secrets(ws, tmp_path):
    folder = tmp_path / "secrets"
    good_corpus(folder)
    for i in range(3):
        (folder / f"settings_{i}.py").write_text(SECRETS * 3 + module(200 + i))
    (folder / "short.py").write_text(SECRETS)  # too short: dropped, so it lands in the quarantine
    where, code, err = ws.run(folder, "curate.min_chars=1500")
    assert (where, code) == ("passed", 0), err
    curated_text = "".join(doc["text"] for doc in ws.curated())
    quarantined = b"".join(row["content"] for row in ws.quarantine().values())
    for secret in SECRET_BYTES:
        assert secret not in curated_text and secret.encode() not in quarantined, secret
    assert ws.quarantine()["short.py"]["reasons"] == ["too_short"]
    assert ws.report()["scrubbed"] == {
        "private_key": 18,
        "api_key": 54,
        "token": 0,
        "credentials": 9,
        "password": 9,
        "email": 9,
    }
    assert "6 api_key -> <API_KEY>" not in ws.explain("settings_0.py")
    assert (
        "18 api_key -> <API_KEY>, 3 credentials -> <CREDENTIALS>, 3 email -> <EMAIL>, "
        "3 password -> <PASSWORD>, 6 private_key -> <PRIVATE_KEY>"
    ) in ws.explain("settings_0.py")


@pytest.mark.slow
def test_secrets_reach_neither_the_dvc_remote_nor_the_logged_reports(tmp_path):
    """`dvc repro` and `dvc push` for real, in a git repo made of this project's files: the raw
    snapshot (which holds the secrets, byte for byte) stays in the local cache; what is pushed,
    and every report the flow logs to MLflow from reports/, holds none of them."""
    folder = tmp_path / "secrets"
    good_corpus(folder)
    (folder / "settings.py").write_text(SECRETS + module(300))
    (folder / "short.py").write_text(SECRETS)  # dropped: too short
    proj, env = dvc_project(tmp_path, folder)
    for args in (["repro", "curate"], ["push"], ["status", "--cloud", "ingest", "curate"]):
        done = subprocess.run(["dvc", *args], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "in sync" in done.stdout  # the unpushed raw snapshot is no missing data

    def holding_secrets(root: Path) -> dict[str, list[str]]:
        found = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if hits := [s for s in SECRET_BYTES if s.encode() in data]:
                found[str(path.relative_to(root))] = hits
        return found

    assert holding_secrets(proj / "data" / "raw"), "the raw snapshot should hold the planted secrets"
    remote_dir = proj / ".dvc-remote"  # the project's own default remote, a local folder
    for pushed_or_logged in (remote_dir, *(proj / p for p in ("data/quarantine", "data/curated", "reports"))):
        assert holding_secrets(pushed_or_logged) == {}, pushed_or_logged
    remote = {p.relative_to(remote_dir).as_posix() for p in remote_dir.rglob("*") if p.is_file()}
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    raw_md5 = lock["stages"]["ingest"]["outs"][0]["md5"]
    quarantine_md5 = next(
        o["md5"] for o in lock["stages"]["curate"]["outs"] if o["path"] == "data/quarantine"
    )
    assert f"files/md5/{quarantine_md5[:2]}/{quarantine_md5[2:]}" in remote  # the quarantine is pushed
    assert f"files/md5/{raw_md5[:2]}/{raw_md5[2:]}" not in remote  # the raw snapshot is not


def dvc_project(tmp_path: Path, source: Path) -> tuple[Path, dict]:
    """This project's git-tracked files (tests aside) as a fresh git repo; its DVC remote is local."""
    repo = Path(__file__).resolve().parents[2]
    proj = tmp_path / "proj"
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if not name.startswith("tests/"):
            (proj / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, proj / name)
    save_overrides(proj / "params.yaml", [f"data.source={source}", *GATE])
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(
            args, cwd=proj, check=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(proj),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'no-registry.db'}",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
    }
    return proj, env


def test_two_documents_under_one_name_stop_curation(ws, tmp_path):
    """A table's rows are named FILE#ROW: a glob over a folder holding rows.jsonl and a text file
    named rows.jsonl#1 gives two documents one name, which dedupe and the quarantine cannot tell
    apart. Curation stops with one line before any of them."""
    folder = tmp_path / "collide"
    good_corpus(folder)
    (folder / "rows.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)))
    (folder / "rows.jsonl#1").write_text(prose(99))
    where, code, err = ws.run(f"{folder}/*", "curate.min_chars=100")  # a glob: names as found
    assert (where, code) == ("curate", 2)
    assert one_line(err).endswith(
        "rows.jsonl#1' names more than one document (1 such names): narrow or rename data.source"
    )


def test_kept_files_that_are_neither_code_nor_text_are_a_warning(ws, tmp_path):
    folder = tmp_path / "mixed"
    good_corpus(folder)
    (folder / "page.html").write_text("<p>" + prose(1) + "</p>")
    where, code, err = ws.run(folder, "curate.min_chars=100", "data.include=['*.py', '*.html']")
    assert (where, code) == ("passed", 0), err
    (warning,) = ws.report()["gate"]["warnings"]
    assert warning["check"] == "expect_column_values_to_be_in_set[extension]"
    assert "1 of 11 rows failing, e.g. '.html'" in warning["observed"]


def test_generated_files_and_encoded_blobs(ws, tmp_path):
    folder = tmp_path / "generated"
    good_corpus(folder)
    (folder / "parser_tables.py").write_text("# Generated by yacc. DO NOT EDIT.\n" + module(300))
    (folder / "icons.py").write_text(
        "ICON = (\n" + "".join(f"    '{'QUJD' * 19}'\n" for _ in range(80)) + ")\n"
    )
    where, code, err = ws.run(folder)
    assert (where, code) == ("passed", 0), err
    quarantine = ws.quarantine()
    assert quarantine["parser_tables.py"]["reasons"] == ["autogenerated"]
    assert "encoded_data" in quarantine["icons.py"]["reasons"]


# --- drift against the champion's data ----------------------------------------------------------


@pytest.fixture
def champion(ws, tmp_path, mlflow_env):
    """A champion published from a 40-module corpus, its data profile stored with it."""
    from pipelines.commands.promotion import publish_model

    folder = tmp_path / "champion_corpus"
    good_corpus(folder, n=40)
    assert ws.run(folder)[:2] == ("passed", 0)
    params = load_params(
        ws.root / "none.yaml", ws.overrides(folder, [f"train.model_dir={tmp_path / 'models'}"])
    )
    make_model_dir(params.train.model_dir)
    spans = Path(params.curate.reports_dir) / SPANS_FILE  # the memorization count is of curate's spans
    write_metrics(
        params.evaluate.reports_dir, 2.0, spans_sha256=sha256_file(spans) if spans.is_file() else None
    )
    assert publish_model(params)["promoted"]
    return params


def test_a_corpus_ten_times_smaller_than_the_champions(ws, tmp_path, champion):
    folder = tmp_path / "small"
    good_corpus(folder, n=6)
    where, code, err = ws.run(folder, "curate.gate.min_documents=4")
    assert (where, code) == ("curate", 3)
    line = one_line(err)
    assert "drift_documents (observed 6 vs champion 40" in line
    checks = {c["check"]: c for c in ws.report()["drift"]["checks"]}
    assert checks["drift_documents"]["verdict"] == "block" and checks["drift_documents"]["figure"] == 0.15
    assert ws.report()["drift"]["reference"]["version"] == "1"


def test_a_corpus_in_another_language(ws, tmp_path, champion):
    folder = tmp_path / "french"
    folder.mkdir()
    words = (
        "le la les de des un une et est dans pour pas que qui sur avec nous vous sont maison ville".split()
    )
    for i in range(40):
        rng = random.Random(i)
        (folder / f"texte_{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + ".\n")
    where, code, err = ws.run(folder)
    assert (where, code) == ("curate", 3)
    line = one_line(err)
    assert "drift_byte_distribution (observed Jensen-Shannon distance" in line
    assert "drift_word_distribution" in line


def test_the_same_data_passes_drift(ws, tmp_path, champion):
    where, code, err = ws.run(tmp_path / "champion_corpus")
    assert (where, code) == ("passed", 0), err
    assert {c["verdict"] for c in ws.report()["drift"]["checks"]} == {"ok"}
