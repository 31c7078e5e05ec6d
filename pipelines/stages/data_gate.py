"""The data gate of the curate stage: a two-tier Great Expectations suite, then drift checks.

Blocking checks (GE severity "critical") stop the run; warning checks (severity "warning") are
reported and let it go on. A suite that evaluated no expectation is a failure, not a pass. Drift
compares the curated set's profile with the profile stored with the model now serving (written
at publish): document count, bytes, median length, byte and word distributions; each figure is
reported next to the champion's, and thresholds in params decide warn or block.
"""

import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.core.data import write_json
from pipelines.core.params import CurateParams, DriftParams
from pipelines.core.quality import CODE_SUFFIXES, alnum_fraction

GATE_REPORT = "gate.json"
DATA_DOCS_DIR = "data_docs"
# The frame holds every kept document's columns but only the start of its text: enough for the
# text's type and not-null checks, and memory grows with the documents, not with their bytes.
TEXT_PREVIEW_CHARS = 64
GATE_FRAME = (
    f"every kept document: path, sha256, n_bytes, alnum_fraction, source, extension, and the first "
    f"{TEXT_PREVIEW_CHARS} characters of its text; the profile and drift: every shard's profile, merged"
)
GATE_COLUMNS = ["path", "text", "sha256", "n_bytes", "alnum_fraction", "source", "source_share", "extension"]
# What a text corpus is made of: code, prose, the table formats ingest reads rows from, and files
# without an extension (README, Makefile). Anything else kept (.svg, .html, .pem, .ipynb) is
# worth a look even though it passed the filters.
TEXT_EXTENSIONS = CODE_SUFFIXES | {".txt", ".md", ".rst", ".jsonl", ".json", ".parquet", ".csv", ""}
TOP_WORDS = 2000
# Drift stops a corpus change the user may well have meant (their own code, another language):
# the block ends with the two ways to go on on purpose. -S is saved in params.yaml (as with
# `dvc exp run -S`), so drift stays off until it is set back.
DRIFT_WAY_FORWARD = (
    "to train on this data on purpose, start a new model line "
    "(`trainpipe run -S publish.model_name=NEW_NAME`) or turn the drift checks off for this run "
    "(`trainpipe run -S curate.gate.drift.enabled=false`, saved in params.yaml: set it back to true after)"
)
_WORD_RE = re.compile(r"\w+")


@dataclass
class GateResult:
    passed: bool
    failed: list[dict] = field(default_factory=list)  # check, observed, need (blocking only)
    warnings: list[dict] = field(default_factory=list)  # the same, for warning-tier checks
    report_path: str = ""
    data_docs_path: str = ""
    evaluated: int = 0

    def message(self) -> str:
        """One line for the person whose run stopped; a drift block ends with the way forward."""
        failures = "; ".join(
            f"{f['check']} (observed {f['observed']}, need {f['need']})" for f in self.failed
        )
        line = f"data gate failed: {failures}; full report: {self.report_path}, {self.data_docs_path}"
        if any(f["check"].startswith("drift_") for f in self.failed):
            line += f"; {DRIFT_WAY_FORWARD}"
        return line

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failed": self.failed,
            "warnings": self.warnings,
            "evaluated": self.evaluated,
            "report": self.report_path,
            "data_docs": self.data_docs_path,
            "checked_on": GATE_FRAME,
        }


# ---------------------------------------------------------------------------------------------
# The Great Expectations suite


def import_suite() -> None:
    """Import what the gate's suite needs (Great Expectations, and pandas with it): seconds of
    imports, which the curate stage spends while its workers analyse the documents. A failure
    here is left to show again where the suite imports them, and be reported as the gate's."""
    try:
        import great_expectations  # noqa: F401
        import pandas  # noqa: F401
    except Exception:  # noqa: BLE001,S110 -- see above
        pass


def gate_frame(kept: list[dict]):
    """The curated set as the DataFrame the gate checks, with what the suite needs derived per row
    (alnum_fraction as given, when curate's workers computed it on the whole text)."""
    import pandas as pd

    texts = [doc.get("text") for doc in kept]
    paths = [doc.get("path") for doc in kept]
    sources = [source_of(p) if isinstance(p, str) else None for p in paths]
    per_source = Counter(sources)
    return pd.DataFrame(
        {
            "path": paths,
            "text": texts,
            "sha256": [doc.get("sha256") for doc in kept],
            "n_bytes": pd.Series([doc.get("n_bytes") for doc in kept], dtype="Int64"),
            # a missing text is the not-null check's to report, not a crash here
            "alnum_fraction": pd.Series(
                [
                    doc["alnum_fraction"]
                    if "alnum_fraction" in doc
                    else (alnum_fraction(t) if isinstance(t, str) else None)
                    for doc, t in zip(kept, texts, strict=True)
                ],
                dtype="Float64",
            ),
            "source": sources,
            "source_share": pd.Series([per_source[s] / len(kept) for s in sources], dtype="Float64"),
            "extension": [extension_of(p) if isinstance(p, str) else None for p in paths],
        },
        columns=GATE_COLUMNS,
    )


def source_of(path: str) -> str:
    """The top-level folder a document came from; a top-level file is its own source, and so is
    a file named by its absolute path (ingest names a table's rows /path/to/FILE#ROW)."""
    name = path.split("#", 1)[0]
    return name if name.startswith("/") else name.split("/", 1)[0]


def extension_of(path: str) -> str:
    """The lower-cased suffix, "" for none; a table row has its file's (rows.jsonl#3 -> ".jsonl")."""
    name = path.split("#", 1)[0].rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[1].lower() if "." in name.strip(".") else ""


def gate_expectations(rules: CurateParams, documents_in: int, num_sources: int | None = None) -> list:
    """Both tiers; each expectation says in meta["need"] what passing means, for the report.

    Only checks the per-document filters cannot make: the frame's schema, duplicate paths, the
    corpus's size and byte budget, and (warnings) how much curation kept, the median alphanumeric
    share, one source dominating, files that are neither text nor code. The filters' own
    thresholds are not re-checked here: every kept document passed them a moment ago.
    num_sources: distinct top-level sources kept; with one, its share is 1 by definition and
    the share check is left out.
    """
    import great_expectations as gx

    E = gx.expectations
    gate = rules.gate
    blocking = [
        (
            E.ExpectTableColumnsToMatchSet(column_set=GATE_COLUMNS, exact_match=True),
            f"exactly {GATE_COLUMNS}",
        ),
        *[
            (E.ExpectColumnValuesToBeOfType(column=c, type_=t), f"type {t}")
            for c, t in (("path", "str"), ("text", "str"), ("sha256", "str"), ("n_bytes", "int64"))
        ],
        *[(E.ExpectColumnValuesToNotBeNull(column=c), "no nulls") for c in ("path", "text", "sha256")],
        (E.ExpectColumnValuesToBeUnique(column="path"), "unique values"),
        (E.ExpectTableRowCountToBeBetween(min_value=gate.min_documents), f">= {gate.min_documents}"),
        (
            E.ExpectColumnSumToBeBetween(
                column="n_bytes", min_value=gate.min_bytes, max_value=gate.max_bytes
            ),
            f"{gate.min_bytes:,}..{gate.max_bytes:,} bytes",
        ),
    ]
    min_kept = math.ceil(gate.warn_min_kept_fraction * documents_in)
    warning = [
        (
            E.ExpectTableRowCountToBeBetween(min_value=min_kept, severity="warning"),
            f">= {min_kept} ({gate.warn_min_kept_fraction:.0%} of {documents_in} documents in)",
        ),
        (
            E.ExpectColumnMedianToBeBetween(
                column="alnum_fraction", min_value=gate.warn_min_median_alnum, severity="warning"
            ),
            f">= {gate.warn_min_median_alnum}",
        ),
        (
            E.ExpectColumnValuesToBeInSet(
                column="extension", value_set=sorted(TEXT_EXTENSIONS), severity="warning"
            ),
            "source code or text files (.py, .md, .txt, table rows, ...)",
        ),
    ]
    if num_sources is None or num_sources > 1:
        warning.append(
            (
                E.ExpectColumnMaxToBeBetween(
                    column="source_share", max_value=gate.warn_max_source_share, severity="warning"
                ),
                f"<= {gate.warn_max_source_share} of the kept documents from one top-level folder or file",
            )
        )
    for expectation, need in blocking + warning:
        expectation.meta = {"need": need}
    return [expectation for expectation, _ in blocking + warning]


def _observed(result: dict) -> str:
    """The figure behind a failed expectation, from a SUMMARY-format result."""
    if result.get("exception_info", {}).get("raised_exception"):
        return f"error: {result['exception_info'].get('exception_message')}"
    res = result.get("result") or {}
    if "observed_value" in res:
        value = res["observed_value"]
        return f"{value:g}" if isinstance(value, float) else str(value)
    if "unexpected_count" in res:
        examples = res.get("partial_unexpected_list") or []
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in examples[:3])
        return f"{res['unexpected_count']} of {res.get('element_count', '?')} rows failing" + (
            f", e.g. {shown}" if shown else ""
        )
    return "n/a"


def run_suite(frame, expectations: list, reports_dir: str | Path) -> GateResult:
    """Run the expectations on the frame; write gate.json and the Data Docs site.

    An ephemeral context keeps nothing between runs; its Data Docs site is pointed at
    reports_dir/data_docs (the default site would live in a random temp folder).
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    reports_dir = Path(reports_dir)
    docs_dir = reports_dir / DATA_DOCS_DIR
    report_path = reports_dir / GATE_REPORT
    shutil.rmtree(docs_dir, ignore_errors=True)  # pages of earlier runs would linger otherwise

    with _quiet_logger("great_expectations"):
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        for site in list(context.list_data_docs_sites()):
            context.delete_data_docs_site(site)
        context.add_data_docs_site(
            "reports",
            {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        batch_definition = (
            context.data_sources.add_pandas("curated")
            .add_dataframe_asset("documents")
            .add_batch_definition_whole_dataframe("all")
        )
        suite = context.suites.add(gx.ExpectationSuite(name="curated_documents"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name="curate_gate", data=batch_definition, suite=suite)
        )
        # SUMMARY, not COMPLETE: COMPLETE lists every failing row and is ~8x slower.
        result = validation.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
        context.build_data_docs()

    report = result.to_json_dict()
    write_json(report_path, report)
    failed, warnings = [], []
    for r in report["results"]:
        if r["success"]:
            continue
        config = r["expectation_config"]
        column = config["kwargs"].get("column")
        entry = {
            "check": config["type"] + (f"[{column}]" if column else ""),
            "observed": _observed(r),
            "need": (config.get("meta") or {}).get("need", str(config["kwargs"])),
        }
        (failed if config.get("severity", "critical") == "critical" else warnings).append(entry)
    evaluated = len(report["results"])
    if evaluated == 0:  # an empty suite proves nothing about the data
        failed.append({"check": "expectation_suite", "observed": "0 expectations evaluated", "need": ">= 1"})
    return GateResult(
        passed=not failed,
        failed=failed,
        warnings=warnings,
        report_path=str(report_path),
        data_docs_path=str(docs_dir / "index.html"),
        evaluated=evaluated,
    )


@contextmanager
def _quiet_logger(name: str):
    """Raise a library logger to ERROR for the duration, then restore it (GE warns chattily)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Profile and drift


def text_profile(texts: list[str]) -> dict:
    """Counts for one slice of the corpus; slices merge with merge_profiles (so workers can share)."""
    byte_counts = np.zeros(256, dtype=np.int64)
    words: Counter = Counter()
    for text in texts:
        data = text.encode("utf-8")
        byte_counts += np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
        words.update(_WORD_RE.findall(text))
    return {"byte_counts": byte_counts, "words": words, "n_chars": [len(t) for t in texts]}


def merge_profiles(parts: Iterable[dict]) -> dict:
    """The corpus profile stored with a model: sizes, length quantiles, byte and word distributions.
    parts are read once, one at a time (curate reads each shard's from its file)."""
    byte_counts = np.zeros(256, dtype=np.int64)
    words: Counter = Counter()
    lengths: list[int] = []
    for part in parts:
        byte_counts += part["byte_counts"]
        words.update(part["words"])
        lengths.extend(part["n_chars"])
    quantiles = np.quantile(lengths, [0.1, 0.5, 0.9]).tolist() if lengths else [0.0, 0.0, 0.0]
    return {
        "documents": len(lengths),
        "bytes": int(byte_counts.sum()),
        "chars_p10": quantiles[0],
        "chars_p50": quantiles[1],
        "chars_p90": quantiles[2],
        "byte_counts": byte_counts.tolist(),
        "words_total": int(sum(words.values())),
        "top_words": dict(words.most_common(TOP_WORDS)),
    }


def js_distance(
    p: dict | list, q: dict | list, p_total: int | None = None, q_total: int | None = None
) -> float:
    """Jensen-Shannon distance (base 2: 0 same, 1 disjoint) of two count distributions.

    Word profiles keep only their top words: the rest of each total is one "other" bucket.
    """
    from scipy.spatial.distance import jensenshannon

    if isinstance(p, dict):
        keys = sorted(set(p) | set(q))
        pv = [p.get(k, 0) for k in keys] + [max((p_total or 0) - sum(p.values()), 0)]
        qv = [q.get(k, 0) for k in keys] + [max((q_total or 0) - sum(q.values()), 0)]
    else:
        pv, qv = list(p), list(q)
    if sum(pv) == 0 or sum(qv) == 0:
        return 0.0 if sum(pv) == sum(qv) else 1.0
    return float(jensenshannon(np.asarray(pv, float), np.asarray(qv, float), base=2))


def drift_checks(profile: dict, reference: dict, drift: DriftParams) -> list[dict]:
    """Each drift figure next to the champion's, with its verdict: ok, warn or block."""
    checks = []

    def ratio_check(name: str, key: str):
        new, ref = profile[key], reference.get(key) or 0
        ratio = new / ref if ref else math.inf
        off = max(ratio, 1 / ratio) if ratio > 0 else math.inf  # how many times off, either way
        verdict = "block" if off > drift.ratio_block else "warn" if off > drift.ratio_warn else "ok"
        checks.append(
            {
                "check": f"drift_{name}",
                "observed": round(new, 3),
                "champion": round(ref, 3),
                "figure": round(ratio, 3),
                "need": f"ratio within 1/{drift.ratio_block:g}..{drift.ratio_block:g} (warn beyond {drift.ratio_warn:g})",
                "verdict": verdict,
            }
        )

    def divergence_check(name: str, distance: float):
        warn, block = getattr(drift, f"{name}_divergence_warn"), getattr(drift, f"{name}_divergence_block")
        verdict = "block" if distance > block else "warn" if distance > warn else "ok"
        checks.append(
            {
                "check": f"drift_{name}_distribution",
                "observed": round(distance, 4),
                "champion": 0.0,
                "figure": round(distance, 4),
                "need": f"Jensen-Shannon distance <= {block:g} (warn above {warn:g})",
                "verdict": verdict,
            }
        )

    ratio_check("documents", "documents")
    ratio_check("bytes", "bytes")
    ratio_check("median_chars", "chars_p50")
    divergence_check("byte", js_distance(profile["byte_counts"], reference["byte_counts"]))
    divergence_check(
        "word",
        js_distance(
            profile["top_words"], reference["top_words"], profile["words_total"], reference["words_total"]
        ),
    )
    return checks


PROFILE_ARTIFACT = "data_profile.json"  # logged by publish to the run of every registered version


def champion_profile(model_name: str) -> tuple[dict, str]:
    """What drift compares with: the data profile stored with models:/NAME@champion, or why not.

    A record for the inputs stage's champion.json: status "champion" (with version, run id,
    the profile and its sha256), "none" (no registry, no champion, or a champion without a
    profile: nothing to compare with, drift not checked) or "unreachable" (the registry could
    not be read: curate turns that into a warning, never a silent pass). Its content depends on
    the reference alone (no times, no error details that vary between tries), so an unchanged
    reference leaves the file, and the curate stage's DVC dependency, unchanged. The second
    value is the error behind "unreachable", for the person reading the log ("" otherwise).
    """
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    db = (
        uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ("mlflow.db" if not uri else None)
    )
    if db is not None and not Path(db).exists():  # opening it would create an empty registry
        return {"status": "none", "note": "no registry yet: drift not checked"}, ""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    try:
        with _short_http_retries():
            return _read_champion_profile(model_name), ""
    except Exception as exc:  # noqa: BLE001 -- an unreachable registry must not crash the pipeline
        where = _without_credentials(uri) or "mlflow.db"
        note = f"registry {where} unreachable ({type(exc).__name__}): drift not checked"
        return {"status": "unreachable", "note": note}, f"{type(exc).__name__}: {exc}"


def _read_champion_profile(model_name: str) -> dict:
    """champion_profile's registry reads; raises when the registry does not answer."""
    import hashlib

    from mlflow import MlflowClient

    from pipelines.adapters.registry import get_champion, run_artifact_bytes

    client = MlflowClient()
    # None for no model or no alias; no answer from the registry raises (a connection error)
    version = get_champion(client, model_name)
    if version is None:
        return {"status": "none", "note": f"no models:/{model_name}@champion yet: drift not checked"}
    source = {"model": model_name, "version": str(version.version), "run_id": version.run_id}
    data = run_artifact_bytes(client, version.run_id, PROFILE_ARTIFACT)
    if data is None:
        note = f"champion v{version.version} has no {PROFILE_ARTIFACT}: drift not checked"
        return {**source, "status": "none", "note": note}
    digest = hashlib.sha256(data).hexdigest()
    return {**source, "status": "champion", "profile_sha256": digest, "profile": json.loads(data)}


def _short_http_retries():
    """MLflow retries a failed HTTP request 7 times with growing back-off, for minutes; a drift
    reference that cannot be read is reported as such, so a few seconds of trying is enough."""
    from pipelines.core.environ import environ_set

    return environ_set(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        }
    )


def _without_credentials(uri: str) -> str:
    """A tracking URI fit for a report: scheme://user:password@host loses its user and password."""
    return re.sub(r"//[^/@]*@", "//", uri)
