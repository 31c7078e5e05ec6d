"""The champion history: one record per alias move on a real MLflow registry (SQLite), concurrent
moves that lose none, rollback that walks the records, and `trainpipe history`."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.adapters.registry import HISTORY_TAG_PREFIX, LEGACY_HISTORY_TAG, champion_history
from pipelines.cli import format_history, main
from pipelines.commands.promote import promote_version, read_history, rollback_champion
from pipelines.commands.promotion import move_champion
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, PublishParams

NAME = PublishParams().model_name
TRAINPIPE = str(Path(sys.executable).parent / "trainpipe")


@pytest.fixture
def versions(mlflow_env, smoked_model_source) -> MlflowClient:
    """A registered model with 17 versions of one served model (a champion must pass its smoke
    test: they carry the result that model earned, so no move here waits for a fresh process)."""
    source, smoke_tags = smoked_model_source
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(17):
        client.create_model_version(NAME, source=source, tags=smoke_tags)
    return client


def moves(client: MlflowClient) -> list[tuple]:
    return [(m["from"], m["to"], m["command"]) for m in champion_history(client, NAME)]


def test_concurrent_moves_lose_no_record(versions):
    move_champion(versions, NAME, "17")  # a champion to move from (MLflow's first alias insert races)
    start = threading.Barrier(8)
    errors = []

    def move_two(k: int) -> None:
        client = MlflowClient()  # each thread its own client, as each process would have
        start.wait()
        for version in (2 * k + 1, 2 * k + 2):
            try:
                move_champion(client, NAME, str(version))
            except Exception as exc:  # noqa: BLE001 - reported below, with the thread's move
                errors.append(f"v{version}: {exc}")

    threads = [threading.Thread(target=move_two, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = champion_history(versions, NAME)
    # A read-modify-write CSV tag kept 5 of these 17 moves when this was measured.
    assert len(history) == 17
    assert sorted(int(m["to"]) for m in history) == list(range(1, 18))
    champion = str(versions.get_model_version_by_alias(NAME, "champion").version)
    assert champion in {m["to"] for m in history}


def test_each_move_is_a_record_with_time_from_to_reason_and_command(versions):
    params = Params()
    promote_version(params, 1)
    promote_version(params, 2)
    assert promote_version(params, 2)["promoted"] is False  # already champion: no record
    tags = versions.get_registered_model(NAME).tags
    keys = sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX))
    assert len(keys) == 2 and LEGACY_HISTORY_TAG not in tags
    first, second = (json.loads(tags[k]) for k in keys)
    assert set(first) == {"time", "from", "to", "reason", "flow_run", "command"}
    assert (first["from"], first["to"], first["command"]) == (None, "1", "trainpipe promote")
    assert (second["from"], second["to"], second["reason"]) == ("1", "2", "v2 promoted by hand (was v1)")
    assert first["flow_run"] is None  # no Prefect flow run around a plain call
    assert first["time"] <= second["time"] and first["time"].startswith("20")


def test_rollback_walks_the_records(versions):
    params = Params()
    for v in (1, 2, 3):
        promote_version(params, v)
    back = rollback_champion(params)
    assert (back["previous_champion"], back["version"]) == ("3", "2")
    assert rollback_champion(params)["version"] == "1"  # v3 and v2 were rolled back
    with pytest.raises(ConfigError, match="no earlier champion"):
        rollback_champion(params)
    assert moves(versions) == [
        (None, "1", "trainpipe promote"),
        ("1", "2", "trainpipe promote"),
        ("2", "3", "trainpipe promote"),
        ("3", "2", "trainpipe rollback"),
        ("2", "1", "trainpipe rollback"),
    ]
    assert champion_history(versions, NAME)[-1]["reason"] == "rolled back from v2"


def test_a_registry_written_before_the_records_keeps_its_history(versions):
    versions.set_registered_model_tag(NAME, LEGACY_HISTORY_TAG, "1,3")  # the old CSV tag
    versions.set_registered_model_alias(NAME, "champion", "3")
    promote_version(Params(), 5)
    assert moves(versions) == [(None, "1", None), ("1", "3", None), ("3", "5", "trainpipe promote")]
    assert rollback_champion(Params())["version"] == "3"


def test_finishing_a_cut_short_move_records_it_once(versions):
    promote_version(Params(), 1)
    versions.set_registered_model_alias(NAME, "champion", "2")  # a publish killed after moving it
    move_champion(versions, NAME, "2")  # the re-run finishes the move
    move_champion(versions, NAME, "2")  # and a second re-run adds nothing
    assert moves(versions) == [(None, "1", "trainpipe promote"), ("1", "2", "trainpipe publish")]
    assert champion_history(versions, NAME)[-1]["reason"].endswith(
        "(recorded by the run that finished the move)"
    )


def test_format_history_fits_120_columns_oldest_first():
    long_reason = "challenger -0.1700 bpb [-0.1900, -0.1500]: better, v12 becomes champion " * 3
    lines = format_history(
        [
            {"time": "", "from": None, "to": "1", "reason": "old", "flow_run": None, "command": None},
            {
                "time": "2026-01-02T03:04:05+00:00",
                "from": "1",
                "to": "12",
                "reason": long_reason,
                "flow_run": "0b7f3c2e-1111-2222-3333-444455556666",
                "command": "trainpipe run",
            },
        ]
    )
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].split() == ["time", "(UTC)", "from", "->", "to", "command", "flow", "run", "reason"]
    assert lines[1].split()[:5] == ["-", "none", "->", "v1", "-"]
    assert lines[2].startswith("2026-01-02 03:04:05  v1 -> v12     trainpipe run       0b7f3c2e  challenger")
    assert len(lines) > 3 and lines[3].startswith(" " * 65)  # the long reason wraps in its column
    assert " ".join(" ".join(line[65:] for line in lines[2:]).split()) == " ".join(long_reason.split())


def test_format_history_keeps_an_interval_on_one_line():
    # at every position the wrap could fall, the interval and its numbers stay whole
    interval = "-0.0040 bpb [-0.0110, +0.0030]"
    for pad in range(50):  # the reason column is 55 wide
        reason = "x" * pad + f" challenger {interval}: not significant, champion v4 keeps serving"
        move = {"time": "", "from": "4", "to": "5", "reason": reason, "flow_run": None, "command": None}
        lines = format_history([move])
        assert all(len(line) <= 120 for line in lines)
        shown = [line[65:] for line in lines[1:]]
        assert any("[-0.0110, +0.0030]" in line for line in shown), shown
        assert any("-0.0040 bpb" in line for line in shown), shown
        assert " ".join(" ".join(shown).split()) == " ".join(reason.split())


def trainpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TRAINPIPE, *args], capture_output=True, text=True, timeout=300)


def test_history_command_lists_every_move(versions, capsys):
    main(["history"])
    assert "has never moved" in capsys.readouterr().out
    promote_version(Params(), 4)
    promote_version(Params(), 6)
    rollback_champion(Params())
    shown = trainpipe("history")
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.strip().splitlines()
    assert len(rows) == 4 and all(len(row) <= 120 for row in rows)
    assert [row[21:33].strip() for row in rows[1:]] == ["none -> v4", "v4 -> v6", "v6 -> v4"]
    assert rows[3][65:] == "rolled back from v6"
    main(["history", "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["command"] for r in records] == ["trainpipe promote", "trainpipe promote", "trainpipe rollback"]


def test_history_of_an_unknown_model_is_one_line(mlflow_env):
    with pytest.raises(ConfigError) as info:
        read_history(PublishParams(model_name="nothing-here"))
    assert str(info.value) == f"no registered model nothing-here in {mlflow_env}: nothing was published yet"
