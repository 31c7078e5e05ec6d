"""Curate stage: the data gate. Decode, scrub, filter and deduplicate raw documents, then check them.

    python -m pipelines.stages.curate [--params params.yaml] [-S curate.min_chars=100]
    trainpipe curate --explain json/decoder.py     # why one document was dropped or changed

Reads data/raw/part-NNNNN.parquet (path, content bytes; never modified). Writes, shard i from raw shard i:
    data/curated/part-NNNNN.parquet    path, text, sha256, n_bytes, scrubbed (JSON: matches per kind)
    data/quarantine/part-NNNNN.parquet every dropped document, scrubbed as curate saw it, with all
                                       its reasons and the kinds of secret replaced (JSON);
                                       failed_shards.json: raw shards that could not be read, and why
    reports/curation.json             counts in and out, per reason, per scrubbed kind, duplicate
                                      clusters, drift figures, gate verdict, step timings, rules
    reports/data_metrics.json         the DVC metrics: kept documents and bytes, dropped, scrubbed
    reports/data_profile.json         the curated set's profile (publish stores it with the model)
    reports/scrubbed_spans.jsonl      each placeholder of the curated set: path, offset in the
                                      curated text, kind, the removed text's length and sha256
                                      (never the text): the memorization check's input (evaluate)
    reports/gate.json, data_docs/     the Great Expectations result and its Data Docs site

Two passes over the shards, each shard in a worker (curate.workers processes, or a Dask cluster:
data.executor), holding one shard at a time:
1. per document: decode -> scrub secrets (the built-in kinds and curate.scrub_patterns, one's own)
   -> every quality filter -> MinHash signature;
then, in this process, in path order: exact dedupe (sha256) -> near
dedupe (LSH), on hashes and signatures only;
2. per shard: the curated shard less the duplicates, the quarantine shard, spans and profile.
A raw shard's first pass is kept in data/curated.cache for the next run (analysis_cache): a shard
whose bytes, rules and code are unchanged is not analysed again.
Then the gate (pipelines/stages/data_gate.py): the GE suite's two tiers on every kept document's
columns (the text's first characters only) and drift on the shards' merged profile. If a blocking
check fails, no curated shard is left behind and the stage exits with code 3. The outputs are the
same whatever data.shard_bytes and the number of workers.
"""

import difflib
import gc
import json
import os
import pickle
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.adapters.executor import ShardRunner
from pipelines.core.data import atomic_path, read_json, sha256_hex, write_json
from pipelines.core.dedupe import NearDuplicates, signature
from pipelines.core.errors import ConfigError, GateError, SourceError
from pipelines.core.params import CurateParams, Params
from pipelines.core.quality import (
    FILTER_REASONS,
    alnum_fraction,
    decode_document,
    explain_reason,
    failing_filters,
)
from pipelines.core.scrub import KINDS, placeholder_of, scrub_spans, scrub_text
from pipelines.core.shard_cache import ShardCache, code_sha256
from pipelines.core.shards import (
    SHARD_GLOB,
    clear_shards,
    iter_documents,
    list_shards,
    read_shard,
    shard_name,
    write_shard,
)
from pipelines.core.spans import SPANS_FILE, span_record, write_spans
from pipelines.stages import data_gate as gates
from pipelines.stages.inputs import read_champion_reference

CURATION_REPORT = "curation.json"
# A few numbers for `dvc exp show`; the full report, with text and timings, stays a plain output.
DATA_METRICS_REPORT = "data_metrics.json"
PROFILE_REPORT = gates.PROFILE_ARTIFACT  # publish stores it with the model
REASONS = ("undecodable", *FILTER_REASONS, "duplicate", "near_duplicate")
QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("content", pa.binary()),
        ("reasons", pa.list_(pa.string())),
        ("duplicate_of", pa.string()),
        ("jaccard", pa.float64()),
        ("scrubbed", pa.string()),
    ]
)
# The work files between curate's two passes (under data/curated.work, removed at the end): each
# row's place in its raw shard, so a shard's quarantine keeps the raw order.
QUARANTINE_WORK_SCHEMA = QUARANTINE_SCHEMA.append(pa.field("order", pa.int64()))
CURATED_COLUMNS = ("path", "text", "sha256", "n_bytes", "scrubbed")
ANALYSED_SCHEMA = pa.schema(
    [
        ("order", pa.int64()),
        ("path", pa.string()),
        ("text", pa.string()),
        ("sha256", pa.string()),
        ("n_bytes", pa.int64()),
        ("scrubbed", pa.string()),
        ("spans", pa.string()),
    ]
)
ANALYSIS_FILES = ("analysed.parquet", "dropped.parquet")  # a shard's first-pass files, as cached
FAILED_SHARDS_FILE = "failed_shards.json"  # in the quarantine folder: raw shards that could not be read


# ---------------------------------------------------------------------------------------------
# Per document (runs in worker processes)


def analyse(record: dict, rules: CurateParams) -> dict:
    """One raw record -> its curated text and every reason to drop it (no corpus context)."""
    path, content = record["path"], record["content"]
    text, undecodable = decode_document(content) if isinstance(content, bytes) else (None, "undecodable")
    if undecodable:
        return {"path": path, "reasons": [undecodable]}
    scrubbed, spans = {}, []
    if scrubs(rules):
        text, scrubbed, spans = scrub_spans(text, rules.scrub_patterns, rules.scrub_secrets)
    reasons = failing_filters(path, text, rules)
    if reasons:
        return {"path": path, "reasons": reasons, "scrubbed": scrubbed}
    data = text.encode("utf-8")
    doc = {"path": path, "reasons": [], "text": text, "sha256": sha256_hex(data), "n_bytes": len(data)}
    doc["scrubbed"] = scrubbed
    # hashed here, in the worker: the removed text goes no further
    doc["spans"] = [span_record(path, span.offset, span.kind, span.removed) for span in spans]
    if rules.near_dedupe.enabled:
        doc["minhash"] = signature(text, rules.near_dedupe.num_perm, rules.near_dedupe.shingle_size)
    return doc


def scrubs(rules: CurateParams) -> bool:
    """Whether curation scrubs at all: the built-in rules (scrub_secrets) or one's own patterns,
    which apply whatever scrub_secrets says."""
    return rules.scrub_secrets or bool(rules.scrub_patterns)


def scrub_kinds(rules: CurateParams) -> tuple[str, ...]:
    """The kinds the curation report counts: the built-in ones, then one's own patterns by name."""
    return (*KINDS, *sorted(rules.scrub_patterns))


# ---------------------------------------------------------------------------------------------
# Per shard (in workers: pipelines/adapters/executor.py). Each writes files under the work folder
# and returns only what the corpus-level steps need: a retried shard rewrites the same files.


def analyse_shard(task: dict) -> dict:
    """Shard i of the raw snapshot: every document analysed. Those that pass the filters go to
    analysed-i.parquet (text, hashes, scrub counts, spans), those that fail to dropped-i.parquet
    (the quarantine's rows, scrubbed). Returns, in order, per document: path, reasons, and for
    those that pass their sha256, MinHash signature, scrub counts. A shard that cannot be read
    returns its error, to be reported, not raised: one bad shard does not stop the run.

    A shard analysed by an earlier run under the same rules and code is not analysed again: its
    files and rows come from task["cache"] (analysis_cache)."""
    index, work = task["index"], Path(task["work"])
    cache = ShardCache(task["cache"], task["salt"])
    try:
        key = cache.key(task["shard"])
    except OSError as exc:
        return {"index": index, "failed": f"{type(exc).__name__}: {exc}", "rows": [], "bytes_in": 0}
    files = {name: work / f"{name.split('.')[0]}-{index:05d}.parquet" for name in ANALYSIS_FILES}
    reused = cache.fetch(key, files)
    if reused is not None:
        return {**reused, "index": index, "key": key, "reused": True}
    analysed = _analyse_shard(task)
    if "failed" not in analysed:
        cache.store(key, files, {k: analysed[k] for k in ("rows", "bytes_in")})
    return {**analysed, "key": key}


def _analyse_shard(task: dict) -> dict:
    index, rules, work = task["index"], task["rules"], Path(task["work"])
    try:
        records = read_shard(task["shard"])
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises many types for a corrupt file
        return {"index": index, "failed": f"{type(exc).__name__}: {exc}", "rows": [], "bytes_in": 0}
    rows, passing, dropped = [], [], []
    # The per-document work allocates millions of small objects and makes no reference cycles:
    # the collector, walking them all again and again, would cost more than the work.
    gc.disable()
    try:
        for order, record in enumerate(records):
            doc = analyse(record, rules)
            if doc["reasons"]:
                content, scrubbed = quarantine_content(
                    record["content"] if isinstance(record["content"], bytes) else None,
                    rules.scrub_secrets,
                    rules.scrub_patterns,
                )
                dropped.append(
                    quarantine_row(order, doc["path"], content, doc["reasons"], None, None, scrubbed)
                )
                rows.append({"path": doc["path"], "reasons": doc["reasons"]})
                continue
            passing.append(
                {
                    "order": order,
                    **{k: doc[k] for k in ("path", "text", "sha256", "n_bytes")},
                    "scrubbed": json.dumps(doc["scrubbed"], sort_keys=True),
                    "spans": json.dumps(doc["spans"]),
                }
            )
            rows.append(
                {
                    "path": doc["path"],
                    "reasons": [],
                    "sha256": doc["sha256"],
                    "n_bytes": doc["n_bytes"],
                    "minhash": doc.get("minhash"),
                    "scrubbed": doc["scrubbed"],
                    "spans": len(doc["spans"]),
                }
            )
    finally:
        gc.enable()
    write_table(passing, ANALYSED_SCHEMA, work / f"analysed-{index:05d}.parquet")
    write_table(dropped, QUARANTINE_WORK_SCHEMA, work / f"dropped-{index:05d}.parquet")
    bytes_in = sum(len(r["content"]) for r in records if isinstance(r["content"], bytes))
    return {"index": index, "rows": rows, "bytes_in": bytes_in}


def finish_shard(task: dict) -> dict:
    """Shard i once the corpus-level dedupe has decided: its curated shard (what passed less the
    duplicates), its quarantine shard (the filters' rejects and the duplicates, in the raw order),
    its spans, its profile (to a file: a profile's word counts are large), and per kept document
    the columns the gate's frame needs. All under the work folder, until the gate has passed."""
    index, work = task["index"], Path(task["work"])
    duplicates: dict[str, dict] = task["duplicates"]
    # a shard that could not be read has neither file: nothing of it to write
    analysed, dropped = work / f"analysed-{index:05d}.parquet", work / f"dropped-{index:05d}.parquet"
    passing = read_shard(analysed) if analysed.exists() else []
    kept = [doc for doc in passing if doc["path"] not in duplicates]
    if kept:
        write_shard([{k: doc[k] for k in CURATED_COLUMNS} for doc in kept], work / "curated", index)
    quarantined = (read_shard(dropped) if dropped.exists() else []) + [
        quarantine_row(
            doc["order"],
            doc["path"],
            doc["text"].encode("utf-8"),
            duplicates[doc["path"]]["reasons"],
            duplicates[doc["path"]]["duplicate_of"],
            duplicates[doc["path"]]["jaccard"],
            json.loads(doc["scrubbed"]),
        )
        for doc in passing
        if doc["path"] in duplicates
    ]
    quarantined.sort(
        key=lambda row: row["order"]
    )  # the order column itself depends on the sharding: not kept
    if quarantined:
        write_table(quarantined, QUARANTINE_SCHEMA, work / "quarantine" / shard_name(index))
    with atomic_path(work / f"spans-{index:05d}.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
        for doc in kept:
            for span in json.loads(doc["spans"]):
                fh.write(json.dumps(span) + "\n")
    texts = [doc["text"] for doc in kept]
    with atomic_path(work / f"profile-{index:05d}.pickle") as tmp:
        tmp.write_bytes(pickle.dumps(gates.text_profile(texts)))
    return {
        "index": index,
        "gate_rows": [
            {
                "path": doc["path"],
                "text": doc["text"][: gates.TEXT_PREVIEW_CHARS],
                "sha256": doc["sha256"],
                "n_bytes": doc["n_bytes"],
                "alnum_fraction": alnum_fraction(doc["text"]),
            }
            for doc in kept
        ],
    }


def quarantine_row(order, path, content, reasons, duplicate_of, jaccard, scrubbed) -> dict:
    return {
        "order": order,
        "path": path,
        "content": content,
        "reasons": reasons,
        "duplicate_of": duplicate_of,
        "jaccard": jaccard,
        "scrubbed": json.dumps(scrubbed, sort_keys=True),
    }


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


# ---------------------------------------------------------------------------------------------
# The corpus-level core


class Deduplicator:
    """Documents that passed the filters, offered in the corpus's order: the first of each exact
    (sha256) or near (MinHash LSH) cluster stays. Holds a hash and a signature per document kept,
    not its text: the one step that sees the whole corpus at once."""

    def __init__(self, rules: CurateParams):
        self.rules = rules
        self.first_with: dict[str, str] = {}
        self.near = NearDuplicates(rules.near_dedupe.threshold, rules.near_dedupe.num_perm)
        self.clusters: dict[str, list[dict]] = {}

    def offer(self, doc: dict) -> dict | None:
        """None if doc stays, else its quarantine entry: path, reasons, duplicate_of, jaccard."""
        original = self.first_with.setdefault(doc["sha256"], doc["path"])
        if original != doc["path"]:
            self.clusters.setdefault(original, []).append(
                {"path": doc["path"], "kind": "exact", "jaccard": 1.0}
            )
            return {"path": doc["path"], "reasons": ["duplicate"], "duplicate_of": original, "jaccard": 1.0}
        hit = self.near.offer(doc["path"], doc["minhash"]) if self.rules.near_dedupe.enabled else None
        if not hit:
            return None
        self.clusters.setdefault(hit[0], []).append(
            {"path": doc["path"], "kind": "near", "jaccard": round(hit[1], 3)}
        )
        return {"path": doc["path"], "reasons": ["near_duplicate"], "duplicate_of": hit[0], "jaccard": hit[1]}


@dataclass
class CurationResult:
    dropped: list[dict]  # path, reasons, duplicate_of, jaccard; in the corpus's order
    bytes_in: int
    kept_documents: int = 0
    kept_bytes: int = 0
    kept: list[dict] = field(default_factory=list)  # curate_documents only: the kept documents themselves
    clusters: dict[str, list[dict]] = field(default_factory=dict)  # kept path -> its duplicates
    scrubbed: dict[str, int] = field(default_factory=dict)  # matches replaced per kind or name (kept docs)
    scrubbed_documents: int = 0
    scrubbed_spans: int = 0  # lines of SPANS_FILE
    failed_shards: list[dict] = field(default_factory=list)  # shard, reason: shards that could not be read
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def documents_in(self) -> int:
        return self.kept_documents + len(self.dropped)

    def counts(self) -> dict[str, int]:
        """Dropped documents per reason; a document with two reasons counts under both."""
        counts = dict.fromkeys(REASONS, 0)
        for doc in self.dropped:
            for reason in doc["reasons"]:
                counts[reason] += 1
        return counts

    def keep(self, doc: dict) -> None:
        self.kept_documents += 1
        self.kept_bytes += doc["n_bytes"]
        self.scrubbed_documents += bool(doc["scrubbed"])
        self.scrubbed_spans += doc["spans"] if isinstance(doc["spans"], int) else len(doc["spans"])
        for kind, n in doc["scrubbed"].items():
            self.scrubbed[kind] += n


def dedupe(analysed: Iterable[dict], rules: CurateParams, result: CurationResult) -> Iterator[dict]:
    """Analysed documents in the corpus's order -> the ones kept (yielded); the rest dropped into
    result, with their duplicate clusters."""
    deduplicator = Deduplicator(rules)
    for doc in analysed:
        if doc["reasons"]:
            result.dropped.append(
                {"path": doc["path"], "reasons": doc["reasons"], "duplicate_of": None, "jaccard": None}
            )
            continue
        duplicate = deduplicator.offer(doc)
        if duplicate:
            result.dropped.append(duplicate)
            continue
        result.keep(doc)
        yield doc
    result.clusters = deduplicator.clusters


def curate_documents(records: list[dict], rules: CurateParams) -> CurationResult:
    """Records in any order -> kept and dropped, in this process (path order decides who stays):
    the stage's steps on a corpus small enough to hold, for tests and benchmarks."""
    records = sorted(records, key=lambda r: r["path"])
    started = time.perf_counter()
    docs = [analyse(record, rules) for record in records]
    analysed = time.perf_counter()
    result = CurationResult(
        dropped=[],
        bytes_in=sum(len(r["content"]) for r in records if isinstance(r["content"], bytes)),
        scrubbed=dict.fromkeys(scrub_kinds(rules), 0),
    )
    result.kept = [
        {k: doc[k] for k in ("path", "text", "sha256", "n_bytes", "scrubbed", "spans")}
        for doc in dedupe(docs, rules, result)
    ]
    result.timings = {
        "analyse_s": round(analysed - started, 3),
        "dedupe_s": round(time.perf_counter() - analysed, 3),
    }
    return result


def curate_shards(params: Params, work: Path, runner: ShardRunner) -> tuple[CurationResult, list[dict]]:
    """The raw snapshot's shards -> (the result, each shard's finish_shard result), every output
    under work. Shards run on data.executor; the dedupe, between the two passes, in this process."""
    rules, data = params.curate, params.data
    shards = list_shards(data.raw_dir)
    if not shards:
        raise SourceError(f"{data.raw_dir} holds no {SHARD_GLOB}: run `trainpipe ingest` first")
    started = time.perf_counter()
    cache = analysis_cache(params)
    tasks = [
        {
            "index": i,
            "shard": str(path.resolve()),
            "work": str(work),
            "rules": rules,
            "cache": str(cache.folder),
            "salt": cache.salt,
        }
        for i, path in enumerate(shards)
    ]
    analysed = runner.map(analyse_shard, tasks, "shards analysed")
    cache.keep_only(part["key"] for part in analysed if "key" in part)
    deduped = time.perf_counter()
    result = CurationResult(
        dropped=[],
        bytes_in=sum(part["bytes_in"] for part in analysed),
        scrubbed=dict.fromkeys(scrub_kinds(rules), 0),
        failed_shards=[
            {"shard": shards[p["index"]].name, "reason": p["failed"]} for p in analysed if "failed" in p
        ],
    )
    _check_unique_paths((row["path"] for part in analysed for row in part["rows"]), data.raw_dir)
    duplicates: list[dict[str, dict]] = [{} for _ in shards]
    where = {}
    for part in analysed:
        for row in part["rows"]:
            where[row["path"]] = part["index"]
    # path order decides who stays, as curate_documents does: the same whatever the shards or the source's order
    in_path_order = sorted((row for part in analysed for row in part["rows"]), key=lambda row: row["path"])
    for _kept in dedupe(in_path_order, rules, result):
        pass  # the counts are result's; what a shard keeps, finish_shard finds from its duplicates
    for entry in result.dropped:
        if "duplicate" in entry["reasons"] or "near_duplicate" in entry["reasons"]:
            duplicates[where[entry["path"]]][entry["path"]] = entry
    reused = sum(1 for part in analysed if part.get("reused"))
    del analysed, where
    finishing = time.perf_counter()
    tasks = [{"index": i, "work": str(work), "duplicates": duplicates[i]} for i in range(len(shards))]
    finished = runner.map(finish_shard, tasks, "shards written")
    result.timings = {
        "shards_reused": reused,
        "analyse_s": round(deduped - started, 3),
        "dedupe_s": round(finishing - deduped, 3),
        "write_s": round(time.perf_counter() - finishing, 3),
    }
    return result, finished


def analysis_cache(params: Params) -> ShardCache:
    """Where the first pass of each raw shard is kept for the next run: beside the curated folder
    (data/curated.cache), holding the last run's shards only. Its key: the shard's bytes, the rules
    the analysis applies (curate's section less the gate, the workers and the reports folder), the
    project's code and the versions of the libraries that analyse."""
    curated = Path(params.data.curated_dir).resolve()
    rules = params.curate.model_dump_json(exclude={"gate", "workers", "reports_dir"})
    libraries = " ".join(f"{name}=={version(name)}" for name in ("datasketch", "numpy", "pyarrow"))
    salt = sha256_hex(f"{rules}\0{code_sha256()}\0{libraries}\0{sys.version}")
    return ShardCache(curated.with_name(curated.name + ".cache"), salt)


def merged_profile(work: Path, shards: int) -> dict:
    """The curated set's profile: the shards' profiles merged, read one at a time."""
    parts = (pickle.loads((work / f"profile-{i:05d}.pickle").read_bytes()) for i in range(shards))
    return gates.merge_profiles(parts)


def quarantine_content(
    content: bytes | None, scrub: bool, patterns: dict[str, str] | None = None
) -> tuple[bytes | None, dict[str, int]]:
    """(what the quarantine stores for one raw document, secrets replaced per kind). scrub: the
    built-in rules; patterns, one's own, apply either way."""
    if content is None or not (scrub or patterns):
        return content, {}
    text, undecodable = decode_document(content)
    if undecodable:
        text, scrubbed = scrub_text(content.decode("latin-1"), patterns, scrub)
        return text.encode("latin-1"), scrubbed
    text, scrubbed = scrub_text(text, patterns, scrub)
    return text.encode("utf-8"), scrubbed


def summarize(result: CurationResult, rules: CurateParams, gate: dict, drift: dict) -> dict:
    examples: dict[str, list[str]] = {}
    for doc in result.dropped:
        for reason in doc["reasons"]:
            paths = examples.setdefault(reason, [])
            if len(paths) < 10:
                paths.append(doc["path"])
    clusters = sorted(result.clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {
        "documents_in": result.documents_in,
        "bytes_in": result.bytes_in,
        "kept": {"documents": result.kept_documents, "bytes": result.kept_bytes},
        "dropped_documents": len(result.dropped),
        "dropped": result.counts(),
        "dropped_examples": examples,
        "failed_shards": result.failed_shards,
        "scrubbed": result.scrubbed,
        "scrubbed_documents": result.scrubbed_documents,
        "scrubbed_spans": result.scrubbed_spans,
        "duplicate_clusters": [{"kept": path, "copies": copies} for path, copies in clusters],
        "drift": drift,
        "gate": gate,
        "timings": result.timings,
        "rules": rules.model_dump(exclude={"gate", "reports_dir", "workers"}),
    }


def data_metrics(summary: dict) -> dict:
    """The curation's DVC metrics, what changes the training data first."""
    return {
        "kept_documents": summary["kept"]["documents"],
        "kept_bytes": summary["kept"]["bytes"],
        "dropped_documents": summary["dropped_documents"],
        "scrubbed_documents": summary["scrubbed_documents"],
    }


def check_drift(profile: dict, params: Params) -> tuple[dict, list[dict], list[dict]]:
    """(drift report, blocking failures, warnings) against the champion's profile, as the inputs
    stage recorded it in champion.json (a DVC dependency of this stage: never the registry itself,
    so a cached verdict cannot belong to another champion). An unreachable registry is a warning."""
    drift_params = params.curate.gate.drift
    if not drift_params.enabled:
        return (
            {"reference": None, "note": "drift checks are off (curate.gate.drift.enabled)", "checks": []},
            [],
            [],
        )
    recorded = read_champion_reference(params)
    source = {k: recorded[k] for k in ("model", "version", "run_id", "profile_sha256") if k in recorded}
    if recorded["status"] == "unreachable":
        warning = {"check": "drift", "observed": recorded["note"], "need": "the champion's data profile"}
        return {"reference": source, "note": recorded["note"], "checks": []}, [], [warning]
    if recorded["status"] != "champion":
        return {"reference": source or None, "note": recorded["note"], "checks": []}, [], []
    checks = gates.drift_checks(profile, recorded["profile"], drift_params)
    failed = [c for c in checks if c["verdict"] == "block"]
    warned = [c for c in checks if c["verdict"] == "warn"]
    return {"reference": source, "note": None, "checks": checks}, failed, warned


def run(params: Params) -> dict:
    """Curate the raw snapshot shard by shard, gate it; write the curated shards only if the gate passed."""
    rules = params.curate
    curated_dir = Path(params.data.curated_dir)
    quarantine_dir = Path(params.data.quarantine_dir)
    reports_dir = Path(rules.reports_dir)
    # Whatever happens below, no stale curated table (or spans of one) may stay for downstream stages.
    clear_shards(curated_dir)
    (reports_dir / SPANS_FILE).unlink(missing_ok=True)
    # Beside the output, so a cluster's workers reach it where they reach the shards (a shared file system)
    work = curated_dir.resolve().with_name(curated_dir.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _curate(params, work, curated_dir, quarantine_dir, reports_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _curate(params: Params, work: Path, curated_dir: Path, quarantine_dir: Path, reports_dir: Path) -> dict:
    rules = params.curate
    # Importing the gate's Great Expectations takes seconds of one core: done while the workers analyse
    importer = threading.Thread(target=gates.import_suite, daemon=True)
    importer.start()
    with ShardRunner(params.data.executor, rules.workers) as runner:
        result, finished = curate_shards(params, work, runner)
    clear_shards(quarantine_dir)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    for path in list_shards(work / "quarantine"):
        os.replace(path, quarantine_dir / path.name)
    write_json(quarantine_dir / FAILED_SHARDS_FILE, result.failed_shards)

    started = time.perf_counter()
    profile = merged_profile(work, len(finished))
    write_json(reports_dir / PROFILE_REPORT, profile)
    drift, drift_failed, drift_warned = check_drift(profile, params)
    result.timings["profile_drift_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    importer.join()
    try:
        frame = gates.gate_frame([row for part in finished for row in part["gate_rows"]])
        del finished
        expectations = gates.gate_expectations(rules, result.documents_in, frame["source"].nunique())
        gate = gates.run_suite(frame, expectations, reports_dir)
    except Exception as exc:
        error = {"passed": False, "error": f"the gate did not run: {type(exc).__name__}: {exc}"}
        write_json(reports_dir / CURATION_REPORT, summarize(result, rules, error, drift))
        raise
    result.timings["gate_s"] = round(time.perf_counter() - started, 3)
    gate.failed += [_drift_line(c) for c in drift_failed]
    gate.warnings += [_drift_line(c) for c in drift_warned]
    if result.failed_shards:
        gate.warnings.append(
            {
                "check": "readable_shards",
                "observed": f"{len(result.failed_shards)} raw shards could not be read "
                f"({result.failed_shards[0]['shard']}: {result.failed_shards[0]['reason']})",
                "need": f"every shard (their names and errors: {quarantine_dir / FAILED_SHARDS_FILE})",
            }
        )
    gate.passed = not gate.failed
    summary = summarize(result, rules, gate.to_dict(), drift)
    write_json(reports_dir / CURATION_REPORT, summary)
    write_json(reports_dir / DATA_METRICS_REPORT, data_metrics(summary), sort_keys=False)
    if not gate.passed:
        raise GateError(gate.message())
    spans = (
        json.loads(line)
        for path in sorted(work.glob("spans-*.jsonl"))
        for line in path.open(encoding="utf-8")
    )
    write_spans(spans, reports_dir / SPANS_FILE)
    curated_dir.mkdir(parents=True, exist_ok=True)
    for path in list_shards(work / "curated"):
        os.replace(path, curated_dir / path.name)
    return summary


def _check_unique_paths(paths: Iterable[str], raw_dir: str) -> None:
    """Every later step keys documents by path (dedupe, quarantine, --explain): two documents under
    one name, which a glob over FILE.jsonl and a file named FILE.jsonl#ROW can give, stop here."""
    counts = Counter(paths)
    repeated = sorted(path for path, n in counts.items() if n > 1)
    if repeated:
        raise SourceError(
            f"{raw_dir}: {repeated[0]!r} names more than one document ({len(repeated)} such names): "
            "narrow or rename data.source"
        )


def _drift_line(check: dict) -> dict:
    if "figure" not in check:  # a drift check that could not run says why in its own words
        return {"check": check["check"], "observed": check["observed"], "need": check["need"]}

    def figure(value) -> str:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"

    observed = (
        f"{figure(check['observed'])} vs champion {figure(check['champion'])}, ratio {check['figure']:g}"
    )
    if check["check"].endswith("distribution"):
        observed = f"Jensen-Shannon distance {check['figure']:g} from the champion's"
    return {"check": check["check"], "observed": observed, "need": check["need"]}


# ---------------------------------------------------------------------------------------------
# Explain one document


def explain(path: str, params: Params) -> str:
    """Why the last curation dropped or changed one document: read from its outputs, with the
    figure behind each reason recomputed from the raw bytes under the current rules."""
    rules = params.curate
    quarantine = Path(params.data.quarantine_dir)
    curated = Path(params.data.curated_dir)
    report = Path(rules.reports_dir) / CURATION_REPORT
    if not (quarantine / FAILED_SHARDS_FILE).exists() or not report.exists():
        raise ConfigError(
            f"no curation to explain ({quarantine} or {report} missing): run `trainpipe curate` first"
        )
    found = find_document(quarantine, path)
    if found:
        doc, shard = found
        lines = [f"{path}: dropped; quarantined in {shard}"]
        text, _ = decode_document(doc["content"]) if doc["content"] is not None else (None, None)
        for reason in doc["reasons"]:
            if reason in ("duplicate", "near_duplicate"):
                how = (
                    "an exact copy"
                    if reason == "duplicate"
                    else f"a near copy (estimated Jaccard {doc['jaccard']:.3f})"
                )
                lines.append(
                    f"  - {reason}: {how} of {doc['duplicate_of']}, which was kept (the first in path order)"
                )
            else:
                lines.append(f"  - {reason}: {explain_reason(reason, path, text, rules)}")
        return "\n".join(lines)
    summary = read_json(report)
    kept = find_document(curated, path)
    if kept:
        doc, shard = kept
        scrubbed = json.loads(doc.get("scrubbed") or "{}")
        lines = [f"{path}: kept ({doc['n_bytes']} bytes) in {shard}"]
        if scrubbed:
            changes = ", ".join(
                f"{n} {kind} -> {placeholder_of(kind)}" for kind, n in sorted(scrubbed.items())
            )
            lines.append(f"  - changed: secrets and personal data replaced: {changes}")
        else:
            lines.append("  - unchanged apart from newline normalisation")
        for cluster in summary.get("duplicate_clusters", []):
            if cluster["kept"] == path:
                copies = ", ".join(
                    f"{c['path']} ({c['kind']}, {c['jaccard']:.2f})" for c in cluster["copies"]
                )
                lines.append(f"  - kept for its duplicate cluster, whose other copies were dropped: {copies}")
        return "\n".join(lines)
    if not summary.get("gate", {}).get("passed", False) and not list_shards(curated):
        raise ConfigError(
            f"{path} passed every filter, but the gate failed, so nothing was curated: see {report}"
        )
    raw_paths = [r["path"] for r in iter_documents(params.data.raw_dir, columns=["path"])]
    if path in raw_paths:
        raise ConfigError(
            f"{path} is in the raw snapshot but neither curated nor quarantined: the outputs are from "
            "another curation; run `trainpipe curate` (or `dvc checkout`)"
        )
    close = difflib.get_close_matches(path, raw_paths, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"{path} is not a document of the raw snapshot {params.data.raw_dir}{hint}")


def find_document(folder: Path, path: str) -> tuple[dict, Path] | None:
    """(the row of one document, the shard that holds it) from a folder of shards, or None."""
    for shard in list_shards(folder):
        rows = pq.read_table(shard, filters=[("path", "==", path)]).to_pylist()
        if rows:
            return rows[0], shard
    return None


def describe(summary: dict, params: Params) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items() if v) or "none"
    scrubbed = ", ".join(f"{k} {v}" for k, v in summary["scrubbed"].items() if v) or "none"
    warnings = summary["gate"].get("warnings") or []
    lines = [
        f"curated {summary['kept']['documents']}/{summary['documents_in']} documents "
        f"({summary['kept']['bytes'] / 1e6:.1f} of {summary['bytes_in'] / 1e6:.1f} MB); dropped: {dropped}; "
        f"scrubbed: {scrubbed}; {len(summary['duplicate_clusters'])} duplicate clusters",
        *[f"warning: {w['check']} (observed {w['observed']}, need {w['need']})" for w in warnings],
        *(
            [f"{reused} raw shards unchanged since the last run: their analysis reused"]
            if (reused := summary.get("timings", {}).get("shards_reused"))
            else []
        ),
        _drift_summary(summary.get("drift") or {}),
        f"gate passed -> {Path(params.data.curated_dir) / SHARD_GLOB}; "
        f"quarantine: {Path(params.data.quarantine_dir) / SHARD_GLOB}",
    ]
    return "\n".join(lines)


def _drift_summary(drift: dict) -> str:
    if drift.get("note"):
        return f"drift: {drift['note']}"
    reference = drift.get("reference") or {}
    verdicts = ", ".join(
        f"{c['check'].removeprefix('drift_')} {c['figure']:g} {c['verdict']}" for c in drift["checks"]
    )
    return f"drift against champion v{reference.get('version')}: {verdicts}"


def main(argv: list[str] | None = None) -> None:
    from pipelines.stages.entry import stage_main

    stage_main("curate", run, describe, argv)


if __name__ == "__main__":
    main()
