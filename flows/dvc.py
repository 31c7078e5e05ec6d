"""Run DVC stages as subprocesses, streaming their output and reporting whether each ran.

`dvc repro` decides from content hashes whether a stage re-runs, so a flow run and a plain
`dvc repro` do the same work and share one cache.
"""

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import TrainpipeError

STAGES = ("ingest", "curate", "tokenize", "train", "evaluate")


class StageFailed(TrainpipeError):
    """A stage's command failed; exit_code is the stage's own (see pipelines.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageOutcome:
    stage: str
    ran: bool  # False: DVC found its inputs unchanged and skipped it
    detail: str


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc and its stage commands: this interpreter's bin first on PATH,
    so `python -m pipelines.X` in dvc.yaml runs with the project's environment."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _pump(src, dst, keep: list[bytes]) -> None:
    """Copy a pipe to our stream as bytes arrive (progress bars stay live), keeping the tail."""
    while chunk := os.read(src.fileno(), 65536):
        dst.buffer.write(chunk)
        dst.flush()
        keep.append(chunk)
        if len(keep) > 64:
            del keep[:-64]


def dvc(args: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> str:
    """Run a dvc command; returns its stdout; raises StageFailed with the stage's exit code."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dvc"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=tool_env(env),
    )
    out, err = [], []
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout if not quiet else _Null, out)),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code = proc.wait()
    stdout = b"".join(out).decode(errors="replace")
    if code:
        raise StageFailed(
            failure_reason(b"".join(err).decode(errors="replace"), args),
            stage_exit_code(stdout + b"".join(err).decode(errors="replace")),
        )
    return stdout


class _Null:
    """A stream that drops what it is given (for quiet dvc calls)."""

    class buffer:  # noqa: N801
        @staticmethod
        def write(_):
            pass

    @staticmethod
    def flush():
        pass


def stage_exit_code(text: str) -> int:
    """The stage command's own exit code, from DVC's 'exited with N' (1 if DVC failed itself)."""
    match = re.search(r"exited with (\d+)", text)
    return int(match.group(1)) if match else 1


def failure_reason(stderr: str, args: list[str]) -> str:
    """The stage's one-line message ('trainpipe curate: ...') if it printed one, else DVC's error."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("trainpipe ")]
    if ours:
        return ours[-1].split(": ", 1)[-1]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [f"dvc {' '.join(args)} failed"])[-1]


def repro_stage(stage: str, env: dict[str, str] | None = None, single: bool = True) -> StageOutcome:
    """`dvc repro [--single-item] STAGE`: runs it only if its deps, params or outs changed."""
    stdout = dvc(["repro", *(["--single-item"] if single else []), stage], env=env)
    ran = f"Running stage '{stage}'" in stdout
    return StageOutcome(stage, ran, "ran" if ran else "skipped: inputs unchanged (DVC cache)")


def push(env: dict[str, str] | None = None) -> str:
    """Push the cached outputs to the default DVC remote (a local folder unless configured)."""
    return dvc(["push", "-q"], env=env, quiet=True)
