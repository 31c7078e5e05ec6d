"""The `trainpipe` command: the whole flow, each stage, and the registry and serving operations.

    trainpipe run [-S key=value ...]      the Prefect flow: stages, push, publish
    trainpipe finetune [--from VERSION]   the same, training from @champion's weights
    trainpipe train -S train.max_steps=200
    trainpipe serve --port 5001
    trainpipe --help / trainpipe COMMAND --help

-S overrides on commands that run DVC stages are written to params.yaml first (as
`dvc exp run -S` does), so dvc.lock records what produced each output; on the other commands
they apply to that call only. Every failure ends with a one-line reason and a non-zero code.
"""

import argparse
import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.adapters.runlock import LOCK_FILE, workspace_lock
from pipelines.core.errors import ConfigError, TrainpipeError
from pipelines.core.params import PARAMS_FILE, load_params, save_overrides
from pipelines.stages.entry import exit_without_teardown_gc, setup_environment

STAGE_HELP = {
    "ingest": "snapshot the data source into data/raw",
    "curate": "decode, scrub, filter and dedupe data/raw; the data gate (Great Expectations, drift)",
    "parent": "pin the version a fine-tune starts from (finetune.parent_version) into data/parent",
    "tokenize": "train the BPE tokenizer (a fine-tune: take its parent's) and write token arrays",
    "train": "train the model (resumes from checkpoints/)",
    "evaluate": "held-out bits per byte against gzip and xz",
}
# Commands that write the workspace (or register what it holds): one at a time (pipelines/adapters/runlock.py).
LOCKED_COMMANDS = {"run", "finetune", *STAGE_HELP, "publish", "promote", "rollback", "restart"}
HISTORY_WIDTH = 120
SCRATCH = "finetune.parent_version=null"
INTERVAL_TEXT = r"(?:[+-]?\d+(?:\.\d+)? bpb )?\[[^\]]*\]"  # "-0.0040 bpb [-0.0110, +0.0030]": wrapped whole


def require_project() -> None:
    if not Path("dvc.yaml").exists() or not Path(".dvc").is_dir():
        raise ConfigError("run trainpipe from the project root (no dvc.yaml or .dvc/ here)")


def tracking_uri_text() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def import_tracking_store() -> None:
    """Import MLflow's database store now, while Prefect's server boots: MLflow imports it on its
    first client call, which in the flow comes after the server is up (SQLAlchemy and the store's
    ORM mappings: about 1.8 s on this machine). Nothing is opened or created here: a URI of a
    tracking server (http) needs none of it."""
    import mlflow
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if mlflow.get_tracking_uri().split(":", 1)[0].split("+", 1)[0] not in DATABASE_ENGINES:
        return
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from sqlalchemy.orm import configure_mappers

    configure_mappers()  # the mappings' first query would set them up: 0.6 s of the 1.8


def cmd_run(args) -> None:
    require_project()
    run_flow(save_overrides(PARAMS_FILE, run_overrides(args.set)))


def run_overrides(overrides: list[str]) -> list[str]:
    """`trainpipe run` trains from scratch: a fine-tune before it must not carry over, unless -S
    names a parent itself."""
    if any(o.removeprefix("+").startswith("finetune.parent_version=") for o in overrides):
        return overrides
    return [SCRATCH, *overrides]


def cmd_finetune(args) -> None:
    require_project()
    params = load_params(PARAMS_FILE, args.set)  # the model name may be among the overrides
    from pipelines.commands.finetune import resolve_parent

    version = resolve_parent(params.publish.model_name, args.from_version)
    print(f"finetune: from version {version} of {params.publish.model_name}")
    run_flow(save_overrides(PARAMS_FILE, [*args.set, f"finetune.parent_version={version}"]))


def run_flow(params) -> None:
    """The training flow on params (already in params.yaml), and what it did, in a few lines."""
    from flows.server import start_temporary_api

    # Prefect's temporary server starts in its own process first; the imports the flow needs
    # anyway (DVC, MLflow and publish's code, MLflow's database store, then Prefect's client) run
    # here meanwhile, on the other core. It serves only if Prefect has no server configured: known before Prefect is
    # imported here.
    api = start_temporary_api()
    import dvc.repo  # noqa: F401

    import pipelines.commands.promotion  # noqa: F401

    import_tracking_store()

    serves = api is not None and api.serves()
    from flows.training import training_flow

    if serves:
        api.wait_ready()
    result = training_flow()
    pub, m = result["published"], result["metrics"]
    name = params.publish.model_name
    print()
    if all(s["status"] == "skipped" for s in result["stages"]) and "already registered" in pub["reason"]:
        # the inputs check runs every time (it is no stage); its files, and so the stages, did not change
        print(
            "unchanged: data, code and params as before; DVC skipped every stage "
            "(the source and the champion checked, unchanged), nothing new published"
        )
    if result["inputs"].get("warning"):
        print(f"warning: {result['inputs']['warning']}")
    parent = params.finetune.parent_version
    print(
        f"registered: {name} version {pub['version']} ({pub['model_uri']}) in {tracking_uri_text()}"
        + (f", a fine-tune of version {parent}" if parent else "")
    )
    print(f"champion: models:/{name}@champion is version {pub['champion_version']} ({pub['reason']})")
    print_slices(pub)
    print(
        f"held-out: {m['val_bits_per_byte']:.3f} bits/byte (gzip -9 {m['gzip_bits_per_byte']:.3f}, "
        f"xz -9 {m['xz_bits_per_byte']:.3f}); metrics in {params.evaluate.reports_dir}/metrics.json"
    )
    if result.get("cost"):
        from pipelines.core.ledger import ledger_summary

        print(f"cost: {ledger_summary(result['cost'])}; `trainpipe status` prices the champion")
    serving = result.get("serving") or {}
    print(f"serving: {serving.get('reason', 'not checked')}")
    print("dvc.lock records this run's data and model versions: `git add dvc.lock params.yaml` to keep it")
    exit_without_teardown_gc()  # the run is over: only the process's exit is left


def cmd_stage(args) -> None:
    require_project()
    save_overrides(PARAMS_FILE, args.set)
    from pipelines.adapters.dvc_repo import repro_stage

    outcome = repro_stage(args.command, single=False)  # with its upstream stages, as `dvc repro STAGE`
    print(f"{args.command}: {outcome.detail}")


def cmd_curate(args) -> None:
    if args.explain is None:
        return cmd_stage(args)
    from pipelines.stages.curate import explain

    print(explain(args.explain, load_params(PARAMS_FILE, args.set)))


def cmd_publish(args) -> None:
    from pipelines.commands.promotion import publish_model

    params = load_params(PARAMS_FILE, args.set)
    if Path("dvc.yaml").exists() and Path(".dvc").is_dir():
        # In a DVC project the outputs go to the remote before any alias moves, as in the flow.
        from pipelines.adapters.dvc_repo import StageFailed, push

        try:
            push()
        except StageFailed as exc:
            raise StageFailed(
                f"{exc}; nothing was published: run `trainpipe publish` again once the remote takes the push",
                exc.exit_code,
            ) from None
    result = publish_model(params)
    print(f"registered {result['model_uri']} version {result['version']}: {result['reason']}")
    print_slices(result)


def print_slices(published: dict) -> None:
    """The promotion gate's evaluation slices, a line each (challenger minus champion)."""
    from pipelines.core.slices import slice_lines

    if published.get("slices"):
        print("\n".join(f"  {line}" for line in slice_lines(published["slices"])))


def cmd_promote(args) -> None:
    from pipelines.commands.promote import promote_version

    result = promote_version(load_params(PARAMS_FILE, args.set), args.version)
    print(f"champion is now version {result.get('champion_version', args.version)}")


def cmd_rollback(args) -> None:
    from pipelines.commands.promote import rollback_champion

    result = rollback_champion(load_params(PARAMS_FILE, args.set))
    print(f"champion rolled back to version {result.get('champion_version')}")


def format_history(moves: list[dict], width: int = HISTORY_WIDTH) -> list[str]:
    """One row per alias move, oldest first; a long reason wraps in its own column, never inside
    a difference and its interval ("-0.0040 bpb [-0.0110, +0.0030]" reads whole)."""
    import re
    import textwrap

    head = f"{'time (UTC)':<19}  {'from -> to':<12}  {'command':<18}  {'flow run':<8}  "
    lines = [head + "reason"]
    for move in moves:
        when = (move.get("time") or "-")[:19].replace("T", " ")
        step = f"{_version_text(move.get('from'))} -> {_version_text(move.get('to'))}"
        flow_run = (move.get("flow_run") or "-")[:8]
        row = f"{when:<19}  {step:<12}  {move.get('command') or '-':<18}  {flow_run:<8}  "
        # the space inside an interval is made unbreakable for textwrap, then put back
        reason = move.get("reason") or "-"
        if move.get("to_parent"):
            reason = f"(v{move['to']}: a fine-tune of v{move['to_parent']}) {reason}"
        text = re.sub(INTERVAL_TEXT, lambda m: m.group().replace(" ", "\0"), reason)
        wrapped = textwrap.wrap(text, width - len(head), break_on_hyphens=False) or ["-"]
        reason = [line.replace("\0", " ") for line in wrapped]
        lines.append(row + reason[0])
        lines += [" " * len(head) + more for more in reason[1:]]
    return lines


def _version_text(version) -> str:
    return f"v{version}" if version else "none"


def cmd_history(args) -> None:
    import json

    from pipelines.commands.promote import read_history

    params = load_params(PARAMS_FILE, args.set)
    moves = read_history(params.publish)
    if args.json:
        for move in moves:
            print(json.dumps(move))
        return
    if not moves:
        print(f"models:/{params.publish.model_name}@champion has never moved")
        return
    print("\n".join(format_history(moves)))


def cmd_serve(args) -> None:
    from pipelines.serving.serve import run_server

    code = run_server(load_params(PARAMS_FILE, args.set), port=args.port, model_uri=args.model_uri)
    if code:
        sys.exit(code)


def cmd_status(args) -> None:
    import json

    from pipelines.commands.status import format_status, read_status

    status = read_status(load_params(PARAMS_FILE, args.set))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return
    print("\n".join(format_status(status)))


def cmd_compare(args) -> None:
    import json

    from pipelines.commands.compare import compare, format_comparison

    found = compare(load_params(PARAMS_FILE, args.set), args.a, args.b, ui_url=args.ui_url)
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return
    print("\n".join(format_comparison(found)))


def cmd_restart(args) -> None:
    require_project()
    from pipelines.commands.restart import restore_version

    result = restore_version(load_params(PARAMS_FILE, args.set), args.from_version)
    print(f"workspace restored to the data and model of version {result['version']}")
    if result.get("not_restored"):
        print(
            f"not restored: {', '.join(result['not_restored'])} (the raw snapshot is never pushed); "
            "`trainpipe ingest` re-creates it from data.source"
        )


PREFECT_USER = "trainpipe"


def local_prefect_auth() -> tuple[str, Path]:
    """The login ("trainpipe:<password>") of the local Prefect server and the file that keeps it:
    made once, 0600 from its first byte, in PREFECT_HOME, so the UI's user can read it there."""
    import secrets

    from pipelines.core.data import atomic_write_text

    path = Path(os.environ["PREFECT_HOME"]) / "server-auth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, f"{PREFECT_USER}:{secrets.token_urlsafe(24)}\n", mode=0o600)
    return path.read_text().strip(), path


def start_prefect_server(port: int, auth_string: str) -> subprocess.Popen:
    """A local `prefect server start`: Prefect's temporary server has no scheduler, so a
    schedule needs a real one. Its API and UI ask for auth_string ("user:password"), as the
    team stack's do. Its state stays in PREFECT_HOME; its log in .prefect/server.log."""
    import requests

    log_path = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # The UI finds the API at PREFECT_UI_API_URL (default 127.0.0.1:4200), not at the port it was
    # served from: without this, a server on another port shows "Can't connect to Server API".
    env = {
        **os.environ,
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_AUTH_STRING": auth_string,
    }
    server = subprocess.Popen(
        cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise TrainpipeError(f"prefect server exited with {server.returncode}; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.5)
    server.terminate()
    raise TrainpipeError(f"prefect server did not answer on port {port} within 90 s; see {log_path}")


def cmd_schedule(args) -> None:
    require_project()
    save_overrides(PARAMS_FILE, args.set)
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        auth_string, auth_file = local_prefect_auth()
        server = start_prefect_server(args.prefect_port, auth_string)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{args.prefect_port}/api"
        os.environ["PREFECT_API_AUTH_STRING"] = auth_string  # this process's client logs in too
        print(
            f"started a local Prefect server: UI at http://127.0.0.1:{args.prefect_port} "
            f"(user {PREFECT_USER}, password in {auth_file})"
        )
    from flows.training import training_flow

    print(f"serving deployment 'trainpipe-scheduled' on cron {args.cron!r}; Ctrl-C stops it")
    try:
        training_flow.serve(name="trainpipe-scheduled", cron=args.cron)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def cmd_stack(args) -> None:
    """The team stack on this machine (infra/stack.py): the same as `make stack` and friends."""
    from infra.stack import Stack, failure_reason, run_action

    try:
        run_action(args.action, Stack(Path(args.state), args.port_offset), args.role)
    except Exception as exc:
        reason = failure_reason(exc)
        if reason is None:
            raise
        raise TrainpipeError(reason) from None


def cmd_generate(args) -> None:
    import torch

    from pipelines.core.data import EOT
    from pipelines.core.model_dir import WEIGHTS_FILE, load_model_dir

    params = load_params(PARAMS_FILE, args.set)
    model_dir = Path(params.train.model_dir)
    if not (model_dir / WEIGHTS_FILE).exists():
        raise ConfigError(f"no trained model in {model_dir}/: run `trainpipe train` first")
    model, tokenizer = load_model_dir(model_dir)
    idx = torch.tensor([tokenizer.encode(args.prompt).ids[-model.config.block_size :]])
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(
        idx, args.max_new_tokens, args.temperature, args.top_k, g, tokenizer.token_to_id(EOT)
    )
    print(args.prompt + tokenizer.decode(out[0, idx.size(1) :].tolist()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainpipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-S",
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a params.yaml key (dotted, e.g. train.lr=3e-4); repeatable",
        )
        if name in LOCKED_COMMANDS:
            p.add_argument(
                "--wait",
                action="store_true",
                help=f"if another trainpipe command holds {LOCK_FILE}, wait for it instead of refusing",
            )
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the whole flow: stages, push, publish (training from random weights)")
    p = add(
        "finetune",
        cmd_finetune,
        "run the whole flow with training starting from @champion's weights (or --from VERSION): "
        "finetune.* params set its steps and learning rate; architecture and tokenizer are the parent's",
    )
    p.add_argument(
        "--from",
        dest="from_version",
        default=None,
        metavar="VERSION",
        help="the registered version to start from: 3, v3 or an alias (@challenger); default @champion",
    )
    for stage, help_text in STAGE_HELP.items():
        p = add(
            stage,
            cmd_curate if stage == "curate" else cmd_stage,
            f"{help_text} (dvc repro {stage}, with upstream stages as needed)",
        )
    p = sub.choices["curate"]
    p.add_argument(
        "--explain",
        metavar="PATH",
        default=None,
        help="say why the last curation dropped or changed this document (a path as in data/raw); runs nothing",
    )
    add("publish", cmd_publish, "register models/ in MLflow; champion moves only if it is better")
    p = add("promote", cmd_promote, "make a registered version the champion")
    p.add_argument("version", help="registered model version number")
    add("rollback", cmd_rollback, "move the champion back to the previous champion")
    p = add(
        "history", cmd_history, "every move of @champion, oldest first: time, from -> to, reason, flow run"
    )
    p.add_argument("--json", action="store_true", help="one JSON record per move (full flow run ids)")
    p = add(
        "status",
        cmd_status,
        "champion and challenger with their scores, what each endpoint serves, the last flow run",
    )
    p.add_argument("--json", action="store_true", help="the same as one JSON object")
    p = add(
        "compare",
        cmd_compare,
        "two registered versions (or MLflow runs) side by side, from what MLflow and DVC recorded: "
        "params that differ, metrics with the promotion gate's interval, data versions, code commits, "
        "cost; and the MLflow UI's compare page for the two runs. Nothing is re-run",
    )
    ref_help = "a version (3, v3), an alias (@champion, champion) or an MLflow run id"
    p.add_argument(
        "a",
        nargs="?",
        metavar="A",
        help=f"{ref_help}; default @champion. One argument alone is B, against @champion",
    )
    p.add_argument(
        "b",
        nargs="?",
        metavar="B",
        help=f"{ref_help}; default @challenger, or the newest version that is not the champion when "
        "@challenger is the champion itself (a promoted challenger keeps both aliases)",
    )
    p.add_argument(
        "--ui-url",
        default=None,
        metavar="URL",
        help="address of the MLflow UI for the compare link (default: the tracking server's own, "
        "or http://127.0.0.1:5000 where `mlflow ui` serves a local store)",
    )
    p.add_argument("--json", action="store_true", help="the same as one JSON object, hashes whole")
    p = add(
        "serve",
        cmd_serve,
        "serve @champion on 127.0.0.1 with MLflow's scoring server and follow it: a promotion or "
        "rollback reaches the endpoint within serve.poll_s seconds, after a smoke test, without a restart",
    )
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    p.add_argument(
        "--model-uri",
        default=None,
        help="serve this MLflow model URI instead, fixed: it does not follow @champion",
    )
    p = add("restart", cmd_restart, "restore the data and model behind the champion (or --from VERSION)")
    p.add_argument(
        "--from",
        dest="from_version",
        default=None,
        metavar="VERSION",
        help="a registered version to restore instead of the champion",
    )
    p = add("schedule", cmd_schedule, "serve the flow as a Prefect deployment on a cron schedule")
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    p.add_argument(
        "--prefect-port",
        type=int,
        default=4200,
        help="port of the local Prefect server started when PREFECT_API_URL is not set",
    )
    p = sub.add_parser(
        "stack",
        help="the team stack on 127.0.0.1: PostgreSQL, S3, MLflow and Prefect servers, a worker",
        description="up starts what is not running, down stops it all, status lists it, env prints "
        "the variables that point trainpipe at it (secrets masked; source .stack/stack.env for them)",
    )
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--state", default=".stack", help="folder for its data, logs and secrets (default .stack)")
    p.add_argument("--port-offset", type=int, default=0, help="added to every port of infra/stack.toml")
    p.add_argument(
        "--role",
        choices=["client", "serve"],
        default="client",
        help="env: whose variables (client: trainpipe, dvc, prefect, mlflow; serve: an endpoint's "
        "registry login and read-only S3 keys; default client)",
    )
    p.set_defaults(func=cmd_stack)
    p = add("generate", cmd_generate, "complete a prompt with the model in models/")
    p.add_argument("prompt", help="Python source to complete")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_environment()
    # The reason for a failure is printed by an exit handler registered before any tool's, so
    # it runs after theirs (Prefect logs as its temporary server stops) and stays the last line.
    reason: list[str] = []
    atexit.register(lambda: reason and print(reason[0], file=sys.stderr, flush=True))
    try:
        if args.command in LOCKED_COMMANDS and not getattr(args, "explain", None):  # --explain only reads
            with workspace_lock(args.command, wait=args.wait):
                args.func(args)
        else:
            args.func(args)
    except TrainpipeError as exc:
        reason.append(f"trainpipe {args.command}: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"trainpipe {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # MLflow down outside publish (the flow's own run): one line too
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            raise
        from pipelines.adapters.registry import get_tracking_uri, mlflow_failure
        from pipelines.commands.compare import public_uri

        uri = public_uri(get_tracking_uri())  # without the user and password it may carry
        reason.append(f"trainpipe {args.command}: MLflow at {uri} failed ({mlflow_failure(exc)})")
        sys.exit(1)


if __name__ == "__main__":
    main()
