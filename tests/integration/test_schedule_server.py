"""The local Prefect server `trainpipe schedule` starts asks for a login, as the team stack's does."""

import stat

import requests
from conftest import free_port, stop_process_group

from pipelines.cli import PREFECT_USER, local_prefect_auth, start_prefect_server


def test_the_local_prefect_server_refuses_a_request_without_its_login(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    auth, auth_file = local_prefect_auth()
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert auth.startswith(f"{PREFECT_USER}:") and len(auth) > len(PREFECT_USER) + 20
    assert local_prefect_auth() == (auth, auth_file)  # made once, then kept
    port = free_port()
    server = start_prefect_server(port, auth)
    try:
        url = f"http://127.0.0.1:{port}/api/flows/filter"
        assert requests.post(url, json={}, timeout=30).status_code == 401
        assert requests.post(url, json={}, auth=(PREFECT_USER, "wrong"), timeout=30).status_code == 401
        user, _, password = auth.partition(":")
        assert requests.post(url, json={}, auth=(user, password), timeout=30).status_code == 200
    finally:
        stop_process_group(server, timeout_s=30)
