"""environ_set puts every variable back as it was, whatever the block did."""

import os

import pytest

from pipelines.core.environ import environ_set


def test_variables_are_set_and_unset_inside_and_restored_after_an_exception(monkeypatch):
    monkeypatch.setenv("TP_KEPT", "before")
    monkeypatch.setenv("TP_UNSET", "there")
    monkeypatch.delenv("TP_NEW", raising=False)
    with pytest.raises(RuntimeError), environ_set({"TP_KEPT": "inside", "TP_UNSET": None, "TP_NEW": "new"}):
        assert (os.environ["TP_KEPT"], os.environ.get("TP_UNSET"), os.environ["TP_NEW"]) == (
            "inside",
            None,
            "new",
        )
        raise RuntimeError
    assert os.environ["TP_KEPT"] == "before"
    assert os.environ["TP_UNSET"] == "there"
    assert "TP_NEW" not in os.environ
