"""The training flow: one Prefect flow run = one MLflow run = one pass over the DVC stages.

Steps, in order:
  0. the inputs check (`dvc repro --single-item inputs`, every run): records the source's files
     and the champion's data profile, the inputs that DVC cannot hash; ingest and curate depend
     on its files, so they re-run only when the source or the champion really changed
  1. ingest, curate, tokenize, train, evaluate: each `dvc repro --single-item STAGE`, skipped
     by DVC when its inputs are unchanged; retried with back-off on transient failures only
     (a failed data gate or a diverged loss is final); a retried train resumes from its
     checkpoint. Each stage is recorded as ran / skipped / resumed@STEP / failed with the
     reason (what `dvc status` saw changed, or DVC's reason to skip): MLflow tags stage.<name>
     and stages.json, and the Prefect artifact
  2. log params, curation counts, metrics and the datasets used (curated, tokens, validation:
     MLflow dataset inputs with DVC's hashes as digests) to the flow's MLflow run
  3. push DVC outputs to the DVC remote, so the run's data and model can be restored; a failed
     push fails the run here, before any alias moves
  4. publish: register the model, set @challenger, move @champion only if it is better and it
     passed its smoke test (loaded and queried in a fresh process, as serving loads it)
  5. serving: every running endpoint (`trainpipe serve` follows @champion) must serve the
     champion within serve.wait_s, else the run fails; none running is said, not a failure
  6. leave a Prefect artifact summarising the run
Throughout, the cost ledger (pipelines/core/ledger.py): each stage process reports its seconds, peak
memory and device into a folder of this run's (pipelines/core/usage.py); after the stages, passed or
failed, they are priced and logged as metrics cost.* of the MLflow run (publish sums them over
the runs since the champion) and shown in the Prefect artifact.

It holds the workspace lock throughout. A flow run that no `trainpipe` command started (a
schedule, a deployment) waits for the lock: at most TRAINPIPE_LOCK_WAIT_S seconds (default 3600).

    trainpipe run                         # or: python -m flows.training
"""

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from pipelines.adapters.dvc_repo import (
    INPUTS_CHECK,
    STAGES,
    StageFailed,
    StageOutcome,
    push,
    repro_stage,
    stage_changes,
    unchanged_stage,
)
from pipelines.adapters.runlock import flow_lock_wait_s, workspace_lock
from pipelines.core.data import read_json, sha256_hex
from pipelines.core.errors import PERMANENT_EXIT_CODES, TrainpipeError
from pipelines.core.ledger import ledger_markdown, ledger_metrics, run_ledger
from pipelines.core.params import PARAMS_FILE, Params, flatten, load_params, override_text, save_overrides
from pipelines.core.scoring import MEMORIZATION_FILE
from pipelines.core.slices import SLICES_FILE
from pipelines.core.usage import (
    USAGE_DIR_ENV,
    note_unreported_attempt,
    read_usage,
    record_flow_seconds,
    stage_work,
)
from pipelines.stages.inputs import CHAMPION_FILE, SOURCE_FILE, check_inputs


class _OneLineForOurErrors(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback. Our own errors (a failed gate,
    a bad parameter, a diverged loss) carry a one-line reason that says it all, and `trainpipe`
    prints it last: drop the traceback from those records, keep the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrainpipeError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_OneLineForOurErrors())


def retry_transient_only(task, task_run, state) -> bool:
    """Retry a stage unless its failure is permanent (bad config, failed gate, NaN loss)."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.exit_code not in PERMANENT_EXIT_CODES
    except Exception:
        return True
    return False


@task(
    retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only, task_run_name="{stage}"
)
def run_stage(stage: str, mlflow_run_id: str, changed: str | None = "", usage_dir: str = "") -> StageOutcome:
    if changed is None:  # `dvc status` found it unchanged: a `dvc repro` would only say so
        return unchanged_stage(stage)
    # Stages that log (train) attach to the flow's MLflow run through MLFLOW_RUN_ID; each stage
    # process reports what it spent into usage_dir (the cost ledger).
    env = {"MLFLOW_RUN_ID": mlflow_run_id, USAGE_DIR_ENV: usage_dir}
    started_ns, started = time.time_ns(), time.monotonic()
    try:
        outcome = repro_stage(stage, env=env, changed=changed)
    except BaseException:  # a stage killed outright wrote no report: its seconds still count
        if usage_dir:
            note_unreported_attempt(usage_dir, stage, started_ns, time.monotonic() - started)
        raise
    if stage == "train" and outcome.ran and usage_dir:  # train's usage report says where it started
        works = stage_work(read_usage(usage_dir, since_ns=started_ns), "train")
        step = max((w.get("resumed_from_step") or 0 for w in works), default=0)
        if step:
            outcome.status, outcome.resumed_from_step = "resumed", step
            outcome.detail = f"resumed from its checkpoint at step {step} ({outcome.reason})"
    return outcome


@task(retries=2, retry_delay_seconds=[5, 30])
def publish(params: Params, lineage: dict, mlflow_run_id: str) -> dict:
    from pipelines.commands.promotion import publish_model

    return publish_model(params, lineage=lineage, run_id=mlflow_run_id)


@task
def reach_endpoints(params: Params, published: dict) -> dict:
    """The champion must reach every running endpoint (they follow @champion) within
    serve.wait_s; a run whose champion did not, fails with the reason."""
    import mlflow

    from pipelines.commands.status import wait_for_champion

    logger = get_run_logger()
    serving = wait_for_champion(params, str(published["champion_version"]), log=logger.info)
    mlflow.set_tags(
        {
            "serving.reason": serving["reason"][:500],
            "serving.endpoints": ", ".join(f"{ep['url']}=v{ep['version']}" for ep in serving["endpoints"])
            or "none",
        }
    )
    logger.info(serving["reason"])
    if serving["failed"]:
        raise TrainpipeError(serving["reason"])
    return serving


@task(retries=2, retry_delay_seconds=[5, 30])
def push_outputs() -> None:
    try:
        push()
    except StageFailed as exc:
        raise StageFailed(
            f"{exc}; nothing was published and @champion did not move: run again once the remote takes the push",
            exc.exit_code,
        ) from None


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("-dirty" if dirty else "")


def lineage(params: Params) -> dict:
    """Where the model came from: code, data (as dvc.lock records it) and this flow run."""
    lock = Path("dvc.lock")
    data_md5 = ""
    if lock.exists():
        import yaml

        for out in yaml.safe_load(lock.read_text())["stages"].get("tokenize", {}).get("outs", []):
            data_md5 = out.get("md5", data_md5)
    return {
        "git_commit": git_commit(),
        "data_version": data_md5,
        "dvc_lock_sha256": sha256_hex(lock.read_bytes()) if lock.exists() else "",
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
    }


def apply_params(params: Params | None) -> Params:
    """A flow started with params (the Prefect UI form) writes the differences to params.yaml,
    where DVC reads them, exactly as `-S` overrides would."""
    current = load_params(PARAMS_FILE)
    if params is None:
        return current
    old, new = flatten(current), flatten(params)
    overrides = [override_text(k, v) for k, v in new.items() if old.get(k) != v]
    return save_overrides(PARAMS_FILE, overrides)


def summary_markdown(
    outcomes: list[StageOutcome],
    curation: dict,
    metrics: dict,
    published: dict | None,
    serving: dict | None = None,
    ledger: dict | None = None,
    parent: dict | None = None,
) -> str:
    rows = "\n".join(f"| {o.stage} | {o.tag} | {o.reason} |" for o in outcomes)
    lines = ["# trainpipe run", "", "| stage | outcome | why |", "|---|---|---|", rows, ""]
    if parent and parent.get("version"):
        lines += [
            "## Fine-tune",
            "",
            f"training started from version {parent['version']} of `{parent.get('model')}` "
            f"(weights sha256 `{str(parent.get('weights_sha256'))[:12]}`), not from random weights",
            "",
        ]
    if curation:
        kept = curation.get("kept", {})
        dropped = ", ".join(f"{k} {v}" for k, v in curation.get("dropped", {}).items() if v) or "none"
        lines += [
            "## Curation",
            "",
            f"documents in: {curation.get('documents_in')}, kept: {kept.get('documents')} "
            f"({kept.get('bytes', 0) / 1e6:.2f} MB); dropped: {dropped}",
            "",
        ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)] + [""]
    if published:
        lines += [
            "## Registry",
            "",
            f"version {published['version']} of `{published['model_uri']}`",
            f"alias decision: {published['reason']}",
            "",
        ]
    if serving:
        lines += ["## Serving", "", serving["reason"], ""]
        lines += [f"- {ep['url']} serves v{ep['version']}" for ep in serving["endpoints"]] + [""]
    if ledger:
        lines += ledger_markdown(ledger, {o.stage: o.tag for o in outcomes})
    return "\n".join(lines)


def pinned_parent(params: Params) -> dict | None:
    """The fine-tune's parent as the parent stage pinned it, or None (from scratch, or not yet pinned)."""
    path = Path(params.finetune.parent_dir) / "parent.json"
    return read_json(path) if params.finetune.parent_version and path.is_file() else None


def curation_table(curation: dict) -> list[dict]:
    """The gate at a glance: counts, then every check that did not simply pass, then drift."""
    kept = curation.get("kept", {})
    rows = [
        {
            "item": "documents in / kept",
            "figure": f"{curation.get('documents_in')} / {kept.get('documents')}",
            "reference": "",
            "verdict": "",
        },
        {
            "item": "MB in / kept",
            "figure": f"{curation.get('bytes_in', 0) / 1e6:.2f} / {kept.get('bytes', 0) / 1e6:.2f}",
            "reference": "",
            "verdict": "",
        },
    ]
    rows += [
        {"item": f"dropped: {k}", "figure": v, "reference": "", "verdict": ""}
        for k, v in curation.get("dropped", {}).items()
        if v
    ]
    rows += [
        {"item": f"scrubbed: {k}", "figure": v, "reference": "", "verdict": ""}
        for k, v in curation.get("scrubbed", {}).items()
        if v
    ]
    rows.append(
        {
            "item": "duplicate clusters",
            "figure": len(curation.get("duplicate_clusters", [])),
            "reference": "",
            "verdict": "",
        }
    )
    gate = curation.get("gate", {})
    drift = curation.get("drift") or {}
    drift_names = {c["check"] for c in drift.get("checks", [])}
    for tier, verdict in (("failed", "block"), ("warnings", "warn")):
        rows += [  # a drift check that blocked or warned is in its tier too: listed once, below
            {"item": c["check"], "figure": c["observed"], "reference": c["need"], "verdict": verdict}
            for c in gate.get(tier, [])
            if c["check"] not in drift_names
        ]
    rows += [
        {"item": c["check"], "figure": c["observed"], "reference": c["champion"], "verdict": c["verdict"]}
        for c in drift.get("checks", [])
    ]
    if drift.get("note"):
        rows.append({"item": "drift", "figure": "", "reference": "", "verdict": drift["note"]})
    rows.append(
        {
            "item": "gate",
            "figure": f"{gate.get('evaluated', 0)} expectations",
            "reference": "",
            "verdict": "passed" if gate.get("passed") else "FAILED",
        }
    )
    return [{key: str(value) for key, value in row.items()} for row in rows]


def curation_metrics(curation: dict) -> dict[str, int]:
    """The curation report's counts as MLflow metrics of the flow's run."""
    return {
        "curate_documents_in": curation.get("documents_in", 0),
        "curate_documents_kept": curation.get("kept", {}).get("documents", 0),
        "curate_bytes_kept": curation.get("kept", {}).get("bytes", 0),
        "curate_duplicate_clusters": len(curation.get("duplicate_clusters", [])),
        # per built-in kind and per curate.scrub_patterns name: curate_scrubbed_email, ...
        **{f"curate_scrubbed_{kind}": n for kind, n in curation.get("scrubbed", {}).items()},
    }


def report_curation(params: Params) -> dict:
    """Log the curate stage's reports (passed or failed) to the flow's MLflow run and Prefect."""
    import mlflow

    reports = Path(params.curate.reports_dir)
    if not (reports / "curation.json").exists():
        return {}
    curation = read_json(reports / "curation.json")
    for name in ("curation.json", "gate.json", "data_profile.json"):
        if (reports / name).exists():
            mlflow.log_artifact(str(reports / name), artifact_path="curation")
    if (reports / "data_docs").is_dir():
        mlflow.log_artifacts(str(reports / "data_docs"), artifact_path="curation/data_docs")
    mlflow.log_metrics(curation_metrics(curation))
    create_table_artifact(
        curation_table(curation),
        key="trainpipe-curation",
        description="the data gate of this run: counts, failed and warning checks, drift against the champion",
    )
    return curation


def log_memorization(params: Params) -> None:
    """The memorization check per kind (metrics.json has its totals) as metrics of the flow's run:
    memorized.<kind> and memorization_checked.<kind>, for each kind it checked."""
    import mlflow

    path = Path(params.evaluate.reports_dir) / MEMORIZATION_FILE
    if not path.exists():
        return
    per_kind = read_json(path).get("per_kind") or {}
    figures = {f"memorized.{kind}": f["memorized"] for kind, f in per_kind.items()}
    figures |= {f"memorization_checked.{kind}": f["checked"] for kind, f in per_kind.items()}
    if figures:
        mlflow.log_metrics(figures)


@flow(name="trainpipe-training", log_prints=True)
def training_flow(params: Params | None = None) -> dict:
    """ingest → curate → tokenize → train → evaluate (DVC stages), then push and publish."""
    # A no-op under `trainpipe run`, which holds the lock already (or refused to start).
    with workspace_lock("run (flow)", wait=True, timeout=flow_lock_wait_s()):
        return _training_flow(params)


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient_only)
def record_inputs(params: Params, usage_dir: str = "") -> dict:
    """The inputs check; what it recorded, for the flow run's MLflow tags (input.source_sha256,
    input.champion) and the printed summary (a warning when the registry could not be read)."""
    started_ns, started = time.time_ns(), time.monotonic()
    for line in check_inputs(params):
        get_run_logger().info(line)
    if usage_dir:  # the check runs in this process now: its wall time is its cost
        record_flow_seconds(
            usage_dir, INPUTS_CHECK, started_ns, time.monotonic() - started, "in the flow's process"
        )
    inputs_dir = Path(params.data.inputs_dir)
    champion = read_json(inputs_dir / CHAMPION_FILE)
    return {
        "source_sha256": sha256_hex((inputs_dir / SOURCE_FILE).read_bytes()),
        "champion": f"v{champion['version']}" if champion["status"] == "champion" else champion["status"],
        "warning": champion["note"] if champion["status"] == "unreachable" else "",
    }


def run_stages(params: Params, run_id: str, outcomes: list[StageOutcome], usage_dir: str) -> None:
    """Each stage through DVC, appending what happened to outcomes (a failed one included)."""
    logger = get_run_logger()
    changes = stage_changes(list(STAGES))  # one `dvc status` for all: on an unchanged run, the only one
    for stage in STAGES:
        if any(o.ran for o in outcomes):  # an earlier stage's new outputs may change this one
            changes = stage_changes([stage])
        try:  # an unchanged stage (absent from changes) is recorded as skipped without a dvc process
            outcomes.append(run_stage(stage, run_id, changes.get(stage), usage_dir))
        except Exception as exc:
            outcomes.append(StageOutcome(stage, True, f"failed: {exc}", "failed", str(exc)))
            raise
        logger.info("%s: %s", stage, outcomes[-1].detail)


def record_stages(outcomes: list[StageOutcome]) -> None:
    """In the flow's MLflow run: a tag stage.<name> = ran | skipped | resumed@STEP | failed, and
    stages.json with the reasons."""
    import mlflow

    mlflow.set_tags({f"stage.{o.stage}": o.tag for o in outcomes})
    mlflow.log_dict([o.__dict__ for o in outcomes], "stages.json")


def record_costs(params: Params, outcomes: list[StageOutcome], usage_dir: str) -> dict:
    """Price what the stage processes reported (a failed stage and every retry included) and log
    it to the flow's MLflow run: metrics cost.*, and cost.json with each stage's figures."""
    import mlflow

    ledger = run_ledger([INPUTS_CHECK, *STAGES], read_usage(usage_dir), params.cost)
    mlflow.log_metrics(ledger_metrics(ledger))
    mlflow.log_dict(ledger, "cost.json")
    return ledger


def log_slice_metrics(params: Params) -> None:
    """evaluate's reports/slices.json (val_bpb_slice_<name>, ...) in the flow's MLflow run, where the
    UI's compare view shows them beside val_bits_per_byte."""
    import mlflow

    path = Path(params.evaluate.reports_dir) / SLICES_FILE
    if path.exists():  # evaluated before slices: publish logs them from the per-document scores
        mlflow.log_metrics({k: v for k, v in read_json(path).items() if isinstance(v, (int, float))})


def _training_flow(params: Params | None) -> dict:
    import mlflow

    from pipelines.adapters.registry import set_training_experiment
    from pipelines.adapters.run_datasets import log_run_datasets

    params = apply_params(params)
    set_training_experiment(params.publish.experiment)
    outcomes: list[StageOutcome] = []
    curation, metrics, published, inputs, serving, ledger = {}, {}, None, {}, None, None
    usage_dir = tempfile.mkdtemp(prefix="trainpipe-usage-")  # the stage processes' reports
    try:
        with mlflow.start_run(run_name=f"flow-{flow_run.get_name() or 'local'}") as run:
            run_id = run.info.run_id
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
            mlflow.set_tag("prefect_flow_run_id", str(flow_run.get_id() or ""))
            try:
                inputs = record_inputs(params, usage_dir)
                mlflow.set_tags({f"input.{k}": v for k, v in inputs.items() if k != "warning"})
                run_stages(params, run_id, outcomes, usage_dir)
                # after the stages, so that dvc.lock's hashes are those of the data this run used
                log_run_datasets(params.data, git_commit())
            finally:
                curation = report_curation(params)
                record_stages(outcomes)
                ledger = record_costs(params, outcomes, usage_dir)  # before publish, which sums it
            metrics = read_json(Path(params.evaluate.reports_dir) / "metrics.json")
            mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            log_slice_metrics(params)
            log_memorization(params)
            # Pushed before publish moves an alias: a champion's data and model are never only here.
            push_outputs()
            published = publish(params, lineage(params), run_id)
            serving = reach_endpoints(params, published)
    finally:  # a failed run leaves its record too: which stages ran, were skipped or failed
        shutil.rmtree(usage_dir, ignore_errors=True)
        create_markdown_artifact(
            summary_markdown(outcomes, curation, metrics, published, serving, ledger, pinned_parent(params)),
            key="trainpipe-run",
            description="stages, curation, metrics and the alias decision of this run",
        )
    return {
        "stages": [o.__dict__ for o in outcomes],
        "inputs": inputs,
        "metrics": metrics,
        "published": published,
        "serving": serving,
        "cost": ledger,
    }


if __name__ == "__main__":
    import atexit
    import sys

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Registered before Prefect's own exit handlers, so it runs after them: the reason stays last.
    reason: list[str] = []
    atexit.register(lambda: reason and print(reason[0], file=sys.stderr, flush=True))
    try:
        training_flow()
    except TrainpipeError as exc:  # one line and the error's code (5: the lock wait ran out)
        reason.append(f"python -m flows.training: {exc}")
        sys.exit(exc.exit_code)
