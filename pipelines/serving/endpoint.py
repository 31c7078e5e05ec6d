"""The endpoint that follows @champion: MLflow's scoring server over whichever version is champion.

    trainpipe serve        # http://127.0.0.1:5001/invocations, follows models:/<name>@champion

One process runs MLflow's own scoring server (mlflow.pyfunc.scoring_server.init under uvicorn,
as `mlflow models serve` does) over a ChampionFollower: it stands in for the pyfunc model and
hands each request to the version it holds now. A watcher thread reads @champion every
serve.poll_s seconds. When the alias moved, it loads the new version beside the old one through
MLflow's pyfunc loader (in a code scope of its own: the version's own model code, not this
checkout's), smoke-tests it (pipelines.serving.smoke), then swaps one reference. A request reads that
reference once, so requests in flight finish on the old version, and the old one is freed when
the last of them returns. A version that fails to load or fails its smoke test never takes
traffic: the endpoint keeps serving the old one, logs why, and records the failure.

What it serves is recorded on the registered model (tag endpoint/<host>-<port>): `trainpipe
status` and the flow read it there, then ask the endpoint itself (every prediction carries the
`model_version` that produced it).
"""

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from pipelines.core.code_scope import own_code_scope
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, ServeParams
from pipelines.serving.guard import CLIENT_GONE, RequestGuard
from pipelines.serving.smoke import DownloadFailed, SmokeFailure, load_and_check

log = logging.getLogger("trainpipe.serve")
MODEL_VERSION = "model_version"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ServedVersion:
    version: str
    model: object  # mlflow.pyfunc.PyFuncModel
    since: str


class ChampionFollower:
    """What MLflow's scoring server calls `model`: the metadata and predict of the version served
    now. swap() replaces the version in one assignment; predict reads it once per request."""

    def __init__(self, first: ServedVersion):
        self._current = first

    @property
    def current(self) -> ServedVersion:
        return self._current

    @property
    def metadata(self):
        return self._current.model.metadata

    def predict(self, data, params=None):
        served = self._current  # the whole request runs on this version, whatever swaps meanwhile
        # A version that batches frees its slots once this request's client has gone (guard.py)
        cancel_when = getattr(served.model.unwrap_python_model(), "cancel_when", None)
        gone = CLIENT_GONE.get()
        if cancel_when is not None:
            cancel_when(gone)
        try:
            out = served.model.predict(data, params=params)
        except Exception:
            if gone is not None and gone.is_set():
                log.info("a client went away: its request stopped on v%s and freed its slots", served.version)
            raise
        if MODEL_VERSION not in out.columns:  # a version logged before predictions named it
            out[MODEL_VERSION] = served.version
        return out

    def swap(self, new: ServedVersion) -> ServedVersion:
        old, self._current = self._current, new
        return old


def load_version(
    name: str, version: str, deadline_s: float, serve: ServeParams | None = None
) -> ServedVersion:
    """Load models:/name/version and smoke-test it in this process; SmokeFailure if unfit. Its
    scheduler takes this endpoint's capacity (serve), where the version can."""
    with tempfile.TemporaryDirectory(prefix="trainpipe-serve-") as tmp, own_code_scope():
        model = load_and_check(f"models:/{name}/{version}", version, tmp, deadline_s)
    set_capacity = getattr(model.unwrap_python_model(), "set_capacity", None)
    if serve is not None and set_capacity is not None:  # a version logged before batching has none
        set_capacity(
            serve.max_batch_sequences,
            serve.max_queued_requests,
            serve.request_timeout_s,
            serve.decode_threads,
        )
    return ServedVersion(str(version), model, _now())


class ChampionWatcher(threading.Thread):
    """Follows @champion: on a move, load beside, smoke-test, swap, release the old version."""

    def __init__(self, follower: ChampionFollower, params: Params, url: str, record_key: str):
        super().__init__(name="champion-watcher", daemon=True)
        self.follower = follower
        self.name_ = params.publish.model_name
        self.poll_s = params.serve.poll_s
        self.deadline_s = params.serve.smoke_timeout_s
        self.serve = params.serve
        self.url = url
        self.record_key = record_key
        self.started = _now()
        self.failure: dict | None = None
        self.stopping = threading.Event()

    def record(self) -> dict:
        served = self.follower.current
        return {
            "url": self.url,
            "version": served.version,
            "since": served.since,
            "started": self.started,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "poll_s": self.poll_s,
            "failure": self.failure,
            "updated": _now(),
        }

    def publish_record(self) -> None:
        from mlflow import MlflowClient

        from pipelines.adapters.registry import write_endpoint_record

        try:
            write_endpoint_record(MlflowClient(), self.name_, self.record_key, self.record())
        except Exception as exc:  # the endpoint serves on; only its record is stale
            log.warning("could not record what this endpoint serves in the registry: %s", exc)

    def run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            try:
                self.check_once()
            except Exception as exc:  # a registry hiccup must not stop the following
                log.warning(
                    "could not read @champion (%s); still serving v%s", exc, self.follower.current.version
                )

    def check_once(self) -> None:
        from mlflow import MlflowClient

        from pipelines.adapters.registry import get_champion

        champion = get_champion(MlflowClient(), self.name_)
        serving = self.follower.current.version
        if champion is None or str(champion.version) == serving:
            return
        version = str(champion.version)
        if self.failure and self.failure["version"] == version:
            return  # already refused; tried again only once the alias has moved elsewhere
        log.info("@champion moved to v%s: loading it beside v%s", version, serving)
        try:
            new = load_version(self.name_, version, self.deadline_s, self.serve)
        except DownloadFailed as exc:  # the store, not the version: tried again at the next poll
            log.warning("could not download v%s (%s); still serving v%s, trying again", version, exc, serving)
            return
        except SmokeFailure as exc:
            self.failure = {"version": version, "reason": str(exc), "time": _now()}
            log.error(
                "v%s failed its smoke test (%s): it takes no traffic; still serving v%s",
                version,
                exc,
                serving,
            )
            self.publish_record()
            return
        old = self.follower.swap(new)
        self.failure = None
        log.info("now serving v%s (was v%s)", version, old.version)
        self.publish_record()  # before the collection below, which can take a while on a busy host
        del old  # freed once the requests still running on it return
        gc.collect()


def curl_example(host: str, port: int) -> str:
    body = json.dumps(
        {"dataframe_records": [{"prompt": "def fibonacci(n):"}], "params": {"max_new_tokens": 48}}
    )
    return f"curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' -d '{body}'"


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def serve_following(params: Params, port: int | None = None) -> int:
    """Serve @champion on host:port and follow it until interrupted; 0 on a clean stop."""
    import uvicorn
    from mlflow import MlflowClient
    from mlflow.pyfunc import scoring_server

    from pipelines.adapters.registry import delete_endpoint_record, get_champion
    from pipelines.serving.address import endpoint_address

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    name, host = params.publish.model_name, params.serve.host
    port = port or params.serve.port
    if not _port_free(host, port):
        raise ConfigError(f"port {port} on {host} is in use: stop what listens there or pass --port")
    champion = get_champion(MlflowClient(), name)
    if champion is None:
        raise ConfigError(f"no champion registered for model {name}: run `trainpipe run` first")
    version = str(champion.version)
    print(f"loading {name} v{version} (@champion) and smoke-testing it", flush=True)
    try:
        first = load_version(name, version, params.serve.smoke_timeout_s, params.serve)
    except SmokeFailure as exc:
        raise ConfigError(f"champion v{version} of {name} is not fit to serve: {exc}") from None
    follower = ChampionFollower(first)
    record_key, url = endpoint_address(host, port)  # one record per replica, at a reachable URL
    watcher = ChampionWatcher(follower, params, url, record_key)
    serve = params.serve
    app = RequestGuard(
        scoring_server.init(follower),
        max_body_bytes=serve.max_body_bytes,
        max_in_flight=serve.max_batch_sequences + serve.max_queued_requests,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    watcher.publish_record()
    watcher.start()
    print(
        f"serving {name} v{version} at {url}/invocations, following @champion every {params.serve.poll_s:g} s"
    )
    print(f"try: {curl_example(host, port)}", flush=True)
    # uvicorn answers the requests in flight on SIGTERM, then re-raises the signal to the handler
    # it found: make that an exit, so the record below is cleared (SIGINT is KeyboardInterrupt).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run()
    finally:
        watcher.stopping.set()
        with contextlib.suppress(Exception):
            delete_endpoint_record(MlflowClient(), name, watcher.record_key)
    return 0
