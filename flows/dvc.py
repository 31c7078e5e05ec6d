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


# DVC's per-stage reminders to `git add dvc.lock` and `dvc push`; trainpipe run says it once.
HINT_LINES = (
    b"To track the changes with git",
    b"\tgit add ",
    b"To enable auto staging",
    b"\tdvc config core.autostage",
    b"Use `dvc push` to send your updates",
)


def _pump(src, dst, keep: list[bytes], drop_hints: bool = False) -> None:
    """Copy a pipe to our stream as bytes arrive (progress bars stay live), keeping the tail.
    With drop_hints, whole lines are copied, without DVC's hints and blank lines."""
    pending = b""
    while chunk := os.read(src.fileno(), 65536):
        keep.append(chunk)
        if len(keep) > 64:
            del keep[:-64]
        if drop_hints:
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            chunk = b"".join(ln + b"\n" for ln in lines if ln.strip() and not ln.startswith(HINT_LINES))
        if dst is not None:
            dst.buffer.write(chunk)
            dst.flush()
    if pending and dst is not None:
        dst.buffer.write(pending)
        dst.flush()


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
        threading.Thread(target=_pump, args=(proc.stdout, None if quiet else sys.stdout, out, True)),
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
