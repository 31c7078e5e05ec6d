"""What serves, and what the pipeline decided: `trainpipe status`, and the flow's wait for the endpoint.

    trainpipe status [--json]

The registry says which version is @champion and @challenger and with what scores; each running
endpoint records on the registered model what it serves (pipelines.serving.endpoint). The endpoint itself
is then asked: a one-token request names the version that answered (`model_version`).

The champion's cost (pipelines/core/ledger.py): what its own training run cost and what all runs
since the champion before it cost, failed ones included (its cost_* tags, priced at cost.* in
params.yaml), what a million generated tokens cost at the speed its smoke test measured, and how
many million tokens served cost as much as its training run.
"""

import time

import requests
from mlflow import MlflowClient

from pipelines.adapters.registry import CHALLENGER, CHAMPION, endpoint_records, get_alias, last_flow_run
from pipelines.core.ledger import format_usd, payback_million_tokens, price, usd_per_million_tokens
from pipelines.core.params import CostParams, Params

ASK_TIMEOUT_S = 10.0
INTERVAL_TAGS = ("bpb_delta", "bpb_delta_low", "bpb_delta_high")


def ask_endpoint(url: str, timeout_s: float = ASK_TIMEOUT_S) -> str | None:
    """The version that answers at url now, or None when nothing answers there."""
    body = {"dataframe_records": [{"prompt": "def f():"}], "params": {"max_new_tokens": 1, "seed": 0}}
    try:
        response = requests.post(f"{url}/invocations", json=body, timeout=timeout_s)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    try:
        return str(response.json()["predictions"][0]["model_version"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _version_summary(version) -> dict | None:
    if version is None:
        return None
    tags = version.tags
    return {
        "version": str(version.version),
        "val_bits_per_byte": tags.get("val_bits_per_byte"),
        "promoted_at": tags.get("promoted_at"),
        "smoke_test": tags.get("smoke_test"),
        "decision": tags.get("alias_decision"),
        "kind": tags.get("kind"),
        "parent_version": tags.get("parent_version"),
        **{key: tags[key] for key in INTERVAL_TAGS if key in tags},
    }


def _float(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def version_cost(version, rates: CostParams) -> dict | None:
    """A version's training and inference cost from its tags, priced at rates; None without a
    version. A figure its tags lack (published before the ledger, or outside a flow) is None."""
    if version is None:
        return None
    tags = version.tags

    def priced(kind: str) -> float | None:
        prefix = "parent_cost_run" if kind == "parent_run" else f"cost_{kind}"
        cpu_s, gpu_s = _float(tags, f"{prefix}_cpu_s"), _float(tags, f"{prefix}_gpu_s")
        return None if cpu_s is None or gpu_s is None else price(cpu_s, gpu_s, rates)

    run_usd, tokens_per_s = priced("run"), _float(tags, "inference_tokens_per_s")
    parent_usd = priced("parent_run") if "parent_version" in tags else None
    device = tags.get("inference_device", "cpu")
    per_mtok = usd_per_million_tokens(tokens_per_s, device, rates) if tokens_per_s else None
    payback = payback_million_tokens(run_usd, per_mtok) if run_usd is not None and per_mtok else None
    return {
        "version": str(version.version),
        "training_run_usd": run_usd,
        "parent_version": tags.get("parent_version"),
        "parent_training_run_usd": parent_usd,
        "training_cumulative_usd": priced("cumulative"),
        "cumulative_runs": int(tags["cost_cumulative_runs"]) if "cost_cumulative_runs" in tags else None,
        "cumulative_failed_runs": int(tags.get("cost_cumulative_failed_runs", 0)),
        "cumulative_since": tags.get("cost_since"),
        "inference_tokens_per_s": tokens_per_s,
        "inference_device": device if tokens_per_s else None,
        "inference_usd_per_million_tokens": per_mtok,
        "payback_million_tokens": payback,
        "cpu_hour_usd": rates.cpu_hour_usd,
        "gpu_hour_usd": rates.gpu_hour_usd,
    }


def endpoints(client: MlflowClient, name: str, champion: str | None) -> list[dict]:
    """Every endpoint recorded for the model, asked what it serves now."""
    found = []
    for record in endpoint_records(client, name):
        answering = ask_endpoint(record["url"], timeout_s=3.0)
        found.append(
            {
                **record,
                "answering": answering is not None,
                "serves": answering,
                "is_champion": answering is not None and answering == champion,
            }
        )
    return found


def read_status(params: Params) -> dict:
    client = MlflowClient()
    name = params.publish.model_name
    champion = get_alias(client, name, CHAMPION)
    challenger = get_alias(client, name, CHALLENGER)
    champion_version = str(champion.version) if champion else None
    return {
        "model": name,
        "champion": _version_summary(champion),
        "challenger": _version_summary(challenger),
        "endpoints": endpoints(client, name, champion_version),
        "last_flow_run": last_flow_run(client, params.publish.experiment),
        "cost": version_cost(champion, params.cost),
    }


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(millis / 1000))


def _score(summary: dict) -> str:
    bpb = summary.get("val_bits_per_byte")
    text = f"{float(bpb):.4f} bpb" if bpb else "no score"
    if summary.get("parent_version"):
        text += f", a fine-tune of v{summary['parent_version']}"
    if "bpb_delta" in summary:
        text += (
            f", {float(summary['bpb_delta']):+.4f} bpb vs its champion "
            f"[{float(summary['bpb_delta_low']):+.4f}, {float(summary['bpb_delta_high']):+.4f}]"
        )
    return text


def format_status(status: dict) -> list[str]:
    lines = [f"model: {status['model']}"]
    champion, challenger = status["champion"], status["challenger"]
    if champion:
        lines.append(
            f"champion:   v{champion['version']} ({_score(champion)}), promoted {champion['promoted_at'] or '-'}"
        )
    else:
        lines.append("champion:   none yet: `trainpipe run` trains and publishes one")
    if challenger:
        decision = f"; {challenger['decision']}" if challenger.get("decision") else ""
        lines.append(f"challenger: v{challenger['version']} ({_score(challenger)}){decision}")
    if not status["endpoints"]:
        lines.append("endpoint:   none running: `trainpipe serve` serves @champion and follows it")
    for ep in status["endpoints"]:
        if not ep["answering"]:
            lines.append(
                f"endpoint:   {ep['url']} does not answer (last recorded serving v{ep.get('version')}, "
                f"pid {ep.get('pid')} on {ep.get('host')}; stopped without clearing its record?)"
            )
            continue
        state = "the champion" if ep["is_champion"] else "NOT the champion: it follows within a poll"
        lines.append(f"endpoint:   {ep['url']} serves v{ep['serves']} since {ep.get('since')} ({state})")
        failure = ep.get("failure")
        if failure:
            lines.append(
                f"            refused v{failure['version']} at {failure['time']}: {failure['reason']}"
            )
    lines += format_cost(status.get("cost"))
    run = status["last_flow_run"]
    if run:
        outcome = {"FINISHED": "succeeded", "FAILED": "failed", "RUNNING": "running"}.get(
            run["status"], run["status"].lower()
        )
        lines.append(
            f"last run:   {run['name']} {outcome}, started {_when(run['start_time'])}, "
            f"ended {_when(run['end_time'])} (MLflow run {run['run_id']})"
        )
    else:
        lines.append("last run:   no flow run recorded yet")
    return lines


def format_cost(cost: dict | None) -> list[str]:
    """The champion's training cost, inference cost per million tokens and the payback, or why
    a figure is missing."""
    if cost is None:
        return []
    version = f"v{cost['version']}"
    if cost["training_run_usd"] is None and cost["training_cumulative_usd"] is None:
        training = f"{version} has no cost ledger (published before it, or outside a flow run)"
    else:
        own = (
            f"{format_usd(cost['training_run_usd'])} its own run"
            if cost["training_run_usd"] is not None
            else "its own run not recorded"
        )
        failed = f", {cost['cumulative_failed_runs']} failed" if cost["cumulative_failed_runs"] else ""
        runs = cost["cumulative_runs"]
        if cost.get("parent_training_run_usd") is not None:  # a fine-tune: beside its parent's training
            own += f" (a fine-tune; its parent v{cost['parent_version']}'s training run: "
            own += f"{format_usd(cost['parent_training_run_usd'])})"
        training = (
            f"{version}: {own}; {format_usd(cost['training_cumulative_usd'])} to arrive at it "
            f"({runs} run{'s' if runs != 1 else ''} since {cost['cumulative_since']}{failed})"
        )
    rates = f"${cost['cpu_hour_usd']:g} a CPU hour, ${cost['gpu_hour_usd']:g} a GPU hour"
    lines = [f"training:   {training}, at {rates}"]
    if cost["inference_usd_per_million_tokens"] is None:
        lines.append(f"inference:  {version} has no measured speed (smoke-tested before the ledger)")
    else:
        lines.append(
            f"inference:  {format_usd(cost['inference_usd_per_million_tokens'])} per million tokens "
            f"({cost['inference_tokens_per_s']:,.0f} tokens/s on {cost['inference_device']}, "
            f"measured in its smoke test)"
        )
    if cost["payback_million_tokens"] is not None:
        lines.append(
            f"payback:    {cost['payback_million_tokens']:,.3g} million tokens served cost as much "
            f"as its training run"
        )
    return lines


def wait_for_champion(params: Params, champion: str, log=print) -> dict:
    """After publish: every running endpoint of the model must serve the champion within
    serve.wait_s. Returns {"endpoints": [...], "reason": one line}; "failed": True when a running
    endpoint did not reach the champion in time."""
    client = MlflowClient()
    name = params.publish.model_name
    live = [ep for ep in endpoints(client, name, champion) if ep["answering"]]
    if not live:
        return {
            "endpoints": [],
            "failed": False,
            "reason": f"no endpoint serves {name}: `trainpipe serve` starts one that follows @champion",
        }
    deadline = time.monotonic() + params.serve.wait_s
    for ep in live:
        while ep["serves"] != champion and time.monotonic() < deadline:
            log(f"waiting for {ep['url']} to serve v{champion} (serves v{ep['serves']})")
            time.sleep(min(2.0, params.serve.poll_s))
            ep["serves"] = ask_endpoint(ep["url"])
    lagging = [ep for ep in live if ep["serves"] != champion]
    served = [{"url": ep["url"], "version": ep["serves"]} for ep in live]
    if lagging:
        ep = lagging[0]
        failure = next(
            (r.get("failure") for r in endpoint_records(client, name) if r["url"] == ep["url"]), None
        )
        why = f": it refused v{failure['version']} ({failure['reason']})" if failure else ""
        return {
            "endpoints": served,
            "failed": True,
            "reason": (
                f"endpoint {ep['url']} serves v{ep['serves']}, not champion v{champion}, "
                f"after {params.serve.wait_s:g} s{why}"
            ),
        }
    urls = ", ".join(ep["url"] for ep in live)
    return {"endpoints": served, "failed": False, "reason": f"{urls} serves champion v{champion}"}
