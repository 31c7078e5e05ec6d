"""Run DVC stages as subprocesses, streaming their output and reporting whether each ran.

`dvc repro` decides from content hashes whether a stage re-runs, so a flow run and a plain
`dvc repro` do the same work and share one cache.
"""

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import TrainpipeError

STAGES = ("ingest", "curate", "tokenize", "train", "evaluate")
# The always-changed stage that records what DVC cannot hash (pipelines/inputs.py): a check
# that runs first on every repro, not a step whose running means anything changed.
INPUTS_CHECK = "inputs"
DVC_CHATTER = ("Running stage ", "> ", "Updating lock file", "Generating lock file", "Stage '")


class StageFailed(TrainpipeError):
    """A stage's command failed; exit_code is the stage's own (see pipelines.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageOutcome:
    stage: str
    ran: bool  # False: DVC skipped it
    detail: str
    status: str = ""  # "ran", "skipped", "resumed" (train, from a checkpoint) or "failed"
    reason: str = ""  # why it ran (what DVC saw changed) or why it was skipped (DVC's words)
    resumed_from_step: int | None = None

    @property
    def tag(self) -> str:
        """The short form recorded as the MLflow tag stage.<name>: ran, skipped, resumed@400."""
        return f"resumed@{self.resumed_from_step}" if self.status == "resumed" else self.status


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


def describe_changes(entries: list) -> str:
    """One line from a stage's `dvc status --json` entries, e.g.
    [{"changed deps": {"params.yaml": {"train.lr": "modified"}}}] -> "changed deps: train.lr modified"."""
    parts = []
    for entry in entries:
        if isinstance(entry, str):  # "changed command", "always changed"
            parts.append(entry)
            continue
        for kind, changes in entry.items():
            items = []
            for path, what in changes.items():
                items += (
                    [f"{k} {v}" for k, v in what.items()] if isinstance(what, dict) else [f"{path} {what}"]
                )
            parts.append(f"{kind}: {', '.join(items)}")
    return "; ".join(parts)


def stage_changes(stages: list[str] | None = None) -> dict[str, str]:
    """What DVC sees changed, per stage that would run (`dvc status --json`); unchanged ones are absent."""
    out = dvc(["status", "--json", *(stages or [])], quiet=True)
    entries = json.loads(out.strip() or "{}")
    return {stage.split(":")[-1]: describe_changes(e) for stage, e in entries.items() if isinstance(e, list)}


def repro_stage(
    stage: str, env: dict[str, str] | None = None, single: bool = True, changed: str = ""
) -> StageOutcome:
    """`dvc repro [--single-item] STAGE`: runs it only if its deps, params or outs changed.
    changed: what `dvc status` said had changed before, recorded as the reason it ran."""
    stdout = dvc(["repro", *(["--single-item"] if single else []), stage], env=env)
    if f"Running stage '{stage}'" in stdout:
        reason = changed or "DVC found it changed"
        return StageOutcome(stage, True, f"ran ({reason})", "ran", reason)
    if f"Stage '{stage}' is cached" in stdout:
        reason = "same inputs as an earlier run: outputs restored from the DVC run cache"
    else:
        reason = "deps, params and outs unchanged (DVC: didn't change, skipping)"
    return StageOutcome(stage, False, f"skipped: {reason}", "skipped", reason)


def check_inputs(env: dict[str, str] | None = None) -> list[str]:
    """Run the inputs check (`dvc repro --single-item inputs`); its own lines, without DVC's.
    DVC's "Running stage 'inputs'" would say on every run that something ran: it always does."""
    stdout = dvc(["repro", "--single-item", INPUTS_CHECK], env=env, quiet=True)
    return [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith(DVC_CHATTER)]


def push(env: dict[str, str] | None = None) -> str:
    """Push the cached outputs to the default DVC remote (a local folder unless configured).
    A failure is one line naming the remote. (No -q: it hides DVC's own error line.)"""
    try:
        return dvc(["push", *remote_args()], env=env, quiet=True)
    except StageFailed as exc:
        reason = str(exc).removeprefix("ERROR: ")
        raise StageFailed(f"dvc push to {default_remote()} failed ({reason})", exc.exit_code) from None


def remote_args() -> list[str]:
    """`-r NAME` when TRAINPIPE_DVC_REMOTE names a remote (the team stack's `stack`), so a
    shell's environment picks the remote as it picks the MLflow and Prefect servers."""
    name = os.environ.get("TRAINPIPE_DVC_REMOTE", "").strip()
    return ["-r", name] if name else []


def default_remote() -> str:
    """'remote NAME (URL)' of the remote push and fetch use. (Not `dvc remote list`: rich wraps
    its lines at 80 columns when they go to a pipe.)"""
    try:
        name = (
            os.environ.get("TRAINPIPE_DVC_REMOTE", "").strip()
            or dvc(["remote", "default"], quiet=True).strip()
        )
        if not name or name == "No default remote set":
            return "the default DVC remote (none is set: `dvc remote add -d NAME URL`)"
        url = dvc(["config", f"remote.{name}.url"], quiet=True).strip()
    except StageFailed:
        return "the default DVC remote"
    return f"remote {name!r} ({url})"
