import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group

from pipelines.cli import build_parser, main

COMMANDS = [
    "run",
    "finetune",
    "parent",
    "ingest",
    "curate",
    "tokenize",
    "train",
    "evaluate",
    "publish",
    "promote",
    "rollback",
    "serve",
    "restart",
    "schedule",
    "generate",
    "status",
    "history",
    "compare",
    "stack",
]
PARAMS_FREE = {"stack"}  # starts and stops servers: no params.yaml key changes what it does


def test_every_command_the_design_names_exists_with_help_and_overrides():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, cmd in sub.choices.items():
        assert cmd.description, name
        if name not in PARAMS_FREE:
            assert any("-S" in a.option_strings for a in cmd._actions), name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in PARAMS_FREE or "-S KEY=VALUE" in capsys.readouterr().out


def run_cli(*args, cwd):
    return subprocess.run(
        [str(Path(sys.executable).parent / "trainpipe"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_override_is_exit_2_with_one_line_naming_the_key(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    result = run_cli("publish", "-S", "train.learning_rate=1", cwd=repo)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trainpipe publish: unknown parameter 'train.learning_rate' in override 'train.learning_rate=1'"
    ]


def test_stage_command_outside_a_project_is_a_clear_error(tmp_path):
    result = run_cli("train", cwd=tmp_path)
    assert result.returncode == 2
    assert "project root" in result.stderr.strip().splitlines()[-1]


def test_generate_without_a_model_says_what_to_run(tmp_path):
    result = run_cli("generate", "def f():", "-S", f"train.model_dir={tmp_path}/none", cwd=tmp_path)
    assert result.returncode == 2
    assert "run `trainpipe train` first" in result.stderr


def test_flow_retries_transient_stage_failures_only():
    from prefect.states import Failed

    from flows.training import retry_transient_only
    from pipelines.adapters.dvc_repo import StageFailed

    def failed(code):
        return Failed(data=StageFailed("boom", code))

    assert retry_transient_only(None, None, failed(1)) is True  # e.g. a crashed process
    for permanent in (2, 3, 4):  # bad config, failed gate, diverged loss
        assert retry_transient_only(None, None, failed(permanent)) is False
    assert retry_transient_only(None, None, Failed(data=OSError("disk"))) is True


@pytest.mark.slow
def test_a_scheduling_server_on_another_port_gives_its_ui_that_port(tmp_path, monkeypatch):
    """The UI finds its API through /ui-settings; with Prefect's default it would call port 4200
    and show "Can't connect to Server API" for a server started with --prefect-port."""

    import requests

    from pipelines.cli import start_prefect_server

    port = free_port()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    server = start_prefect_server(port, "trainpipe:a-test-password")
    try:
        settings = requests.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        stop_process_group(server)


def test_stack_without_its_servers_installed_says_how_in_one_line(tmp_path):
    # In a process of its own: the reason is printed by main's exit handler, as a user sees it.
    code = (
        "from infra import servers\n"
        "def not_installed(name): raise FileNotFoundError('PostgreSQL is not installed')\n"
        "servers.postgres_bin = not_installed\n"
        "from pipelines.cli import main\n"
        f"main(['stack', 'up', '--state', {str(tmp_path / 'state')!r}, '--port-offset', '500'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "trainpipe stack: PostgreSQL is not installed: `make stack` installs the stack's servers and clients"
    )


def test_a_model_name_that_would_change_an_mlflow_filter_is_exit_2_with_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    (tmp_path / ".dvc").mkdir()
    params = (repo / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params)
    result = run_cli("run", "-S", "publish.model_name=\"x' OR name LIKE '%\"", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "publish.model_name" in lines[0] and "pattern" in lines[0]
    assert (tmp_path / "params.yaml").read_text() == params  # nothing written
