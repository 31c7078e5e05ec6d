"""Training checkpoints that survive a SIGKILL at any moment.

Each run's checkpoints live in their own folder, `checkpoints/<key>/`, the key a short hash of the
run's config and data version (run_key), with a `run.json` naming them; so trying another config
never deletes a half-done run's checkpoints. Each checkpoint is its own file, `ckpt-000400.pt`,
next to `ckpt-000400.sha256` (the sha256 of its bytes). A save writes the checksum, then the data
to a `.tmp` file, then renames the `.tmp` into place: the rename is the commit, so a kill mid-write
leaves only a `.tmp` that nothing reads. The last two checkpoints of a folder are kept: when the
newest is truncated or corrupt (its bytes no longer match the checksum), resume falls back to the
one before, so at most one interval of work is lost. A checkpoint is resumed only by the same code
(the fingerprint's "code" entry) that wrote it, and loaded with torch's weights-only unpickler, so
a file placed in checkpoints/ cannot run code. Train removes the folder once its model is written.
Used by pipelines/stages/train.py.
"""

import io
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch

from pipelines.core.data import sha256_hex

NAME_RE = re.compile(r"ckpt-(\d+)\.pt")
# Tests only: seconds to sleep halfway through writing a checkpoint's data, so that a test can
# SIGKILL a real training process while a half-written .tmp file is on disk.
PAUSE_ENV = "TRAINPIPE_TEST_CHECKPOINT_PAUSE_S"
RUN_FILE = "run.json"
# The fingerprint entry naming the code that wrote a checkpoint: not part of the folder key, so a
# code change finds the old checkpoints, says why it cannot use them, and replaces them.
CODE = "code"


def run_key(fingerprint: dict, version: str) -> str:
    """Short hash of a run's config (the fingerprint without its code) and data version."""
    config = {k: v for k, v in fingerprint.items() if k != CODE}
    blob = json.dumps({"fingerprint": config, "data_version": version}, sort_keys=True)
    return sha256_hex(blob)[:12]


def run_dir(ckpt_root: Path, fingerprint: dict, version: str) -> Path:
    """The folder holding the checkpoints of this config and data."""
    return Path(ckpt_root) / run_key(fingerprint, version)


def remove_run(ckpt_dir: Path) -> None:
    """Delete a run's checkpoint folder: its model is written, so nothing may resume from it."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:06d}.pt"


def checksum_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint files, newest (highest step) first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := NAME_RE.fullmatch(p.name))]
    return sorted(found, reverse=True)


def _write_atomic(path: Path, data: bytes, pause_s: float = 0.0) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        if pause_s:
            fh.flush()
            time.sleep(pause_s)
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, state: dict, keep: Path | None = None) -> Path:
    """Write state as the checkpoint of state["step"]; remove every other checkpoint but `keep`
    (the previous one). Returns the new checkpoint's path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = checkpoint_path(ckpt_dir, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # The checksum goes first: a committed .pt always has the checksum of its own bytes beside it.
    _write_atomic(checksum_path(path), sha256_hex(data).encode())
    _write_atomic(path, data, float(os.environ.get(PAUSE_ENV) or 0))
    run = {"data_version": state["data_version"], "fingerprint": state["fingerprint"]}
    _write_atomic(path.parent / RUN_FILE, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
    prune_checkpoints(ckpt_dir, {path, keep})
    return path


def prune_checkpoints(ckpt_dir: Path, keep: set) -> None:
    """Delete checkpoints, checksums and leftover .tmp files except those of `keep`.
    A .pt goes before its checksum, so no committed file is ever left without one."""
    keep_names = {p.name for p in keep if p} | {checksum_path(p).name for p in keep if p}
    ours = [p for p in Path(ckpt_dir).iterdir() if p.name.startswith("ckpt-") and p.name not in keep_names]
    for p in sorted(ours, key=lambda p: not p.name.endswith(".pt")):
        p.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict:
    """The state saved at path; ValueError when the file does not match its checksum."""
    data = Path(path).read_bytes()
    try:
        expected = checksum_path(path).read_text().strip()
    except FileNotFoundError:
        raise ValueError("no checksum beside it") from None
    if sha256_hex(data) != expected:
        raise ValueError(f"truncated or corrupt ({len(data):,} bytes do not match its checksum)")
    try:  # never unpickle code: a file placed here must not run anything
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("it holds objects other than tensors and plain data; refused unread") from None
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint")
    return state


def code_changes(old: dict, new: dict) -> str:
    """What differs between the code that wrote a checkpoint and this code, for a person."""
    names = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    return ", ".join(
        f"{n} changed" if n.endswith(".py") else f"{n} {old.get(n)} -> {new.get(n)}" for n in names
    )


def load_checkpoint(ckpt_dir: Path, fingerprint: dict, version: str) -> tuple[dict | None, Path | None, list]:
    """The newest intact checkpoint in ckpt_dir (run_dir's folder) of this run's code, config and
    data: (state, path, notes), where the notes say which checkpoints were passed over and why,
    and the last one what happens now."""
    notes, stale = [], None
    for step, path in list_checkpoints(ckpt_dir):
        try:
            state = read_checkpoint(path)
        except Exception as exc:  # a damaged file can fail in many ways; every one means "skip it"
            notes.append(f"checkpoint {path} is unusable ({exc}); trying the one before")
            continue
        theirs = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
        if {**theirs, CODE: None} != {**fingerprint, CODE: None}:  # only a hand-moved folder
            stale = stale or f"checkpoint {path} has another config"
        elif theirs.get(CODE) != fingerprint.get(CODE):
            changes = code_changes(theirs.get(CODE) or {}, fingerprint.get(CODE) or {})
            stale = stale or f"checkpoint {path} was written by other code ({changes})"
        elif state.get("data_version") != version:
            stale = stale or f"checkpoint {path} was trained on other data"
        else:
            return state, path, [*notes, f"resuming from checkpoint at step {step} ({path.name})"]
    if stale:
        return None, None, [*notes, f"{stale}; starting fresh"]
    return None, None, [*notes, "no usable checkpoint; starting fresh" if notes else "no checkpoint"]
