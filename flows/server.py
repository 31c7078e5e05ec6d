"""Prefect's temporary local API server, started first thing in `trainpipe run`.

    api = start_temporary_api()    # before anything imports prefect in this process
    ...                            # other imports, while the server starts in its own process
    if api and api.serves():       # Prefect has no server of its own configured: use this one
        api.wait_ready()           # then call the flow

Without an API URL, Prefect starts this same server itself when a flow is first called: a uvicorn
process serving `prefect.server.api.server:create_app`, ephemeral services only, UI off, its
database in PREFECT_HOME. Left to Prefect it costs an unchanged run about half its time: the flow's
own process imports the whole server package (seconds) only to reach the class that starts the
subprocess, and then waits, doing nothing, while the subprocess imports it again and opens the
database. Started here, before this process has imported anything heavy, the server boots on the
other core while this process imports DVC, MLflow and its database store, then Prefect's client.

Whether Prefect has a server of its own (PREFECT_API_URL from the environment, a profile, a .env
or prefect.toml) only Prefect's settings can say, and reading them means importing Prefect: the
server process does it first (it imports Prefect anyway) and says on its first line whether it
serves or is not needed. Only when it serves is PREFECT_API_URL set here, before Prefect is
imported in this process, so that every Prefect client of this process uses it.
"""

import atexit
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.core.errors import TrainpipeError

# what Prefect's SubprocessASGIServer sets for its server (prefect/server/api/server.py, 3.9.1)
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
SERVING, NOT_NEEDED = "serving", "not needed: Prefect has an API URL"
STOP_WAIT_S = 10.0  # a graceful stop flushes the events the server has not written yet


class TemporaryApi:
    """One uvicorn process serving Prefect's API on 127.0.0.1 (unless Prefect has its own server),
    stopped at exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._serves: bool | None = None
        self._ready = False
        root = Path(__file__).resolve().parents[1]  # this very code, wherever the process starts
        serve_here = f"import sys; sys.path.insert(0, {str(root)!r}); from flows.server import serve; serve({self.port})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", serve_here],
            env={**os.environ, **SERVER_ENV},
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)  # at exit: after Prefect's workers have sent their last logs and events

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def serves(self) -> bool:
        """Whether this server is the one to use (its first line); if so, Prefect is pointed at it.
        Call before this process imports Prefect."""
        if self._serves is None:
            if not select.select([self.process.stdout], [], [], _startup_timeout_s())[0]:
                self.stop()
                raise TrainpipeError(_too_slow(_startup_timeout_s()))
            self._serves = self.process.stdout.readline().strip() == SERVING
            if self._serves:
                os.environ["PREFECT_API_URL"] = self.url
                # It serves no UI (as Prefect's own temporary server): no "View at <url>" line
                # to a page that is not there.
                os.environ.setdefault("PREFECT_UI_URL", "")
            else:  # it has said so and is exiting by itself
                try:
                    self.process.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    self.stop()
        return self._serves

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the API answers /health."""
        if self._ready:
            return
        timeout_s = timeout_s or _startup_timeout_s()
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
        raise TrainpipeError(_too_slow(timeout_s))

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
    """Start the server process, unless this process has imported Prefect already (its settings,
    read at import, would not see the server's address: Prefect then starts its own, as before)
    or PREFECT_API_URL names a server."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    return TemporaryApi()


def _startup_timeout_s() -> float:
    """Prefect's own setting for its temporary server, and its default."""
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 20))


def _too_slow(timeout_s: float) -> str:
    return (
        f"Prefect's temporary API server did not answer within {timeout_s:.0f} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """The server gets SIGTERM when its parent dies, even by SIGKILL: no server left behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve(port: int) -> None:
    """The server process: say whether Prefect's settings name a server of their own; if not,
    serve Prefect's API on 127.0.0.1:port as Prefect's own temporary server does."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        print(NOT_NEEDED, flush=True)
        return
    print(SERVING, flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads the pipe after that line
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )
