"""Curate stage: the data gate. Decode, scrub, filter and deduplicate raw documents, then check them.

    python -m pipelines.stages.curate [--params params.yaml] [-S curate.min_chars=100]
    trainpipe curate --explain json/decoder.py     # why one document was dropped or changed

Reads data/raw/documents.parquet (path, content bytes; never modified). Writes:
    data/curated/documents.parquet    path, text, sha256, n_bytes, scrubbed (JSON: matches per kind)
    data/quarantine/documents.parquet every dropped document, scrubbed as curate saw it, with all
                                      its reasons and the kinds of secret replaced (JSON)
    reports/curation.json             counts in and out, per reason, per scrubbed kind, duplicate
                                      clusters, drift figures, gate verdict, step timings, rules
    reports/data_metrics.json         the DVC metrics: kept documents and bytes, dropped, scrubbed
    reports/data_profile.json         the curated set's profile (publish stores it with the model)
    reports/scrubbed_spans.jsonl      each placeholder of the curated set: path, offset in the
                                      curated text, kind, the removed text's length and sha256
                                      (never the text): the memorization check's input (evaluate)
    reports/gate.json, data_docs/     the Great Expectations result and its Data Docs site

Per document (in `curate.workers` processes): decode -> scrub secrets (the built-in kinds and
curate.scrub_patterns, one's own) -> every quality filter -> MinHash signature. Then, in path order: exact dedupe (sha256) -> near dedupe (LSH). Then the
gate (pipelines/stages/data_gate.py): the GE suite's two tiers and drift against the champion's profile.
If a blocking check fails, no curated table is left behind and the stage exits with code 3.
"""

import difflib
import gc
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.data import (
    DOCUMENTS_FILE,
    read_documents,
    read_json,
    sha256_hex,
    write_documents,
    write_json,
)
from pipelines.core.dedupe import NearDuplicates, signature
from pipelines.core.errors import ConfigError, GateError, SourceError
from pipelines.core.memorization import SPANS_FILE, span_record, write_spans
from pipelines.core.params import CurateParams, Params
from pipelines.core.quality import FILTER_REASONS, decode_document, explain_reason, failing_filters
from pipelines.core.scrub import KINDS, placeholder_of, scrub_spans, scrub_text
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


_WORK: dict = {}  # what forked workers read instead of receiving it pickled


def _analyse_index(i: int) -> dict:
    return analyse(_WORK["records"][i], _WORK["rules"])


def _profile_slice(bounds: tuple[int, int]) -> dict:
    start, stop = bounds
    return gates.text_profile(_WORK["texts"][start:stop])


def _parallel_map(fn, items: list, workers: int, meanwhile=None, **work) -> list:
    """fn over items in `workers` forked processes (inputs shared by fork, not pickled), in order.
    meanwhile(), if given, runs in this process while the workers work."""
    _WORK.update(work)
    # The per-document work allocates millions of small objects (shingles, parse nodes) and makes
    # no reference cycles: with the collector on, each full collection also walks the whole
    # corpus held in memory. Freezing what exists and pausing the collector skips all that.
    gc_was_enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        if workers <= 1 or len(items) < 2:
            if meanwhile:
                meanwhile()
            return [fn(item) for item in items]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(workers, len(items))) as pool:
            pending = pool.map_async(fn, items, chunksize=max(1, len(items) // (workers * 8)))
            if meanwhile:
                meanwhile()
            return pending.get()
    finally:
        _WORK.clear()
        gc.unfreeze()
        if gc_was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# The corpus-level core


@dataclass
class CurationResult:
    kept: list[dict]  # path, text, sha256, n_bytes, scrubbed, spans; in path order
    dropped: list[dict]  # path, reasons, duplicate_of, jaccard
    bytes_in: int
    clusters: dict[str, list[dict]] = field(default_factory=dict)  # kept path -> its duplicates
    scrubbed: dict[str, int] = field(default_factory=dict)  # matches replaced per kind or name (kept docs)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def documents_in(self) -> int:
        return len(self.kept) + len(self.dropped)

    @property
    def bytes_out(self) -> int:
        return sum(doc["n_bytes"] for doc in self.kept)

    def counts(self) -> dict[str, int]:
        """Dropped documents per reason; a document with two reasons counts under both."""
        counts = dict.fromkeys(REASONS, 0)
        for doc in self.dropped:
            for reason in doc["reasons"]:
                counts[reason] += 1
        return counts


def curate_documents(records: list[dict], rules: CurateParams, meanwhile=None) -> CurationResult:
    """Records in any order -> kept and dropped, deterministically (path order decides who stays).
    meanwhile(), if given, runs in this process while the workers analyse the documents."""
    records = sorted(records, key=lambda r: r["path"])
    started = time.perf_counter()
    docs = _parallel_map(
        _analyse_index, list(range(len(records))), rules.workers, meanwhile, records=records, rules=rules
    )
    analysed = time.perf_counter()

    kept, dropped = [], []
    clusters: dict[str, list[dict]] = {}
    first_with: dict[str, str] = {}
    near = NearDuplicates(rules.near_dedupe.threshold, rules.near_dedupe.num_perm)
    for doc in docs:
        if doc["reasons"]:
            dropped.append(
                {"path": doc["path"], "reasons": doc["reasons"], "duplicate_of": None, "jaccard": None}
            )
            continue
        original = first_with.setdefault(doc["sha256"], doc["path"])
        if original != doc["path"]:
            clusters.setdefault(original, []).append({"path": doc["path"], "kind": "exact", "jaccard": 1.0})
            dropped.append(
                {"path": doc["path"], "reasons": ["duplicate"], "duplicate_of": original, "jaccard": 1.0}
            )
            continue
        hit = near.offer(doc["path"], doc["minhash"]) if rules.near_dedupe.enabled else None
        if hit:
            clusters.setdefault(hit[0], []).append(
                {"path": doc["path"], "kind": "near", "jaccard": round(hit[1], 3)}
            )
            dropped.append(
                {
                    "path": doc["path"],
                    "reasons": ["near_duplicate"],
                    "duplicate_of": hit[0],
                    "jaccard": hit[1],
                }
            )
            continue
        kept.append({k: doc[k] for k in ("path", "text", "sha256", "n_bytes", "scrubbed", "spans")})
    scrubbed = dict.fromkeys(scrub_kinds(rules), 0)
    for doc in kept:
        for kind, n in doc["scrubbed"].items():
            scrubbed[kind] += n
    return CurationResult(
        kept=kept,
        dropped=dropped,
        bytes_in=sum(len(r["content"]) for r in records if isinstance(r["content"], bytes)),
        clusters=clusters,
        scrubbed=scrubbed,
        timings={
            "analyse_s": round(analysed - started, 3),
            "dedupe_s": round(time.perf_counter() - analysed, 3),
        },
    )


def corpus_profile(texts: list[str], workers: int) -> dict:
    step = max(1, -(-len(texts) // max(workers, 1)))
    slices = [(i, min(i + step, len(texts))) for i in range(0, len(texts), step)] or [(0, 0)]
    return gates.merge_profiles(_parallel_map(_profile_slice, slices, workers, texts=texts))


# ---------------------------------------------------------------------------------------------
# Outputs


def write_quarantine(
    dropped: list[dict],
    records_by_path: dict[str, bytes],
    out_dir: str | Path,
    scrub: bool = True,
    patterns: dict[str, str] | None = None,
) -> Path:
    """Every dropped document with every reason that applied, its secrets scrubbed as in the
    curated set: the quarantine is pushed to the DVC remote like any output, so it must hold no
    secret that curation found. Decodable content is stored as its scrubbed text (UTF-8, the
    text the filters judged); undecodable content as its bytes, scrubbed through latin-1 (which
    maps every byte to one character and back), so ASCII secrets in a legacy file go too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for doc in dropped:
        content, scrubbed = quarantine_content(records_by_path.get(doc["path"]), scrub, patterns)
        rows.append({**doc, "content": content, "scrubbed": json.dumps(scrubbed, sort_keys=True)})
    path, tmp = out_dir / DOCUMENTS_FILE, out_dir / (DOCUMENTS_FILE + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), tmp)
    os.replace(tmp, path)
    return path


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
        "kept": {"documents": len(result.kept), "bytes": result.bytes_out},
        "dropped_documents": len(result.dropped),
        "dropped": result.counts(),
        "dropped_examples": examples,
        "scrubbed": result.scrubbed,
        "scrubbed_documents": sum(1 for doc in result.kept if doc["scrubbed"]),
        "scrubbed_spans": sum(len(doc["spans"]) for doc in result.kept),  # lines of SPANS_FILE
        "duplicate_clusters": [{"kept": path, "copies": copies} for path, copies in clusters],
        "drift": drift,
        "gate": gate,
        "timings": result.timings,
        "rules": rules.model_dump(exclude={"gate", "reports_dir"}),
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
    """Read the raw snapshot, curate it, gate it; write the curated table only if the gate passed."""
    rules = params.curate
    curated_dir = Path(params.data.curated_dir)
    reports_dir = Path(rules.reports_dir)
    # Whatever happens below, no stale curated table (or spans of one) may stay for downstream stages.
    for stale in (
        curated_dir / DOCUMENTS_FILE,
        curated_dir / (DOCUMENTS_FILE + ".tmp"),
        reports_dir / SPANS_FILE,
    ):
        stale.unlink(missing_ok=True)

    try:
        records = read_documents(params.data.raw_dir)
    except FileNotFoundError as exc:
        raise SourceError(str(exc)) from None
    _check_unique_paths(records, params.data.raw_dir)
    # Importing the gate's Great Expectations takes seconds of one core: done here while the
    # workers analyse, not after them (they are forked first: no fork while an import is half done).
    result = curate_documents(records, rules, meanwhile=gates.import_suite)
    write_quarantine(
        result.dropped,
        {r["path"]: r["content"] for r in records},
        params.data.quarantine_dir,
        scrub=rules.scrub_secrets,
        patterns=rules.scrub_patterns,
    )
    del records

    started = time.perf_counter()
    profile = corpus_profile([doc["text"] for doc in result.kept], rules.workers)
    write_json(reports_dir / PROFILE_REPORT, profile)
    drift, drift_failed, drift_warned = check_drift(profile, params)
    result.timings["profile_drift_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    try:
        frame = gates.gate_frame(result.kept)
        expectations = gates.gate_expectations(rules, result.documents_in, frame["source"].nunique())
        gate = gates.run_suite(frame, expectations, reports_dir)
    except Exception as exc:
        error = {"passed": False, "error": f"the gate did not run: {type(exc).__name__}: {exc}"}
        write_json(reports_dir / CURATION_REPORT, summarize(result, rules, error, drift))
        raise
    result.timings["gate_s"] = round(time.perf_counter() - started, 3)
    gate.failed += [_drift_line(c) for c in drift_failed]
    gate.warnings += [_drift_line(c) for c in drift_warned]
    gate.passed = not gate.failed
    summary = summarize(result, rules, gate.to_dict(), drift)
    write_json(reports_dir / CURATION_REPORT, summary)
    write_json(reports_dir / DATA_METRICS_REPORT, data_metrics(summary), sort_keys=False)
    if not gate.passed:
        raise GateError(gate.message())
    write_spans((span for doc in result.kept for span in doc["spans"]), reports_dir / SPANS_FILE)
    write_documents(
        [
            {
                **{k: v for k, v in doc.items() if k != "spans"},
                "scrubbed": json.dumps(doc["scrubbed"], sort_keys=True),
            }
            for doc in result.kept
        ],
        curated_dir,
    )
    return summary


def _check_unique_paths(records: list[dict], raw_dir: str) -> None:
    """Every later step keys documents by path (dedupe, quarantine, --explain): two documents under
    one name, which a glob over FILE.jsonl and a file named FILE.jsonl#ROW can give, stop here."""
    repeated = sorted(path for path, n in Counter(r["path"] for r in records).items() if n > 1)
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
    quarantine = Path(params.data.quarantine_dir) / DOCUMENTS_FILE
    curated = Path(params.data.curated_dir) / DOCUMENTS_FILE
    report = Path(rules.reports_dir) / CURATION_REPORT
    if not quarantine.exists() or not report.exists():
        raise ConfigError(
            f"no curation to explain ({quarantine} or {report} missing): run `trainpipe curate` first"
        )
    found = pq.read_table(quarantine, filters=[("path", "==", path)]).to_pylist()
    if found:
        doc = found[0]
        lines = [f"{path}: dropped; quarantined in {quarantine}"]
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
    kept = pq.read_table(curated, filters=[("path", "==", path)]).to_pylist() if curated.exists() else []
    if kept:
        doc = kept[0]
        scrubbed = json.loads(doc.get("scrubbed") or "{}")
        lines = [f"{path}: kept ({doc['n_bytes']} bytes) in {curated}"]
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
    if not summary.get("gate", {}).get("passed", False) and not curated.exists():
        raise ConfigError(
            f"{path} passed every filter, but the gate failed, so nothing was curated: see {report}"
        )
    raw = read_documents(params.data.raw_dir) if (Path(params.data.raw_dir) / DOCUMENTS_FILE).exists() else []
    raw_paths = [r["path"] for r in raw]
    if path in raw_paths:
        raise ConfigError(
            f"{path} is in the raw snapshot but neither curated nor quarantined: the outputs are from "
            "another curation; run `trainpipe curate` (or `dvc checkout`)"
        )
    close = difflib.get_close_matches(path, raw_paths, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"{path} is not a document of the raw snapshot {params.data.raw_dir}{hint}")


def describe(summary: dict, params: Params) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items() if v) or "none"
    scrubbed = ", ".join(f"{k} {v}" for k, v in summary["scrubbed"].items() if v) or "none"
    warnings = summary["gate"].get("warnings") or []
    lines = [
        f"curated {summary['kept']['documents']}/{summary['documents_in']} documents "
        f"({summary['kept']['bytes'] / 1e6:.1f} of {summary['bytes_in'] / 1e6:.1f} MB); dropped: {dropped}; "
        f"scrubbed: {scrubbed}; {len(summary['duplicate_clusters'])} duplicate clusters",
        *[f"warning: {w['check']} (observed {w['observed']}, need {w['need']})" for w in warnings],
        _drift_summary(summary.get("drift") or {}),
        f"gate passed -> {Path(params.data.curated_dir) / DOCUMENTS_FILE}; "
        f"quarantine: {Path(params.data.quarantine_dir) / DOCUMENTS_FILE}",
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
