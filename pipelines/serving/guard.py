"""The bounds `trainpipe serve` puts in front of MLflow's scoring server, as one ASGI middleware.

    app = RequestGuard(scoring_server.init(follower), max_body_bytes=..., max_in_flight=...)

- A request body over max_body_bytes is answered 413 before it is parsed: by its Content-Length
  unread, or as soon as a chunked body passes the limit.
- Past max_in_flight requests at once, 503 with Retry-After, at once: MLflow answers each
  request in a thread, and a request beyond the threads would otherwise wait for one unbounded.
- A 503 of the served model (its queue is full) gets the Retry-After header the model cannot set.
- When a client goes away, the event in CLIENT_GONE is set: the follower hands it to the served
  model, whose decode loop then frees the request's slots (pipelines/core/scheduler.py).
- The server's thread pool is sized to max_in_flight: asyncio's default (cpus + 4) would cap
  continuous batching at a handful of requests.
"""

import asyncio
import contextvars
import json
import threading
from concurrent.futures import ThreadPoolExecutor

# The event of the request this context serves; asyncio.to_thread copies it into the predict thread.
CLIENT_GONE: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "trainpipe_client_gone", default=None
)
RETRY_AFTER_S = 1


async def _answer(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error_code": "REQUEST_REFUSED", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, max_in_flight: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            executor = ThreadPoolExecutor(max_workers=self.max_in_flight + 4, thread_name_prefix="predict")
            asyncio.get_running_loop().set_default_executor(executor)
            return await self.app(scope, receive, send)
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        retry_after = (b"retry-after", str(RETRY_AFTER_S).encode())
        if self.in_flight >= self.max_in_flight:
            return await _answer(
                send,
                503,
                f"the endpoint is busy: {self.in_flight} requests in flight; retry after {RETRY_AFTER_S} s",
                [retry_after],
            )
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send, retry_after)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope, receive, send, retry_after) -> None:
        limit = self.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _answer(send, 413, f"request body of {int(length)} bytes; the limit is {limit}")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await _answer(send, 413, f"request body over {limit} bytes (serve.max_body_bytes)")

        gone = threading.Event()
        disconnected = asyncio.Event()

        async def watch() -> None:  # the only reader of the client's messages after the body
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            disconnected.set()

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                message = {**message, "headers": [*message.get("headers", []), retry_after]}
            await send(message)

        watcher = asyncio.create_task(watch())
        token = CLIENT_GONE.set(gone)
        try:
            await self.app(scope, replay, send_with_retry_after)
        finally:
            CLIENT_GONE.reset(token)
            watcher.cancel()
