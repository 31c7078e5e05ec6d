"""The data stages in shards: the same outputs whatever the shard size and the number of workers,
a shard that cannot be read quarantined with its reason, a worker killed mid-shard retried.

One small real corpus (standard-library packages, with planted duplicates, secrets and bad files),
run through ingest, curate and tokenize as one shard in one process, and as many small shards on
four workers."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from dask_cluster import dask_cluster

from pipelines.core.data import read_json, write_json
from pipelines.core.params import load_params
from pipelines.core.shards import iter_documents, list_shards
from pipelines.stages import curate, ingest, inputs, tokenize

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ("json", "email", "http", "urllib", "logging")
KEY = "AKIA" + "QWERTYUIOPASDFGH"  # an AWS key id, built here so no literal looks live


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 1.5 MB of real modules, plus near and exact copies, a planted key, bad files."""
    root = tmp_path_factory.mktemp("corpus")
    for package in PACKAGES:
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "copies").mkdir()
    shutil.copy(root / "json" / "decoder.py", root / "copies" / "decoder.py")  # exact copy
    text = (root / "json" / "encoder.py").read_text()
    (root / "copies" / "encoder.py").write_text(text.replace("indent", "indentation", 1))  # near copy
    (root / "email" / "keys.py").write_text(
        f'AWS_KEY = "{KEY}"\n' + (root / "email" / "utils.py").read_text()
    )
    (root / "email" / "legacy.py").write_bytes(b"s = '\xe9t\xe9'\n" * 40)  # latin-1, undeclared
    (root / "tiny.py").write_text("x = 1\n")
    return root


def stage_params(root: Path, corpus: Path, *overrides: str):
    params = load_params(
        root / "none.yaml",
        overrides=[
            f"data.source={corpus}",
            f"data.raw_dir={root / 'raw'}",
            f"data.curated_dir={root / 'curated'}",
            f"data.quarantine_dir={root / 'quarantine'}",
            f"data.inputs_dir={root / 'inputs'}",
            f"data.tokens_dir={root / 'tokens'}",
            f"curate.reports_dir={root / 'reports'}",
            "curate.gate.min_documents=5",
            "curate.gate.min_bytes=1000",
            "tokenize.vocab_size=300",
            *overrides,
        ],
    )
    write_json(Path(params.data.inputs_dir) / inputs.CHAMPION_FILE, inputs.champion_reference(params)[0])
    return params


def rows_sha256(folder: Path) -> str:
    """One hash over every row of a folder's shards, in order: equal for equal tables however cut."""
    digest = hashlib.sha256()
    for row in iter_documents(folder):
        digest.update(json.dumps(row, sort_keys=True, default=lambda b: b.hex()).encode() + b"\n")
    return digest.hexdigest()


def outputs(root: Path) -> dict:
    report = read_json(root / "reports" / curate.CURATION_REPORT)
    del report["timings"]
    report["gate"] = {k: v for k, v in report["gate"].items() if k not in ("report", "data_docs")}  # paths
    return {
        "curated": rows_sha256(root / "curated"),
        "quarantine": rows_sha256(root / "quarantine"),
        "curation": report,
        "profile": (root / "reports" / curate.PROFILE_REPORT).read_text(),
        "metrics": (root / "reports" / curate.DATA_METRICS_REPORT).read_text(),
        "spans": (root / "reports" / "scrubbed_spans.jsonl").read_text(),
        **{
            name: (root / "tokens" / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")
        },
        "tokens_meta": (root / "tokens" / "meta.json").read_text(),
    }


def run_stages(params) -> None:
    for stage in (ingest, curate, tokenize):
        stage.run(params)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, corpus) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("one")
    params = stage_params(
        root, corpus, "data.shard_bytes=100000000", "curate.workers=1", "tokenize.workers=1"
    )
    run_stages(params)
    return root, outputs(root)


def test_many_shards_on_four_workers_give_what_one_shard_in_one_process_gives(tmp_path, corpus, one_shard):
    root, expected = one_shard
    assert len(list_shards(root / "raw")) == 1
    params = stage_params(
        tmp_path, corpus, "data.shard_bytes=60000", "curate.workers=4", "tokenize.workers=4"
    )
    run_stages(params)
    assert len(list_shards(tmp_path / "raw")) > 8
    got = outputs(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], name
    # and the corpus exercised what it was built for
    summary = expected["curation"]
    assert summary["dropped"]["duplicate"] == 1 and summary["dropped"]["near_duplicate"] >= 1
    assert summary["dropped"]["undecodable"] == 1 and summary["dropped"]["too_short"] >= 1
    assert summary["scrubbed"]["api_key"] >= 1 and expected["spans"].count("email/keys.py") >= 1
    assert KEY.encode() not in b"".join(p.read_bytes() for p in list_shards(root / "curated"))


def test_a_shard_that_cannot_be_read_is_reported_and_the_rest_curated(tmp_path, corpus, one_shard):
    params = stage_params(tmp_path, corpus, "data.shard_bytes=200000", "curate.workers=2")
    ingest.run(params)
    shards = list_shards(tmp_path / "raw")
    broken = shards[1]
    documents_in = sum(1 for _ in iter_documents(tmp_path / "raw", columns=["path"]))
    lost = pq.ParquetFile(broken).metadata.num_rows
    with broken.open("r+b") as fh:  # a torn write: the footer gone
        fh.truncate(broken.stat().st_size // 2)
    summary = curate.run(params)
    assert (
        summary["failed_shards"] == [{"shard": broken.name, "reason": summary["failed_shards"][0]["reason"]}]
        and "Parquet" in summary["failed_shards"][0]["reason"]
    )
    assert read_json(tmp_path / "quarantine" / curate.FAILED_SHARDS_FILE) == summary["failed_shards"]
    assert [w["check"] for w in summary["gate"]["warnings"]].count("readable_shards") == 1
    assert summary["documents_in"] == documents_in - lost
    assert list_shards(tmp_path / "curated")  # the others passed the gate


def test_a_rerun_after_one_file_changed_analyses_only_the_shards_it_touched(tmp_path, corpus):
    """Ingest's boundaries follow the documents, so the other raw shards keep their bytes, and
    curate takes their first pass from data/curated.cache; the outputs are a fresh run's."""
    source = tmp_path / "corpus"
    shutil.copytree(corpus, source)
    settings = ("data.shard_bytes=60000", "curate.workers=2")
    params = stage_params(tmp_path / "a", source, *settings)
    ingest.run(params)
    shards = len(list_shards(tmp_path / "a" / "raw"))
    assert curate.run(params)["timings"]["shards_reused"] == 0
    assert curate.run(params)["timings"]["shards_reused"] == shards  # nothing changed: nothing analysed
    changed = source / "json" / "decoder.py"
    changed.write_text(changed.read_text() + "\n\ndef added():\n    return 'a change'\n")
    ingest.run(params)
    reused = curate.run(params)["timings"]["shards_reused"]
    assert shards - 2 <= reused < len(list_shards(tmp_path / "a" / "raw"))
    fresh = stage_params(tmp_path / "b", source, *settings)
    ingest.run(fresh)
    curate.run(fresh)
    for folder in ("curated", "quarantine"):
        assert rows_sha256(tmp_path / "a" / folder) == rows_sha256(tmp_path / "b" / folder), folder
    for report in (curate.PROFILE_REPORT, curate.DATA_METRICS_REPORT, "scrubbed_spans.jsonl"):
        assert (tmp_path / "a" / "reports" / report).read_bytes() == (
            tmp_path / "b" / "reports" / report
        ).read_bytes()
    # the cache holds this run's shards only
    assert len(list((tmp_path / "a" / "curated.cache").iterdir())) == len(list_shards(tmp_path / "a" / "raw"))


def test_a_worker_killed_mid_shard_loses_and_repeats_no_document(tmp_path, corpus, one_shard):
    """The stage as DVC runs it; one of its two workers killed while it works: the shards it held
    go to a new worker, and the outputs are those of the run nobody killed."""
    _, expected = one_shard
    params = stage_params(tmp_path, corpus, "data.shard_bytes=60000", "curate.workers=2")
    ingest.run(params)
    overrides = [
        f"data.{key}={getattr(params.data, key)}"
        for key in ("raw_dir", "curated_dir", "quarantine_dir", "inputs_dir")
    ] + [
        f"curate.reports_dir={params.curate.reports_dir}",
        "curate.gate.min_documents=5",
        "curate.gate.min_bytes=1000",
    ]
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipelines.stages.curate", "--params", str(tmp_path / "none.yaml")]
        + [a for o in overrides + ["curate.workers=2", "data.shard_bytes=60000"] for a in ("-S", o)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    work = tmp_path / "curated.work"  # where the shards' first pass writes, one file a shard
    deadline = time.monotonic() + 120
    while killed is None and stage.poll() is None and time.monotonic() < deadline:
        if list(work.glob("analysed-*.parquet")):  # the workers are in the middle of the shards
            workers = [
                c for c in psutil.Process(stage.pid).children() if "spawn_main" in " ".join(c.cmdline())
            ]
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed = workers[0].pid
        time.sleep(0.01)
    out, err = stage.communicate(timeout=300)
    assert killed, f"no worker seen to kill: {out}{err}"
    assert stage.returncode == 0, err
    assert "a worker died" in out + err
    assert rows_sha256(tmp_path / "curated") == expected["curated"]
    assert rows_sha256(tmp_path / "quarantine") == expected["quarantine"]


# ---- the same stages on a Dask cluster (data.executor=dask) ------------------------------------


@pytest.mark.slow
def test_curate_and_tokenize_on_a_dask_cluster_give_the_embedded_executors_outputs(
    tmp_path, corpus, one_shard, monkeypatch
):
    """`dask scheduler` and `dask worker` on this machine, the stages pointed at them through
    DASK_SCHEDULER_ADDRESS; one worker process killed while it works on the shards."""
    _, expected = one_shard
    params = stage_params(tmp_path, corpus, "data.shard_bytes=60000", "data.executor=dask")
    with dask_cluster(2, tmp_path=tmp_path) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)
        ingest.run(params)
        work = tmp_path / "curated.work"
        killer = KillOnFirstShard(work, cluster.worker_pids.values())
        killer.start()
        curate.run(params)
        killer.join()
        tokenize.run(params)
        assert killer.killed, "no worker was killed: the shards finished before any was seen"
        assert cluster.live_worker_pids(), "the nanny replaced the killed worker"
    got = outputs(tmp_path)
    for name in expected:
        assert got[name] == expected[name], name


def test_a_dask_executor_without_its_address_is_one_clear_line(tmp_path, corpus, monkeypatch):
    from pipelines.core.errors import ConfigError

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    params = stage_params(tmp_path, corpus, "data.executor=dask")
    ingest.run(params)
    with pytest.raises(ConfigError, match="DASK_SCHEDULER_ADDRESS is not set"):
        curate.run(params)
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="no Dask scheduler answers"):
        curate.run(params)


class KillOnFirstShard(threading.Thread):
    """SIGKILLs one of the given worker processes once the first shard's work file appears."""

    def __init__(self, work: Path, pids):
        super().__init__(daemon=True)
        self.work, self.pids, self.killed = work, list(pids), None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(self.work.glob("analysed-*.parquet")):
            time.sleep(0.01)
        if list(self.work.glob("analysed-*.parquet")):
            os.kill(self.pids[0], signal.SIGKILL)
            self.killed = self.pids[0]
