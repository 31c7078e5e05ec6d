"""The promotion gate: whether the version publish registered serves, and the moves of @champion.

    trainpipe publish    # publish_model: register models/ as a new version @challenger; gate @champion

publish_model registers through the publish stage (pipelines.stages.publish.register_challenger),
then decides; it sits in commands because it calls that stage and the evaluate stage's scorer.

The promotion gate pairs the challenger's and the champion's bits on each validation document
and bootstraps the difference in bits per byte (pipelines.core.bootstrap): the challenger is promoted
only if the whole 95% interval lies below -publish.min_improvement_bpb, and no evaluation slice
blocks it: the same bootstrap on each slice's documents (pipelines.core.slices), a slice surely worse
by more than publish.slice_tolerance keeps the champion (decide_promotion_by_slices). Each version keeps its
per-document scores in its run (the tag per_document_scores names the artifact) and the interval
in its tags (bpb_delta, bpb_delta_low, bpb_delta_high, bpb_delta_vs, ...). The champion's stored
scores are paired only under equal score keys (validation set, token cap, context, precision,
scoring code: see pipelines.stages.evaluate) and the same documents; otherwise, or when it has none
(published before per-document scores), it is re-scored exactly as the challenger was: the same
documents, context and precision. A champion whose block_size is shorter than the challenger's
context cannot be scored at that context: then both are re-scored at the champion's block_size,
and the reason says so.

A challenger that reproduces a secret curation removed from its data (evaluate's memorization
check: metrics.json's memorized_secrets) is never promoted, whatever its score, even with no
champion to beat (refuse_memorized); the reason names the kinds and reports/memorization.json.

A version becomes champion only after it loaded and answered in a fresh process (smoke_test).
Every move of @champion (move_champion: the gate's, and promote's and rollback's in
pipelines.commands.promote) is recorded: a `promoted_at` tag on the version and, on the registered
model, one tag per move (`champion_move/<time>-<random>`, a JSON record), which `trainpipe history`
lists and rollback walks back. A tag per move, never rewritten, so concurrent moves cannot lose a
record. The gate's move is conditional: @champion is read again after the smoke test and moves
only if it is still the version the gate compared with; otherwise the gate runs again against the
new one (_decide_aliases, GATE_RUNS). See docs/promotion-gate.md, "Two writers, one registry".
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    champion_history,
    delete_version_tag,
    download_model_artifacts,
    download_run_artifact,
    find_version_with_weights,
    get_champion,
    get_tracking_uri,
    get_version,
    mlflow_failure,
    record_move,
    set_alias,
    set_version_tags,
)
from pipelines.core.bootstrap import BpbDelta, paired_bootstrap, read_bpb_delta
from pipelines.core.data import read_json
from pipelines.core.errors import ChampionMovedError, SmokeTestError, TrainpipeError
from pipelines.core.model_dir import CONFIG_FILE
from pipelines.core.params import Params
from pipelines.core.scoring import MEMORIZATION_FILE
from pipelines.core.slices import SliceCheck, check_slices, read_slice_tags, slice_tags
from pipelines.stages.parent import ARTIFACT_FILES
from pipelines.stages.publish import (
    PER_DOCUMENT_TAG,
    SCORE_KEY_TAG,
    challenger_texts,
    pause_for_test,
    read_document_scores,
    read_trained_model,
    register_challenger,
    tag_value,
)

# what each score-key field is called in a reason
SCORE_FIELD_NAMES = {
    "val_set_sha256": "validation set",
    "score_max_tokens": "token cap",
    "score_context": "context",
    "score_bf16": "precision",
    "scoring_code_sha256": "scoring code",
}
DECISION_TAG = "alias_decision"  # set last: a version without it had its publish cut short
# How many times publish gates a version against a champion that moved under it before it gives up
GATE_RUNS = 3
ANY_CHAMPION = "any"  # move_champion's compared_with for a move by hand: whichever version serves


def publish_model(params: Params, lineage: dict[str, str] | None = None, run_id: str | None = None) -> dict:
    """Log models/ as a pyfunc model, register it @challenger, and move @champion if it is better.

    Safe to run again after it was killed at any point: a version is registered with all its
    tags in one call, after its model is logged; aliases move after that; DECISION_TAG is set
    last. A re-run that finds these weights registered without DECISION_TAG finishes that
    version's alias decision instead of registering the weights again."""
    model_dir, metrics = read_trained_model(params)
    try:
        return _publish(params, model_dir, metrics, lineage, run_id)
    except MlflowException as exc:
        raise TrainpipeError(
            f"publishing to MLflow at {get_tracking_uri()} failed ({mlflow_failure(exc)}); "
            f"the trained model stays in {model_dir}/: run `trainpipe publish` to finish"
        ) from None


def _publish(
    params: Params, model_dir: Path, metrics: dict, lineage: dict | None, run_id: str | None
) -> dict:
    name = params.publish.model_name
    bpb = float(metrics["val_bits_per_byte"])
    client = MlflowClient()
    weights_sha = str(metrics["weights_sha256"])  # read_trained_model checked it is models/'s
    existing = find_version_with_weights(client, name, weights_sha)
    if existing is not None and (DECISION_TAG in existing.tags or "rolled_back_at" in existing.tags):
        # an unchanged re-run: registering the same weights again adds nothing
        champion = get_champion(client, name)
        return {
            "version": str(existing.version),
            "model_uri": f"models:/{name}/{existing.version}",
            "run_id": existing.run_id,
            "champion_version": str(champion.version) if champion else None,
            "promoted": False,
            "reason": f"these weights are already registered as v{existing.version}: nothing new to publish",
            "val_bits_per_byte": bpb,
            "champion_val_bits_per_byte": _float_tag(champion, "val_bits_per_byte") if champion else None,
            "bpb_delta": _delta_dict(read_bpb_delta(existing.tags)),
            "slices": read_slice_tags(existing.tags),
        }
    if existing is None:
        _check_rescorable(client, params, metrics)  # fail before a version exists, not after
        version, run_id = register_challenger(params, model_dir, metrics, lineage, run_id)
        finishing = ""
    else:
        version, run_id = str(existing.version), existing.run_id
        finishing = f" (finished the publish of v{version} that was cut short)"
    with tempfile.TemporaryDirectory(prefix="trainpipe-publish-") as tmp:
        promoted, reason, champion_version, champion_bpb, delta = _decide_aliases(
            client, params, version, model_dir, metrics, Path(tmp)
        )
    set_version_tags(client, name, version, {DECISION_TAG: reason})
    # each slice's interval, set with the whole set's (None: nothing was compared)
    slices = read_slice_tags(get_version(client, name, version).tags) if delta else None
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run_id,
        "champion_version": champion_version,
        "promoted": promoted,
        "reason": reason + finishing,
        "val_bits_per_byte": bpb,
        "champion_val_bits_per_byte": champion_bpb,
        "bpb_delta": _delta_dict(delta),  # challenger minus champion, with its 95% interval
        "slices": slices,  # pipelines.core.slices.slice_tags: the evaluation slices' intervals and verdicts
    }


def _delta_dict(delta: BpbDelta | None) -> dict | None:
    return asdict(delta) if delta else None


def _float_tag(version: ModelVersion, key: str) -> float | None:
    try:
        return float(version.tags[key])
    except (KeyError, ValueError):
        return None


def _check_rescorable(client: MlflowClient, params: Params, metrics: dict) -> None:
    """If the gate will have to re-score the champion, the challenger's documents must be at hand."""
    champion = get_champion(client, params.publish.model_name)
    if champion is not None and _rescore_why(champion, metrics):
        challenger_texts(params, metrics)


def _decide_aliases(client, params: Params, version: str, model_dir: Path, metrics: dict, work_dir: Path):
    """@challenger, then the promotion gate: (promoted, reason, champion version, champion bpb,
    the interval of challenger minus champion or None). The interval's tags are set on the version
    before any alias moves, so a publish cut short after the move still has them.

    Another workspace may move @champion while the gate scores and smoke-tests (minutes): the move
    is conditional on the champion the gate compared with (move_champion's compared_with). If it
    moved, the gate runs again against the new one, up to GATE_RUNS times in all."""
    name = params.publish.model_name
    set_alias(client, name, CHALLENGER, version)
    pause_for_test("challenger-alias-set")
    for run in range(1, GATE_RUNS + 1):
        try:
            return _gate(client, params, version, model_dir, metrics, work_dir / f"gate-{run}")
        except ChampionMovedError as moved:
            if run == GATE_RUNS:
                raise ChampionMovedError(
                    f"@champion of {name} kept moving while v{version} was gated ({GATE_RUNS} times; "
                    f"last compared with {_v(moved.expected)}, then found {_v(moved.found)}): "
                    f"v{version} did not become champion; run `trainpipe publish` again",
                    moved.expected,
                    moved.found,
                ) from None
            print(
                f"publish: @champion moved from {_v(moved.expected)} to {_v(moved.found)} while "
                f"v{version} was gated: gating again against {_v(moved.found)}",
                flush=True,
            )
    raise AssertionError("unreachable")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "no champion"


def _gate(client, params: Params, version: str, model_dir: Path, metrics: dict, work_dir: Path):
    """One run of the gate against the champion it reads now (see _decide_aliases). Raises
    ChampionMovedError, the alias unmoved, when @champion is no longer that one at the move."""
    name = params.publish.model_name
    bpb = float(metrics["val_bits_per_byte"])
    work_dir.mkdir()
    champion = get_champion(client, name)
    if champion is not None and str(champion.version) == version:
        # a killed publish had passed the gate and moved @champion: finish recording the move
        delta = read_bpb_delta(get_version(client, name, version).tags)
        passed = f": challenger {delta.text()} vs v{delta.vs}" if delta else ""
        move_champion(client, name, version, reason=f"passed the promotion gate{passed}")
        return True, f"v{version} became champion ({_bpb_text(bpb)} bpb)", version, bpb, delta
    if champion is None:
        promoted, reason = decide_promotion(
            version, bpb, None, None, None, params.publish.min_improvement_bpb
        )
        promoted, reason = refuse_memorized(params, version, None, metrics, promoted, reason)
        if not promoted:
            return False, reason, None, None, None
        move_champion(
            client,
            name,
            version,
            reason=reason,
            smoke_timeout_s=params.serve.smoke_timeout_s,
            compared_with=None,
        )
        return promoted, reason, version, None, None
    documents = read_document_scores(params.evaluate, metrics)
    why = _rescore_why(champion, metrics)
    if not why:
        champion_bits, why = _stored_document_scores(client, champion, documents, work_dir)
    if why:
        bits, champion_bits, note = _rescore_champion(
            params, champion, model_dir, metrics, documents, why, work_dir
        )
    else:
        bits, note = [float(d["bits"]) for d in documents], ""
    doc_bytes = [int(d["bytes"]) for d in documents]
    delta = paired_bootstrap(
        bits,
        champion_bits,
        doc_bytes,
        params.publish.bootstrap_resamples,
        params.publish.bootstrap_seed,
        vs=str(champion.version),
    )
    checks = _check_slices(params, documents, bits, champion_bits, doc_bytes, str(champion.version))
    set_version_tags(client, name, version, delta.tags() | _slice_tags(params, checks, str(champion.version)))
    bpb, champion_bpb = sum(bits) / sum(doc_bytes), sum(champion_bits) / sum(doc_bytes)
    promoted, reason = decide_promotion_by_slices(
        version,
        bpb,
        str(champion.version),
        champion_bpb,
        delta,
        params.publish.min_improvement_bpb,
        checks,
        params.publish.slice_tolerance,
        note,
    )
    promoted, reason = refuse_memorized(params, version, str(champion.version), metrics, promoted, reason)
    promoted, reason = replace_a_leaking_champion(
        params, champion, version, metrics, delta, checks, work_dir, promoted, reason
    )
    pause_for_test("gate-decided")
    if promoted:
        move_champion(
            client,
            name,
            version,
            reason=reason,
            smoke_timeout_s=params.serve.smoke_timeout_s,
            compared_with=str(champion.version),
        )
    return promoted, reason, version if promoted else str(champion.version), champion_bpb, delta


def _check_slices(params: Params, documents, bits, champion_bits, doc_bytes, vs: str) -> list[SliceCheck]:
    """Each evaluation slice's interval and verdict, with the whole set's resamples and seed."""
    return check_slices(
        [str(d["path"]) for d in documents],
        bits,
        champion_bits,
        doc_bytes,
        params.evaluate.slices,
        resamples=params.publish.bootstrap_resamples,
        seed=params.publish.bootstrap_seed,
        tolerance=params.publish.slice_tolerance,
        min_documents=params.publish.slice_min_documents,
        vs=vs,
    )


def _slice_tags(params: Params, checks: list[SliceCheck], vs: str) -> dict[str, str]:
    return slice_tags(checks, params.publish.slice_tolerance, params.publish.slice_min_documents, vs)


def _rescore_why(champion: ModelVersion, metrics: dict) -> str:
    """Why the champion's stored scores do not pair with the challenger's; "" if they may (the
    documents are checked when they are read, _stored_document_scores)."""
    if "val_bits_per_byte" not in champion.tags:
        return "it had no score"
    if SCORE_KEY_TAG not in champion.tags:
        return "it was scored before score keys"
    if champion.tags[SCORE_KEY_TAG] != metrics[SCORE_KEY_TAG]:
        differ = [
            name for f, name in SCORE_FIELD_NAMES.items() if champion.tags.get(f) != tag_value(metrics[f])
        ]
        return "it was scored with another " + ", ".join(differ or ["score key"])
    if PER_DOCUMENT_TAG not in champion.tags:
        return "it has no per-document scores (published before them)"
    return ""


def _stored_document_scores(
    client: MlflowClient, champion: ModelVersion, documents: list[dict], work_dir: Path
) -> tuple[list[float] | None, str]:
    """(the champion's bits on each of the challenger's documents, "") from the scores its publish
    logged, or (None, why they cannot be used)."""
    try:
        local = download_run_artifact(client, champion.run_id, champion.tags[PER_DOCUMENT_TAG], str(work_dir))
        stored = read_json(local)
    except (MlflowException, OSError, json.JSONDecodeError):
        return None, "its per-document scores could not be read"
    if not isinstance(stored, dict) or (stored.get("weights_sha256"), stored.get("score_key")) != (
        champion.tags.get("weights_sha256"),
        champion.tags.get(SCORE_KEY_TAG),
    ):
        return None, "its per-document scores are not of its weights and score key"
    theirs = stored.get("documents") or []
    if [(d.get("path"), d.get("sha256")) for d in theirs] != [(d["path"], d["sha256"]) for d in documents]:
        # equal keys, yet a token cap took other documents with another tokenizer
        return None, "its per-document scores are of other documents"
    return [float(d["bits"]) for d in theirs], ""


def _rescore_champion(
    params: Params,
    champion: ModelVersion,
    model_dir: Path,
    metrics: dict,
    documents: list[dict],
    why: str,
    work_dir: Path,
) -> tuple[list[float], list[float], str]:
    """(challenger bits, champion bits, note), per document: the champion scored exactly as the
    challenger was, on the same documents with the same precision and context. A champion with a
    shorter block_size cannot take the challenger's context: both are then scored at the champion's."""
    from pipelines.stages.evaluate import score_saved_model

    texts = challenger_texts(params, metrics)
    champion_dir = _download_champion(champion, work_dir)
    bf16 = bool(metrics["score_bf16"])
    context = int(metrics["score_context"])
    bits = [float(d["bits"]) for d in documents]
    note = f"champion re-scored as the challenger was: {why}"
    champion_block = int(read_json(champion_dir / CONFIG_FILE)["block_size"])
    if champion_block < context:
        bits = score_saved_model(model_dir, texts, bf16=bf16, context=champion_block)["doc_bits"]
        note += (
            f"; both scored at the champion's context of {champion_block} tokens, "
            f"not the challenger's {context}"
        )
        context = champion_block
    return bits, score_saved_model(champion_dir, texts, bf16=bf16, context=context)["doc_bits"], note


def _download_champion(champion: ModelVersion, work_dir: Path) -> Path:
    """The champion's weights, config and tokenizer in a model dir as the train stage writes it."""
    uri = f"models:/{champion.name}/{champion.version}"
    artifacts = download_model_artifacts(uri, str(work_dir / "champion"))
    champion_dir = work_dir / "champion_model"
    champion_dir.mkdir()
    for key, filename in ARTIFACT_FILES.items():
        shutil.copy(artifacts[key], champion_dir / filename)
    return champion_dir


def decide_promotion(
    version: str,
    bpb: float,
    champion_version: str | None,
    champion_bpb: float | None,
    delta: BpbDelta | None,
    margin: float,
    note: str = "",
) -> tuple[bool, str]:
    """The promotion gate: (promote?, one-line reason). Promote only when the whole interval of
    challenger minus champion lies below -margin; a first version becomes champion. bpb and
    champion_bpb are on the documents the interval was measured on; note says how the two were
    made comparable, if they had to be."""
    if champion_version is None:
        return True, f"no champion yet: v{version} ({_bpb_text(bpb)} bpb) becomes champion"
    if delta is None or champion_bpb is None:
        raise ValueError("a challenger is compared with a champion through the interval of their difference")
    details = f"{_bpb_text(bpb)} vs {_bpb_text(champion_bpb)} bpb on {delta.documents} documents"
    details += f"; {note}" if note else ""
    by = f" by more than {margin} bpb" if margin else ""
    if delta.high < -margin:
        return (
            True,
            f"challenger {delta.text()}: better{by}, v{version} becomes champion in place of "
            f"v{champion_version} ({details})",
        )
    if delta.low > 0:
        verdict = "worse"
    elif delta.high < 0:
        verdict = f"better, but not surely{by}"
    else:
        verdict = "not significant"
    return (
        False,
        f"challenger {delta.text()}: {verdict}, champion v{champion_version} keeps serving ({details})",
    )


def decide_promotion_by_slices(
    version: str,
    bpb: float,
    champion_version: str,
    champion_bpb: float,
    delta: BpbDelta,
    margin: float,
    checks: list[SliceCheck],
    tolerance: float,
    note: str = "",
) -> tuple[bool, str]:
    """decide_promotion on the whole set, then the slices: a slice that blocks (surely worse by
    more than tolerance, pipelines.core.slices.slice_verdict) keeps the champion serving, however much
    better the challenger is overall; the reason names each such slice and its interval."""
    promoted, reason = decide_promotion(version, bpb, champion_version, champion_bpb, delta, margin, note)
    blocking = [c for c in checks if c.blocks]
    if not blocking:
        return promoted, reason
    worse = "worse on " + " and on ".join(
        f"slice {c.name} by {c.delta.text()} ({c.documents} documents)" for c in blocking
    )
    worse += f", surely by more than publish.slice_tolerance ({tolerance} bpb)"
    if not promoted:
        return False, f"{reason}; also {worse}"
    details = f"{_bpb_text(bpb)} vs {_bpb_text(champion_bpb)} bpb on {delta.documents} documents"
    details += f"; {note}" if note else ""
    return (
        False,
        f"challenger {delta.text()}: better overall, but {worse}: champion v{champion_version} keeps "
        f"serving ({details})",
    )


def refuse_memorized(
    params: Params, version: str, champion_version: str | None, metrics: dict, promoted: bool, reason: str
) -> tuple[bool, str]:
    """The memorization gate, after the score's: (promote?, reason). A challenger whose greedy
    completions reproduced any secret curation removed is refused, better score or not; the
    reason says how many, of which kinds, and keeps the score's verdict after it."""
    memorized = int(metrics.get("memorized_secrets") or 0)
    if memorized <= 0:
        return promoted, reason
    report = Path(params.evaluate.reports_dir) / MEMORIZATION_FILE
    try:
        checked = read_json(report)
        per_kind = checked["per_kind"] if checked.get("weights_sha256") == metrics["weights_sha256"] else {}
    except (OSError, ValueError, KeyError, AttributeError):
        per_kind = {}
    kinds = ", ".join(f"{kind} {f['memorized']}" for kind, f in per_kind.items() if f.get("memorized"))
    serving = f"champion v{champion_version} keeps serving" if champion_version else "no champion is set"
    secrets = "secret" if memorized == 1 else "secrets"
    return False, (
        f"v{version} reproduces {memorized} removed {secrets}{f' ({kinds})' if kinds else ''} of "
        f"{metrics.get('memorization_checked', '?')} checked from their context (see {report}): "
        f"never promoted, {serving} (by its score alone: {reason})"
    )


def replace_a_leaking_champion(
    params: Params,
    champion: ModelVersion,
    version: str,
    metrics: dict,
    delta: BpbDelta,
    checks: list[SliceCheck],
    work_dir: Path,
    promoted: bool,
    reason: str,
) -> tuple[bool, str]:
    """A champion that reproduces secrets the data now removes is a defect, not a bar to clear: a
    challenger that reproduces none replaces it unless it is surely worse, overall (the whole
    interval above 0) or on a slice. The champion is checked only when that could change the
    decision: the challenger was not promoted, memorized nothing and is not surely worse."""
    if promoted or int(metrics.get("memorized_secrets") or 0) > 0:
        return promoted, reason
    if delta.low > 0 or any(c.blocks for c in checks):
        return promoted, reason
    from pipelines.core.model_dir import load_model_dir
    from pipelines.stages.evaluate import check_memorization

    champion_dir = work_dir / "champion_model"
    if not champion_dir.is_dir():  # not downloaded for a re-score
        champion_dir = _download_champion(champion, work_dir)
    model, tokenizer = load_model_dir(champion_dir)
    leaked = int(check_memorization(params, model, tokenizer)["memorized_secrets"])
    if not leaked:
        return promoted, reason
    secrets = "secret" if leaked == 1 else "secrets"
    return True, (
        f"champion v{champion.version} reproduces {leaked} removed {secrets} that v{version} does not, "
        f"and v{version} is not surely worse (challenger {delta.text()}): v{version} becomes champion "
        f"in place of v{champion.version} (by its score alone: {reason})"
    )


def smoke_test(client: MlflowClient, name: str, version: str, timeout_s: float) -> str:
    """Load the version in a fresh process as serving does and check its answers (pipelines.serving.smoke);
    the result is stored on the version. SmokeTestError when it fails: it never becomes champion.
    A registered version's files never change, so a pass is reused while the serving environment
    and the test are the same (smoke_test_key): a rollback does not wait for a test its target
    already passed. Whether the stored files are still those registered is checked every time."""
    from pipelines.serving.smoke import SmokeFailure, run_smoke_test, smoke_test_key, verify_stored_model

    key = smoke_test_key()
    tags = get_version(client, name, version).tags
    if tags.get("smoke_test", "").startswith("passed") and tags.get("smoke_test_key") == key:
        try:
            verify_stored_model(f"models:/{name}/{version}")
        except SmokeFailure as exc:
            set_version_tags(
                client, name, version, {"smoke_test": f"failed: {exc}", "smoke_tested_at": utc_now()}
            )
            raise SmokeTestError(
                f"v{version} of {name} failed its smoke test ({exc}): it does not become champion"
            ) from None
        return tags["smoke_test"]
    print(f"smoke test of {name} v{version}: loading it in a fresh process", flush=True)
    passed, result, throughput = run_smoke_test(f"models:/{name}/{version}", version, timeout_s)
    tags = {"smoke_test": result, "smoke_test_key": key, "smoke_tested_at": utc_now()}
    if throughput:  # the version's inference speed, which status prices (pipelines/core/ledger.py)
        tags |= {
            "inference_tokens_per_s": repr(float(throughput["tokens_per_s"])),
            "inference_device": str(throughput["device"]),
            "inference_measured": f"smoke test: {throughput['new_tokens']} new tokens in "
            f"{throughput['seconds']:.2f} s, {throughput.get('prompts', 3)} prompts in one request, warm",
        }
    set_version_tags(client, name, version, tags)
    if not passed:
        why = result.removeprefix("failed: ")
        raise SmokeTestError(
            f"v{version} of {name} failed its smoke test ({why}): it does not become champion"
        )
    return result


def move_champion(
    client: MlflowClient,
    name: str,
    version: str,
    reason: str | None = None,
    command: str | None = None,
    smoke_timeout_s: float = 120.0,
    compared_with: str | None = ANY_CHAMPION,
) -> None:
    """Point @champion at version and record the move (as its own tag: nothing read and rewritten).
    Called again for a version that is already champion, it records the move once: a killed
    publish may have moved the alias without recording it.

    compared_with is the champion the move was decided against (None: there was none); if
    @champion is another when the alias is about to move, ChampionMovedError and the alias stays.
    ANY_CHAMPION (a move by hand, `trainpipe promote`) replaces whichever version serves."""
    version = str(version)
    champion = get_champion(client, name)
    moved_from = str(champion.version) if champion else None
    finishing, recorded = moved_from == version, False
    if finishing:
        last = (champion_history(client, name) or [{}])[-1]
        recorded = last.get("to") == version
        moved_from = last.get("to")  # the champion before the move that was cut short
    else:
        smoke_test(
            client, name, version, smoke_timeout_s
        )  # raises SmokeTestError: the alias stays where it is
        # The smoke test took up to smoke_timeout_s: read @champion again, just before the move.
        # MLflow has no compare-and-set on an alias, so a writer that moves it between this read
        # and set_alias (one registry request: ~10 ms on SQLite, plus a round trip to a server)
        # is still replaced unseen (docs/promotion-gate.md, "Two writers, one registry").
        champion = get_champion(client, name)
        moved_from = str(champion.version) if champion else None
        if compared_with != ANY_CHAMPION and moved_from != compared_with:
            raise ChampionMovedError(
                f"@champion of {name} moved from {_v(compared_with)} to {_v(moved_from)} while "
                f"v{version} was about to replace it: @champion left at {_v(moved_from)}",
                compared_with,
                moved_from,
            )
        set_alias(client, name, CHAMPION, version)
    pause_for_test("champion-alias-set")
    set_version_tags(client, name, version, {"promoted_at": utc_now()})
    delete_version_tag(client, name, version, "rolled_back_at")
    if recorded:
        return
    reason = reason or "passed the promotion gate"
    if finishing:
        reason += " (recorded by the run that finished the move)"
    from pipelines.adapters.runlock import current_command

    command = command or current_command() or "publish"
    record_move(client, name, moved_from, version, reason, f"trainpipe {command}", _flow_run_id())


def _flow_run_id() -> str | None:
    """The Prefect flow run this move happens in, if any. Only the flow imports Prefect, so a
    plain `trainpipe promote` does not pay seconds to import it just to learn there is none."""
    import sys

    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT__FLOW_RUN_ID") or None
    from prefect.runtime import flow_run

    return flow_run.get_id() or None


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _bpb_text(value: float) -> str:
    return f"{value:.4f}"
