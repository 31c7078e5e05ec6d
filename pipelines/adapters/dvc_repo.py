"""Run DVC stages as subprocesses, streaming their output and reporting whether each ran.

`dvc repro` decides from content hashes whether a stage re-runs, so a flow run and a plain
`dvc repro` do the same work and share one cache. What only reads or records (`dvc status`,
`dvc commit`, `dvc push`) goes through DVC's Python API in this process instead: each `dvc`
process pays about a second to start and import DVC, and an unchanged run would pay it eight
times over for answers that take DVC a fraction of that.
"""

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import TrainpipeError

STAGES = (
    "parent",
    "ingest",
    "curate",
    "tokenize",
    "train",
    "evaluate",
)  # parent first: a bad fine-tune fails in seconds
# The always-changed stage that records what DVC cannot hash (pipelines/stages/inputs.py): a check
# that runs first on every repro, not a step whose running means anything changed.
INPUTS_CHECK = "inputs"


class StageFailed(TrainpipeError):
    """A stage's command failed; exit_code is the stage's own (see pipelines.core.errors)."""

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


KEPT_HEAD_CHUNKS, KEPT_TAIL_CHUNKS = 16, 64


def _pump(src, dst, keep: list[bytes], drop_hints: bool = False) -> None:
    """Copy a pipe to our stream as bytes arrive (progress bars stay live), keeping its head and its
    tail: DVC's "Running stage" comes first, the exit code last, and a stage's progress lines (a
    chunk each) in between may be thousands. With drop_hints, whole lines are copied, without
    DVC's hints and blank lines."""
    pending = b""
    while chunk := os.read(src.fileno(), 65536):
        keep.append(chunk)
        if len(keep) > KEPT_HEAD_CHUNKS + KEPT_TAIL_CHUNKS:
            del keep[KEPT_HEAD_CHUNKS]
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


def in_process(what: str, call):
    """call(repo) on a DVC Repo of the working directory; a failure is a StageFailed naming what
    failed, in DVC's own words (as its CLI would put them)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            return call(repo)
    except DvcException as exc:
        raise StageFailed(f"{what} - {exc}", 1) from None
    except Exception as exc:  # noqa: BLE001 -- an OSError from a remote, say: one line, as the CLI's
        raise StageFailed(f"unexpected error - {exc}", 1) from None


def stage_changes(stages: list[str] | None = None) -> dict[str, str]:
    """What DVC sees changed, per stage that would run (`dvc status`); unchanged ones are absent.
    All stages in one call: DVC collects the whole graph anyway, faster than per target."""
    entries = in_process("dvc status failed", lambda repo: repo.status())
    changes = {name.split(":")[-1]: describe_changes(e) for name, e in entries.items() if isinstance(e, list)}
    return {stage: why for stage, why in changes.items() if stages is None or stage in stages}


UNCHANGED_REASON = "deps, params and outs unchanged (DVC: didn't change, skipping)"


def unchanged_stage(stage: str) -> StageOutcome:
    """What `dvc repro --single-item STAGE` reports for a stage that `dvc status` has just found
    unchanged ("Stage 'STAGE' didn't change, skipping"), without a DVC process to say so."""
    return StageOutcome(stage, False, f"skipped: {UNCHANGED_REASON}", "skipped", UNCHANGED_REASON)


def repro_stage(
    stage: str, env: dict[str, str] | None = None, single: bool = True, changed: str = ""
) -> StageOutcome:
    """`dvc repro [--single-item] STAGE`: runs it only if its deps, params or outs changed.
    changed: what `dvc status` said had changed before, recorded as the reason it ran."""
    stdout = dvc(["repro", *(["--single-item"] if single else []), stage], env=env)
    if f"Running stage '{stage}'" in stdout:
        reason = changed or "DVC found it changed"
        return StageOutcome(stage, True, f"ran ({reason})", "ran", reason)
    if f"Stage '{stage}' is cached" not in stdout:
        return unchanged_stage(stage)
    reason = "same inputs as an earlier run: outputs restored from the DVC run cache"
    return StageOutcome(stage, False, f"skipped: {reason}", "skipped", reason)


def push() -> int:
    """Push the cached outputs to the default DVC remote (a local folder unless configured), as
    `dvc push` does; how many files went. A failure is one line naming the remote."""
    name = os.environ.get("TRAINPIPE_DVC_REMOTE", "").strip() or None
    try:
        return in_process("failed to push data to the cloud", lambda repo: repo.push(remote=name))
    except StageFailed as exc:
        raise StageFailed(f"dvc push to {default_remote()} failed ({exc})", exc.exit_code) from None


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
