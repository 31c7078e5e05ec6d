"""Two registered versions, or two MLflow runs, side by side: `trainpipe compare`.

    trainpipe compare                   # @champion against @challenger
    trainpipe compare 7                 # @champion against v7
    trainpipe compare v3 @champion      # versions (3, v3), aliases (@champion, champion), run ids

Everything shown is read back from what MLflow and DVC recorded; nothing is re-run or re-scored:
the runs' params and metrics (each evaluation slice's bits per byte after the headline); the
interval of the bits-per-byte difference where the promotion gate computed one (the bootstrap tags
of the version it decided, pipelines.core.bootstrap), overall and per slice (pipelines.core.slices); the data
versions in the dvc.lock each run logged at publish (and the version's data_version tag); the git
commit of its lineage tags; its cost ledger (the run's cost.* metrics, the version's cost_* tags,
priced as `trainpipe status` prices them). It ends with the MLflow UI's own compare page for the
two runs.

By default A is @champion and B is @challenger. Publish moves @challenger to every version it
registers, so after a promotion both aliases name the same version: B is then the newest other
version (the champion it replaced, unless a later challenger lost).
"""

import json
import re
import textwrap
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion

from pipelines.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    find_run,
    find_version,
    get_tracking_uri,
    model_aliases,
    model_versions,
    run_artifact_bytes,
)
from pipelines.commands.status import version_cost
from pipelines.core.bootstrap import read_bpb_delta
from pipelines.core.errors import ConfigError
from pipelines.core.ledger import format_usd, price
from pipelines.core.params import DataParams, Params
from pipelines.core.slices import BPB_METRIC, read_slice_tags

WIDTH = 120
# label, A, B and a last column (the difference, or same/differs): 40 + 2 + 32 + 2 + 32 + 2 + 10
LABEL_W, VALUE_W, LAST_W = 40, 32, 10
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: a uuid4's hex
VERSION_REF = re.compile(r"[vV]?(\d+)")
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise
HEADLINE_METRICS = ("val_bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte", "val_loss")
# metrics shown elsewhere (cost.*: the cost section) or of the machine, not the model (system/*)
NOT_IN_METRICS = ("cost.", "system/")
SHORT_HASH = 12  # as git shortens a commit: enough to tell two apart; --json has them whole


@dataclass
class Side:
    """One of the two compared: a registered version with its run, or a run alone."""

    ref: str  # as it was named
    version: ModelVersion | None
    run: Run | None
    aliases: list[str]
    dvc_lock: dict | None

    @property
    def label(self) -> str:
        if self.version is None:
            return f"run {self.run.info.run_id[:8]}"
        return " ".join([f"v{self.version.version}", *(f"@{a}" for a in self.aliases)])

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params) if self.run else {}

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.run.data.metrics) if self.run else {}

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.version.tags) if self.version else {}


def public_uri(uri: str) -> str:
    """A tracking URI fit to print: scheme://user:password@host loses its user and password."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _no_model(name: str) -> ConfigError:
    return ConfigError(
        f"no registered model {name} in {public_uri(get_tracking_uri())}: nothing was published yet"
    )


def _no_champion(name: str) -> ConfigError:
    return ConfigError(f"model {name} has no champion yet: name both sides, e.g. `trainpipe compare 1 2`")


def pick_refs(client: MlflowClient, name: str, a: str | None, b: str | None) -> tuple[str, str, str]:
    """(A, B, a note on how the default was chosen, or ""). One ref given: it is B, against @champion."""
    if a is not None and b is not None:
        return a, b, ""
    aliases = model_aliases(client, name)
    if aliases is None:
        raise _no_model(name)
    champion = aliases.get(CHAMPION)
    if champion is None:
        raise _no_champion(name)
    if a is not None:
        return f"@{CHAMPION}", a, ""
    challenger = aliases.get(CHALLENGER)
    if challenger is not None and challenger != champion:
        return f"@{CHAMPION}", f"@{CHALLENGER}", ""
    others = [str(v.version) for v in model_versions(client, name) if str(v.version) != champion]
    if not others:
        raise ConfigError(f"model {name} has only its champion, v{champion}: nothing to compare it with yet")
    why = "@challenger is the champion itself" if challenger else "there is no @challenger"
    return f"@{CHAMPION}", f"v{others[0]}", f"{why}: B is v{others[0]}, the newest other version"


def resolve(client: MlflowClient, name: str, ref: str) -> Side:
    """A version (3, v3), an alias (@champion, champion) or a run id, with its run and dvc.lock;
    a one-line ConfigError naming what does not exist."""
    text = ref.strip()
    if RUN_ID.fullmatch(text):
        run = find_run(client, text)
        if run is None:
            raise ConfigError(f"no MLflow run {text} in {public_uri(get_tracking_uri())}")
        registered = model_versions(client, name, run_id=text)
        version = registered[0] if registered else None  # a run may hold several: its newest
        aliases = (model_aliases(client, name) or {}) if version else {}
        return _side(client, ref, version, aliases, run)
    aliases = model_aliases(client, name)
    if aliases is None:
        raise _no_model(name)
    number = VERSION_REF.fullmatch(text)
    if number:
        version = find_version(client, name, number[1])
        if version is None:
            numbers = sorted(int(v.version) for v in model_versions(client, name))
            have = f"v{numbers[0]} to v{numbers[-1]}" if numbers else "none"
            raise ConfigError(f"model {name} has no version {number[1]} (its versions: {have})")
    else:
        alias = text.removeprefix("@")
        if alias not in aliases:
            if alias == CHAMPION:
                raise _no_champion(name)
            have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
            raise ConfigError(f"model {name} has no alias @{alias} (its aliases: {have})")
        version = find_version(client, name, aliases[alias])
        if version is None:  # deleted between the two reads
            raise ConfigError(f"model {name} has no version {aliases[alias]}, which @{alias} names")
    return _side(client, ref, version, aliases, None)


def _side(client: MlflowClient, ref: str, version, aliases: dict[str, str], run) -> Side:
    if run is None and version is not None and version.run_id:
        run = find_run(client, version.run_id)  # None: the run was deleted
    mine = [a for a, v in aliases.items() if version is not None and v == str(version.version)]
    order = {CHAMPION: 0, CHALLENGER: 1}
    mine.sort(key=lambda a: (order.get(a, 2), a))
    return Side(ref, version, run, mine, _dvc_lock(client, run))


def _dvc_lock(client: MlflowClient, run) -> dict | None:
    """The dvc.lock publish logged into the run: the DVC hashes of that run's data and model."""
    if run is None:
        return None
    data = run_artifact_bytes(client, run.info.run_id, "dvc.lock")
    try:
        lock = yaml.safe_load(data) if data else None
    except yaml.YAMLError:
        return None
    return lock if isinstance(lock, dict) and isinstance(lock.get("stages"), dict) else None


def compare(params: Params, a: str | None = None, b: str | None = None, ui_url: str | None = None) -> dict:
    """Everything `trainpipe compare` shows, as one dict (its --json)."""
    client = MlflowClient()
    name = params.publish.model_name
    ref_a, ref_b, note = pick_refs(client, name, a, b)
    side_a, side_b = resolve(client, name, ref_a), resolve(client, name, ref_b)
    return {
        "model": name,
        "note": note,
        "a": _summary(side_a),
        "b": _summary(side_b),
        "params": param_differences(side_a, side_b),
        "metrics": metric_rows(side_a, side_b),
        "gate": gate_record(side_a, side_b),
        "data": data_rows(params.data, side_a, side_b),
        "code": code_record(side_a, side_b),
        "cost": {
            "a": side_cost(params, side_a),
            "b": side_cost(params, side_b),
            "cpu_hour_usd": params.cost.cpu_hour_usd,
            "gpu_hour_usd": params.cost.gpu_hour_usd,
        },
        "ui": ui_link([side_a, side_b], get_tracking_uri(), ui_url),
    }


def _summary(side: Side) -> dict:
    run, version = side.run, side.version
    return {
        "ref": side.ref,
        "label": side.label,
        "version": str(version.version) if version else None,
        "aliases": side.aliases,
        "registered": version.creation_timestamp if version else None,
        "made_by": made_by(version.tags) if version else None,
        "parent_weights_sha256": version.tags.get("parent_weights_sha256") if version else None,
        "run_id": run.info.run_id if run else (version.run_id if version else None),
        "run_name": run.info.run_name if run else None,
        "run_status": run.info.status if run else None,
        "started": run.info.start_time if run else None,
        "experiment_id": run.info.experiment_id if run else None,
    }


def made_by(tags: dict[str, str]) -> str:
    """How a version's weights began: "training" from random weights, or "fine-tune of vN"."""
    if tags.get("kind") == "finetune":
        return f"fine-tune of v{tags.get('parent_version', '?')}"
    return "training" if tags.get("kind") == "train" else "training (not recorded)"


def param_differences(a: Side, b: Side) -> dict:
    """The logged params whose values differ; none compared when a run logged none (a version
    published by `trainpipe publish` outside a flow run has a run of its own without params)."""
    pa, pb = a.params, b.params
    missing = [s.label for s, p in ((a, pa), (b, pb)) if not p]
    if missing:
        return {
            "compared": 0,
            "differ": [],
            "note": f"no params logged in the run of {' and '.join(missing)} (published outside a flow run?)",
        }
    keys = sorted(set(pa) | set(pb))
    differ = [{"key": k, "a": pa.get(k), "b": pb.get(k)} for k in keys if pa.get(k) != pb.get(k)]
    return {"compared": len(keys), "differ": differ, "note": None}


def metric_rows(a: Side, b: Side) -> list[dict]:
    """Held-out bits per byte and the compressors first, then every other metric the runs logged
    (each its last value), with B - A."""
    ma, mb = a.metrics, b.metrics
    logged = set(ma) | set(mb)
    keys = [k for k in HEADLINE_METRICS if k in logged]
    keys += sorted(k for k in logged if k.startswith(BPB_METRIC))  # each evaluation slice's, next to it
    keys += sorted(
        k for k in logged if k not in HEADLINE_METRICS and not k.startswith((BPB_METRIC, *NOT_IN_METRICS))
    )
    rows = []
    for key in keys:
        va, vb = ma.get(key), mb.get(key)
        diff = vb - va if va is not None and vb is not None else None
        rows.append({"key": key, "a": va, "b": vb, "diff": diff})
    return rows


def gate_record(a: Side, b: Side) -> dict:
    """The interval of B - A in bits per byte if the promotion gate of either version measured it
    against the other (read back as B - A either way), and each version's own gate decision."""
    interval = None
    for mine, other, sign in ((b, a, 1), (a, b, -1)):
        delta = read_bpb_delta(mine.tags)
        if (
            interval is None
            and delta
            and other.version is not None
            and delta.vs == str(other.version.version)
        ):
            low, high = (delta.low, delta.high) if sign > 0 else (-delta.high, -delta.low)
            interval = {
                "delta": sign * delta.delta,
                "low": low,
                "high": high,
                "documents": delta.documents,
                "resamples": delta.resamples,
                "measured_by": f"v{mine.version.version}",
                "against": f"v{other.version.version}",
            }
    decisions = []
    for side in (a, b):
        if side.version is None:
            continue
        own = read_bpb_delta(side.tags)
        decisions.append(
            {
                "version": str(side.version.version),
                "decision": side.tags.get("alias_decision"),
                "interval": own.text() if own else None,
                "against": f"v{own.vs}" if own and own.vs else None,
            }
        )
    return {"b_minus_a": interval, "decisions": decisions, "slices": slice_record(a, b)}


def slice_record(a: Side, b: Side) -> list[dict]:
    """Each evaluation slice's interval of B - A, where the gate of either version measured it
    against the other (its bpb_delta_slices tag), with the verdict that gate gave it."""
    for mine, other, sign in ((b, a, 1), (a, b, -1)):
        found = read_slice_tags(mine.tags)
        if found is None or other.version is None or found.get("vs") != str(other.version.version):
            continue
        rows = []
        for name, s in found["slices"].items():
            row = {"slice": name, "documents": s.get("documents"), "verdict": s.get("verdict")}
            if "delta" in s:
                low, high = (s["low"], s["high"]) if sign > 0 else (-s["high"], -s["low"])
                row |= {"delta": sign * s["delta"], "low": low, "high": high}
            rows.append(row | {"measured_by": f"v{mine.version.version}"})
        return rows
    return []


def _lock_hashes(lock: dict | None) -> dict[str, str]:
    """{output path: DVC md5} of every stage output a dvc.lock records."""
    found = {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []) if isinstance(stage, dict) else []:
            if isinstance(out, dict) and out.get("path") and out.get("md5"):
                found[str(out["path"])] = str(out["md5"])
    return found


def data_rows(data: DataParams, a: Side, b: Side) -> dict:
    """The source's manifest hash (the inputs check's run tag) and the DVC hashes of the raw,
    curated and tokenized data, each side's, and whether they are the same."""
    hashes = []
    for side in (a, b):
        lock = _lock_hashes(side.dvc_lock)
        tokens = lock.get(data.tokens_dir) or side.tags.get("data_version") or None
        hashes.append(
            {
                "source manifest": side.run.data.tags.get("input.source_sha256") if side.run else None,
                data.raw_dir: lock.get(data.raw_dir),
                data.curated_dir: lock.get(data.curated_dir),
                data.tokens_dir: tokens,  # the lineage tag data_version is this hash
            }
        )
    rows = []
    for key in hashes[0]:
        ha, hb = hashes[0][key], hashes[1][key]
        rows.append({"key": key, "a": ha, "b": hb, "same": ha == hb if ha and hb else None})
    known = [r for r in rows if r["same"] is not None]
    if not known:
        bare = [s.label for i, s in enumerate((a, b)) if not any(hashes[i].values())] or [a.label, b.label]
        verdict = f"unknown: no DVC record of {' or '.join(bare)} (a run that logged no dvc.lock)"
    elif all(r["same"] for r in known):
        verdict = "the same data" + ("" if len(known) == len(rows) else " (where both record it)")
    else:
        verdict = "different data: " + ", ".join(r["key"] for r in known if not r["same"]) + " differ"
    return {"rows": rows, "same": all(r["same"] for r in known) if known else None, "verdict": verdict}


def code_record(a: Side, b: Side) -> dict:
    """The git commit each version was trained from (its lineage tag; else MLflow's run tag)."""

    def commit(side: Side) -> str | None:
        run_tags = side.run.data.tags if side.run else {}
        return side.tags.get("git_commit") or run_tags.get("mlflow.source.git.commit")

    ca, cb = commit(a), commit(b)
    return {"a": ca, "b": cb, "same": ca == cb if ca and cb else None}


def side_cost(params: Params, side: Side) -> dict:
    """What the side's run cost (its cost.* metrics, priced at cost.* in params.yaml as status
    prices them) and, for a version, what all runs since the champion before it cost."""
    m = side.metrics
    run_usd = (
        price(m["cost.cpu_s"], m["cost.gpu_s"], params.cost)
        if {"cost.cpu_s", "cost.gpu_s"} <= set(m)
        else None
    )
    ledger = version_cost(side.version, params.cost) or {}
    if run_usd is None:
        run_usd = ledger.get("training_run_usd")
    return {
        "run_usd": run_usd,
        "device_s": m.get("cost.device_s"),
        "gpu_s": m.get("cost.gpu_s"),
        "train_tokens": m.get("cost.train_tokens"),
        "train_flops": m.get("cost.train_flops"),
        "cumulative_usd": ledger.get("training_cumulative_usd"),
        "cumulative_runs": ledger.get("cumulative_runs"),
        "cumulative_failed_runs": ledger.get("cumulative_failed_runs"),
        "cumulative_since": ledger.get("cumulative_since"),
        "inference_usd_per_million_tokens": ledger.get("inference_usd_per_million_tokens"),
    }


def ui_base(tracking_uri: str, ui_url: str | None = None) -> tuple[str, str | None]:
    """(the MLflow UI's address, the command that starts it there, or None): a tracking server
    serves its own UI; a local store (SQLite, files) is shown by `mlflow ui` on the same store,
    on its default port."""
    if ui_url:
        return ui_url.rstrip("/"), None
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return public_uri(tracking_uri).rstrip("/"), None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {tracking_uri}"


def ui_link(sides: list[Side], tracking_uri: str, ui_url: str | None = None) -> dict | None:
    """The UI's compare page for the sides' runs: its route `#/compare-runs?runs=[...]&experiments=[...]`
    (MLflow 3.17's web app), the JSON lists percent-encoded so that a terminal links the whole URL."""
    runs = list(dict.fromkeys(s.run.info.run_id for s in sides if s.run))
    experiments = list(dict.fromkeys(s.run.info.experiment_id for s in sides if s.run))
    if not runs:
        return None
    base, command = ui_base(tracking_uri, ui_url)

    def encoded(values: list[str]) -> str:
        return quote(json.dumps(values, separators=(",", ":")), safe="")

    url = f"{base}/#/compare-runs?runs={encoded(runs)}&experiments={encoded(experiments)}"
    return {"url": url, "start_with": command, "runs": runs, "experiments": experiments}


# Text, 120 columns wide.


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _row(label: str, a: str, b: str, last: str = "") -> str:
    line = f"{_cut(label, LABEL_W):<{LABEL_W}}  {_cut(a, VALUE_W):<{VALUE_W}}  {_cut(b, VALUE_W):<{VALUE_W}}"
    return (line + "  " + _cut(last, LAST_W)).rstrip()


def _title(text: str, last: str) -> str:
    """A section's title; `last` heads the last column when the title leaves room for it."""
    room = WIDTH - LAST_W
    return f"{text:<{room}}{last}".rstrip() if len(text) < room else text


def _wide(label: str, text: str) -> list[str]:
    """A text across both value columns, wrapped; an interval "[-0.0110, +0.0030]" kept whole."""
    width = WIDTH - LABEL_W - 2
    kept = re.sub(r"\[[^\]]*\]", lambda m: m.group().replace(" ", "\0"), text)
    lines = [line.replace("\0", " ") for line in textwrap.wrap(kept, width, break_on_hyphens=False)] or ["-"]
    return [f"{_cut(label, LABEL_W):<{LABEL_W}}  {lines[0]}"] + [
        " " * (LABEL_W + 2) + line for line in lines[1:]
    ]


def _numbers(*values) -> list[str]:
    """A row's numbers in one format: whole numbers with thousands separators when all of them
    are whole (counts, steps), else decimals by the row's largest value, four below 100 (bits per
    byte reads 2.0000 beside 2.5000), two up to 100,000, none above; each fits its column."""
    known = [abs(float(v)) for v in values if v is not None]
    whole = all(v.is_integer() and v < 1e12 for v in known)
    largest = max(known, default=0.0)
    decimals = 4 if largest < 100 else 2 if largest < 1e5 else 0

    def one(value) -> str:
        if value is None:
            return "-"
        value = float(value)
        if whole:
            return f"{int(value):,}"
        if value and (abs(value) >= 1e9 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.{decimals}f}"

    return [one(v) for v in values]


def _metric_row(m: dict) -> str:
    a, b, diff = _numbers(m["a"], m["b"], None if m["diff"] is None else abs(m["diff"]))
    sign = "" if m["diff"] is None else ("-" if m["diff"] < 0 else "+")
    return _row(m["key"], a, b, sign + diff if m["diff"] is not None else "")


def _bpb(value: float) -> str:
    return f"{value + 0.0:+.4f}"  # + 0.0: -0.0 reads +0.0000, as the gate's own reasons write it


def _short(value: str | None) -> str:
    """A hash as git shortens a commit, keeping what follows it (-dirty)."""
    if not value:
        return "-"
    head = re.match(r"[0-9a-f]{16,}", value)
    return value[:SHORT_HASH] + value[head.end() :].replace(".dir", "") if head else value


def _when(millis: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(millis / 1000)) if millis else "-"


def _same(same: bool | None) -> str:
    return {True: "same", False: "differs", None: ""}[same]


def format_comparison(c: dict) -> list[str]:
    a, b = c["a"], c["b"]
    lines = [f"model {c['model']}: A is {a['label']}, B is {b['label']}"]
    if c["note"]:
        lines.append(f"({c['note']})")
    lines += [
        "",
        _row("", f"A: {a['label']}", f"B: {b['label']}"),
        _row("run", a["run_id"] or "-", b["run_id"] or "-"),
        _row("run name", a["run_name"] or "-", b["run_name"] or "-"),
        _row("run status", (a["run_status"] or "-").lower(), (b["run_status"] or "-").lower()),
        _row("started (UTC)", _when(a["started"]), _when(b["started"])),
        _row("registered (UTC)", _when(a["registered"]), _when(b["registered"])),
        _row("made by", a["made_by"] or "-", b["made_by"] or "-"),
    ]
    lines += _params_lines(c["params"])
    lines += ["", _title("metrics (last logged value)", "B - A")]
    lines += [_metric_row(m) for m in c["metrics"]]
    if not c["metrics"]:
        lines.append("  no metrics logged in either run")
    lines += _gate_lines(c["gate"])
    data = c["data"]
    lines += ["", "data (DVC hashes, shortened: --json has them whole)"]
    lines += [_row(r["key"], _short(r["a"]), _short(r["b"]), _same(r["same"])) for r in data["rows"]]
    lines += _wide("data", data["verdict"])
    code = c["code"]
    lines += ["", _row("code (git commit)", _short(code["a"]), _short(code["b"]), _same(code["same"]))]
    lines += _cost_lines(c["cost"], a["label"], b["label"])
    ui = c["ui"]
    lines.append("")
    if ui is None:
        lines.append("MLflow UI: neither side has a run to show")
    else:
        lines += ["MLflow UI, the two runs side by side:", ui["url"]]
        # the URL and the command stay whole, however long: a terminal wraps them, copy-paste keeps them
        lines += [f"(start the UI first: {ui['start_with']})"] if ui["start_with"] else []
    return lines


def _params_lines(params: dict) -> list[str]:
    if params["note"]:
        return ["", f"params: {params['note']}"]
    if not params["differ"]:
        return ["", f"params: all {params['compared']} logged are the same"]
    lines = ["", f"params that differ ({len(params['differ'])} of {params['compared']} logged)"]
    for p in params["differ"]:
        lines.append(_row(p["key"], "-" if p["a"] is None else p["a"], "-" if p["b"] is None else p["b"]))
    return lines


def _gate_lines(gate: dict) -> list[str]:
    lines = ["", "promotion gate (paired bootstrap over validation documents, 95% interval)"]
    interval = gate["b_minus_a"]
    if interval:
        text = (
            f"{_bpb(interval['delta'])} bpb [{_bpb(interval['low'])}, {_bpb(interval['high'])}] "
            f"from {interval['measured_by']}'s gate against {interval['against']}, "
            f"on {interval['documents']:,} documents"
        )
        lines += _wide("bits per byte, B - A", text)
    else:
        lines += _wide(
            "bits per byte, B - A", "no interval: neither version's gate measured it against the other"
        )
    for row in gate.get("slices", []):
        text = f"{row['documents']} documents, no interval"
        if "delta" in row:
            text = (
                f"{_bpb(row['delta'])} bpb [{_bpb(row['low'])}, {_bpb(row['high'])}] "
                f"on {row['documents']:,} documents"
            )
        lines += _wide(
            f"slice {row['slice']}, B - A", f"{text}: {row['verdict']} in {row['measured_by']}'s gate"
        )
    for d in gate["decisions"]:
        lines += _wide(f"v{d['version']} decision", d["decision"] or "none recorded (publish cut short?)")
    return lines


def _cost_lines(cost: dict, label_a: str, label_b: str) -> list[str]:
    a, b = cost["a"], cost["b"]
    rates = f"${cost['cpu_hour_usd']:g} a CPU hour and ${cost['gpu_hour_usd']:g} a GPU hour"
    lines = ["", _title(f"cost, priced at {rates} (cost.* in params.yaml)", "B - A")]

    def usd(value) -> str:
        return "-" if value is None else format_usd(value)

    def since(side: dict) -> str:
        if side["cumulative_runs"] is None:
            return "-"
        failed = f", {side['cumulative_failed_runs']} failed" if side["cumulative_failed_runs"] else ""
        return f"{side['cumulative_runs']} since {side['cumulative_since']}{failed}"

    lines += [
        _row("training run", usd(a["run_usd"]), usd(b["run_usd"]), _signed_usd(a["run_usd"], b["run_usd"])),
        _row("device-seconds (GPU-seconds)", _seconds(a), _seconds(b)),
        _row("training FLOPs", _flops(a["train_flops"]), _flops(b["train_flops"])),
        _row("all runs to arrive at it", usd(a["cumulative_usd"]), usd(b["cumulative_usd"])),
        _row("runs counted", since(a), since(b)),
        _row(
            "inference per million tokens",
            usd(a["inference_usd_per_million_tokens"]),
            usd(b["inference_usd_per_million_tokens"]),
        ),
    ]
    unknown = [
        label
        for label, side in ((label_a, a), (label_b, b))
        if side["run_usd"] is None and side["cumulative_usd"] is None
    ]
    if unknown:
        lines.append(
            f"  no cost ledger for {' and '.join(unknown)} (published before it, or outside a flow run)"
        )
    return lines


def _signed_usd(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    return ("-" if b < a else "+") + format_usd(abs(b - a))


def _seconds(side: dict) -> str:
    if side["device_s"] is None:
        return "-"
    gpu = f" ({side['gpu_s']:,.1f})" if side["gpu_s"] else ""
    return f"{side['device_s']:,.1f}{gpu}"


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
