"""The entry point every stage module shares: `python -m pipelines.STAGE`, as dvc.yaml runs it.

It sits below the stages (they import it) and below the CLI (which imports setup_environment), so
no stage imports the CLI.
"""

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from pipelines.core.errors import TrainpipeError
from pipelines.core.params import PARAMS_FILE, load_params
from pipelines.core.usage import write_usage


def stage_main(stage: str, run, describe, argv: list[str] | None = None) -> None:
    """`python -m pipelines.STAGE`, as dvc.yaml runs it: load params, run, print one line (none
    when run returns None: a process of a multi-process run that leaves the summary to another)
    and how long run() took: the stage's work, without Python's start and the imports before it
    (benchmarks/run_overhead.py takes everything else in a flow run as overhead).
    A failure prints `trainpipe STAGE: reason` and exits with the error's code, which the flow
    reads back from DVC to decide whether a retry can help."""
    module = sys.modules[run.__module__]
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{stage}", description=module.__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (default: params.yaml)")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter for this call only (not written to the file)",
    )
    args = parser.parse_args(argv)
    setup_environment()
    exit_status = "failed"  # until run returns; an unexpected exception keeps it
    try:
        params = load_params(args.params, args.set)
        started = time.perf_counter()
        result = run(params)
        exit_status = "ok"
    except (TrainpipeError, FileNotFoundError) as exc:
        print(f"trainpipe {stage}: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    finally:  # what the process spent, for the flow's cost ledger, passed or failed
        write_usage(stage, exit_status)
    if result is not None:
        print(describe(result, params))
        print(f"{stage}: {time.perf_counter() - started:.2f} s of work")
    if run.__module__ == "__main__":  # this process was started for the stage (not a test calling main)
        exit_without_teardown_gc()


def exit_without_teardown_gc() -> None:
    """Spare the exiting process Python's last garbage collections: with torch, Great Expectations
    or MLflow loaded they walk millions of objects, 0.4-1.5 s of a stage's or a run's exit on this
    machine, to free memory the OS frees anyway. (Exit handlers still run; files are closed.)"""
    gc.freeze()


def setup_environment() -> None:
    """Offline, project-local defaults for the tools (only where the user set nothing)."""
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
