"""Prefect's temporary local API server, started first thing in `trainpipe run`.

    api = start_temporary_api()    # before anything imports prefect; None if PREFECT_API_URL is set
    ...                            # imports, while the server starts in its own process
    api.wait_ready()               # then call the flow

Without PREFECT_API_URL, Prefect starts this same server itself when a flow is first called: a
uvicorn subprocess of `prefect.server.api.server:create_app`, ephemeral services only, UI off,
its database in PREFECT_HOME. Left to Prefect it costs an unchanged run about half its time: the
flow's own process imports the whole server package (seconds) only to reach the class that starts
the subprocess, and then waits, doing nothing, while the subprocess imports it again and opens
the database. Started here, before the flow's process has imported anything heavy, the server
boots on the other core while this process imports Prefect's client, MLflow and torch, and
PREFECT_API_URL, set before Prefect is imported, sends every Prefect client of this process to it.
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path

from pipelines.errors import TrainpipeError

# what Prefect's SubprocessASGIServer sets for its server (prefect/server/api/server.py, 3.9.1)
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STOP_WAIT_S = 10.0  # a graceful stop flushes the events the server has not written yet


class TemporaryApi:
    """One uvicorn process serving Prefect's API on 127.0.0.1, stopped at exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._ready = False
        site_packages = Path(find_spec("prefect").origin).parent.parent  # found without importing it
        cmd = [
            *(sys.executable, "-m", "uvicorn", "--app-dir", str(site_packages)),
            *("--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--log-level", "error", "--lifespan", "on"),
        ]
        self.process = subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV}, preexec_fn=_die_with_parent)
        atexit.register(self.stop)  # at exit: after Prefect's workers have sent their last logs and events

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the API answers /health."""
        if self._ready:
            return
        # Prefect's own setting for its temporary server, and its default
        timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 20))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:  # its error, if any, is above on stderr
                raise TrainpipeError(f"Prefect's temporary API server exited with {code} before it answered")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self._ready = True
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TrainpipeError(
            f"Prefect's temporary API server did not answer within {timeout_s:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        """SIGTERM: uvicorn runs the app's shutdown, where Prefect's services write what they
        still hold (task runs recorded from events among them); SIGKILL if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_temporary_api() -> TemporaryApi | None:
    """Start the server and point Prefect at it, unless Prefect has its own server to use
    (PREFECT_API_URL) or is imported already (its settings, read at import, would not see the
    address: Prefect then starts its own temporary server, as before)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    api = TemporaryApi()
    os.environ["PREFECT_API_URL"] = api.url
    # It serves no UI (as Prefect's own temporary server): no "View at <url>" line to a page
    # that is not there.
    os.environ.setdefault("PREFECT_UI_URL", "")
    return api


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """The server gets SIGTERM when this process dies, even by SIGKILL: no server left behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
