"""Crash-safe writes: a file a later run trusts is either the old one or the new one, never half of
either; concurrent writers of one path never share a temporary file; a secret is never readable by
others, not even while it is being written."""

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from pipelines.core.data import atomic_write_bytes, atomic_write_text, write_json


def test_concurrent_writers_of_one_json_never_fail_and_leave_valid_json(tmp_path):
    path = tmp_path / "report.json"
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                write_json(path, {"writer": n, "i": i, "pad": "x" * 2000})
        except Exception as exc:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for _ in range(200):
        if path.exists():
            assert json.loads(path.read_text())["pad"] == "x" * 2000
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize(
    "write",
    [
        lambda p: write_json(p, {"new": 1}),
        lambda p: atomic_write_text(p, "new\n"),
        lambda p: atomic_write_bytes(p, b"new\n"),
    ],
)
def test_a_crash_before_the_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, write):
    path = tmp_path / "report.json"
    path.write_bytes(b'{"old": 1}\n')

    def crash(src, dst):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        write(path)
    assert path.read_bytes() == b'{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_crash_while_writing_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_the_written_file_is_synced_before_it_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda s, d: (events.append("replace"), real_replace(s, d))[1])
    write_json(tmp_path / "r.json", {"a": 1})
    assert events[:2] == ["fsync", "replace"]


def test_an_ordinary_file_gets_the_umask_mode_not_the_temp_files_0600(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def spy_on_renames(monkeypatch) -> list[int]:
    """The mode of each file at the moment it is renamed into place."""
    modes, real_replace = [], os.replace

    def replace(src, dst):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return modes


def test_a_secret_is_0600_from_its_first_byte(tmp_path, monkeypatch):
    modes = spy_on_renames(monkeypatch)
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)  # an older file, readable by all: the new one must not inherit that
    atomic_write_text(path, "s3cret", mode=0o600)
    assert modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "s3cret"


def test_the_stacks_secrets_file_is_never_readable_by_others(tmp_path, monkeypatch):
    from infra.stack import Stack

    stack = Stack(tmp_path)
    stack.state.mkdir(parents=True, exist_ok=True)
    stack.secrets_file.write_text("{}")
    stack.secrets_file.chmod(0o644)  # left by an older version
    modes = spy_on_renames(monkeypatch)
    stack.secrets()
    assert modes == [0o600]
    assert stat.S_IMODE(stack.secrets_file.stat().st_mode) == 0o600


def test_the_mlflow_auth_config_is_never_readable_by_others(tmp_path, monkeypatch):
    from infra import servers

    modes = spy_on_renames(monkeypatch)
    path = tmp_path / "auth.ini"
    servers.mlflow_auth_config(path, "postgresql://db", "admin", "pw")
    assert modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "admin_password = pw" in path.read_text()


def test_the_env_files_are_never_readable_by_others(tmp_path, monkeypatch):
    from infra.envfile import write_env_file
    from infra.stack import Stack

    modes = spy_on_renames(monkeypatch)
    env = tmp_path / ".env"
    write_env_file(env)
    stack_env = Stack(tmp_path / "state").write_env_file()
    assert modes and set(modes) == {0o600}
    assert stat.S_IMODE(env.stat().st_mode) == stat.S_IMODE(stack_env.stat().st_mode) == 0o600


def test_the_model_dir_is_written_through_renames_with_the_same_bytes(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_model

    from pipelines.core.model import GPT, GPTConfig
    from pipelines.core.model_dir import CONFIG_FILE, WEIGHTS_FILE, save_model_dir

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = tmp_path / "reference.safetensors"
    save_model(model, str(reference))
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (renamed.append(Path(d).name), real_replace(s, d))[1])
    save_model_dir(tmp_path / "models", model, tokenizer)
    assert sorted(renamed) == sorted([WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json"])
    assert (tmp_path / "models" / WEIGHTS_FILE).read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(renamed)


def test_the_loss_curve_is_written_through_a_rename(tmp_path, monkeypatch):
    from pipelines.stages.evaluate import write_loss_curve

    modes = spy_on_renames(monkeypatch)
    write_loss_curve([[1, 2.5, 0.1], [2, 2.0, 0.1]], tmp_path / "reports" / "loss_curve.csv")
    assert len(modes) == 1
    assert (tmp_path / "reports" / "loss_curve.csv").read_bytes() == (
        b"step,train_loss,lr\r\n1,2.5,0.1\r\n2,2.0,0.1\r\n"
    )


def test_save_overrides_writes_params_through_a_rename(tmp_path, monkeypatch):
    from pipelines.core.params import save_overrides

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.001  # the rate\n")
    modes = spy_on_renames(monkeypatch)
    save_overrides(path, ["train.lr=0.002"])
    assert len(modes) == 1
    assert path.read_text() == "train:\n  lr: 0.002  # the rate\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_save_overrides_leaves_no_temp_file_when_the_rename_fails(tmp_path, monkeypatch):
    from pipelines.core.params import save_overrides

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        save_overrides(path, ["train.lr=0.002"])
    assert path.read_text() == "train:\n  lr: 0.001\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
