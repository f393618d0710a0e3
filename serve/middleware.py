"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers responses and hides disconnects).

Outermost first: `MetricsMiddleware` counts every answer, 413s and 500s included;
`ConcurrencyLimitMiddleware` refuses fill-mask requests beyond this worker's share of
`max_concurrent_requests` before anything else is done for them, and holds a request that comes
before its connection's last Retry-After is over; `BodyLimitMiddleware` refuses
bodies over the limit by Content-Length and by the bytes actually streamed (a chunked body has no
Content-Length); `CatchAllMiddleware` turns any exception into a 500 error body, logs the
traceback server-side, and keeps the exception from reaching uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import error_response, retry_after
from serve.metrics import Metrics

log = logging.getLogger("microbert.serve")


def route_label(routes: Callable[[], Sequence[BaseRoute]], scope: Scope) -> str:
    """The route's path template: every route the app has (`/docs`, mounted static files, …) gets its
    own label, and any other path shares "unmatched", so a scanner cannot grow the metrics without bound.
    `routes` is only called for a request that was answered before routing (404, 413, 429)."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return str(route.path)
    path = scope.get("path", "")
    for candidate in routes():
        if isinstance(candidate, Mount):
            if path == candidate.path or path.startswith(candidate.path.rstrip("/") + "/"):
                return candidate.path or "/"
        elif getattr(candidate, "path", None) == path:
            return str(path)
    return "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], Sequence[BaseRoute]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        error_type: str | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status, error_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-error-type":
                        error_type = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            label = route_label(self.routes, scope)
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_duration.labels(label, str(status)).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.failures.labels(error_type or f"http_{status}").inc()


class ConcurrencyLimitMiddleware:
    """At most `limit` requests to `paths` in this worker at once; the next gets a 429 at once.

    Under overload the HTTP workers' CPU, not the model's queue, is what runs out on a GPU (a request
    costs its worker about half a millisecond of parsing, tokenizing and formatting before the model
    sees it), so requests would otherwise wait in each worker's event loop for as long as there are
    connections. A refusal here reads no body and tokenizes nothing, so the admitted requests wait
    behind at most `limit - 1` others. Health, metrics and the page are never limited.

    Retry-After(-Ms) is set so that clients that honour it come back about as fast as this worker
    frees places: every `_WINDOW_S` it becomes the time this worker takes, at the rate it completed
    requests in that window, to serve the clients already told to wait and not yet back (a refused
    client is told to come back after those), never below the time an admitted request has lately
    spent here, never above `max_retry_s` (half the server's keep-alive: a client that waited
    longer would find its connection closed). With uvicorn's 5 s keep-alive the cap was 2 s, and
    under a steady 4x flood every wait was the cap (bench/NOTES.md, session 16): the clients came
    back before the worker could serve those ahead of them, to be refused again. The wait is read
    from the clients resting, not fed back from refusals: the waits of a window come back windows
    later, and a wait scaled by each window's refusals over completions swung between a tenth of a
    second and the cap, in phase with the crowds it had sent away (Retry-After p10 380 ms, p50
    1.4 s under a steady 4x flood on 2 cores), so refused clients came back too soon and the
    workers spent their CPU refusing them (bench/NOTES.md, session 16).

    A client that ignores the wait is held to it: a request that comes on a connection before the
    Retry-After of that connection's last 429 (this middleware's, or the model queue's `queue_full`)
    is over waits here, at no cost but a timer, until it is, and is then admitted or refused as
    any other. Clients that re-send at once would otherwise spend the worker's CPU on refusals:
    on 2 cores, one worker, 1,024 such connections (wrk), 224,059 refusals and 4,352 answers in
    20 s, against 27,995 and 19,200 with the hold (bench/NOTES.md, session 10). A polite client
    never meets the hold; a client that opens a new connection for each retry is not held. The hold
    applies only while this worker is still refusing (a 429 within the last `_WINDOW_S`): behind a
    proxy that shares its upstream connections among its clients, another client's request on the
    connection that was refused waits only while the server is overloaded, when it would most likely
    have been refused itself.
    """

    _WINDOW_S = 0.5

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        total: int,
        max_retry_s: float,
        metrics: Metrics | None = None,
        paths: tuple[str, ...] = ("/fill-mask",),
    ):
        self.app = app
        self.limit, self.total, self.paths = limit, total, paths
        self.max_retry_s = max_retry_s
        self.metrics = metrics
        self.in_flight = 0
        self.turnover_s = 0.05  # time an admitted request spends here (moving average)
        self.retry_s = self.turnover_s
        self._window_start = time.perf_counter()
        self._completed = 0
        # Until when each connection (client address and port) was told to wait by a 429.
        self._told: dict[tuple[str, int], float] = {}
        self.held = 0  # requests that came before their connection's wait was over, and waited here
        self._last_refusal = -math.inf  # when this worker last answered a 429
        refusal = error_response(
            429,
            "overloaded",
            f"the server is handling as many fill-mask requests as it takes at once ({limit} in "
            f"this worker, its share of max_concurrent_requests = {total}); retry after the "
            "Retry-After header's seconds",
        )
        self._refusal_body = bytes(refusal.body)
        self._refusal_headers = list(refusal.raw_headers)  # content-length, content-type, x-error-type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        told = self._told.pop(client, None) if client is not None else None
        now = time.perf_counter()
        if told is not None and told > now and now - self._last_refusal < self._WINDOW_S:
            # This connection was told to wait and did not: its request waits here for the rest of
            # that time, costing a timer instead of a refusal's CPU (see the class docstring).
            self.held += 1
            if self.metrics is not None:
                self.metrics.requests_held.inc()
            await asyncio.sleep(min(told - now, self.max_retry_s))
        if self.in_flight >= self.limit:
            now = self._last_refusal = time.perf_counter()
            self._adapt(now)
            if client is not None:
                self._told[client] = now + self.retry_s
            await self._refuse(scope, receive, send)
            return
        self.in_flight += 1
        started = time.perf_counter()
        if client is not None:
            send = self._noting_waits(client, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            now = time.perf_counter()
            self.turnover_s += 0.1 * (now - started - self.turnover_s)
            self._completed += 1
            self._adapt(now)

    def _noting_waits(self, client: tuple[str, int], send: Send) -> Send:
        """`send`, noting the wait of a 429 the app answers (the model's queue was full)."""

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                for name, value in message.get("headers", ()):
                    if name == b"retry-after-ms":
                        self._last_refusal = time.perf_counter()
                        self._told[client] = self._last_refusal + int(value) / 1000
            await send(message)

        return noting

    def _adapt(self, now: float) -> None:
        if now - self._window_start < self._WINDOW_S:
            return
        # Connections told to wait whose wait is over and that have not come back (closed, or
        # polite and not yet sent): forget them. The others are the clients still resting.
        self._told = {client: until for client, until in self._told.items() if until > now}
        completions_per_s = self._completed / (now - self._window_start)
        if not self._told:
            self.retry_s = self.turnover_s
        elif completions_per_s <= 0:
            self.retry_s = self.max_retry_s  # nothing completes: as long as a client can wait
        else:
            serve_resting_s = len(self._told) / completions_per_s
            self.retry_s = min(self.max_retry_s, max(self.turnover_s, serve_resting_s))
        self._window_start, self._completed = now, 0

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The answer's body and fixed headers are made once (error_response's shape); only the
        # wait changes. A refusal is what a flood of clients costs this worker, so it is kept short.
        waits = [(name.encode(), value.encode()) for name, value in retry_after(self.retry_s).items()]
        headers = [*self._refusal_headers, *waits]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": self._refusal_body})


_GONE = [(b"x-error-type", b"client_disconnected")]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, size: str) -> ASGIApp:
        return error_response(
            413, "body_too_large", f"request body is {size}; the limit is {self.max_body_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "Content-Length is not a number")(
                        scope, receive, send
                    )
                    return
                if declared > self.max_body_bytes:
                    await self._too_large(f"{declared} bytes")(scope, receive, send)
                    return
        # Read the body here, counting what actually arrives, then hand it to the app in one piece.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Nothing reaches a client that is gone (uvicorn drops the answer); the metrics
                # count it as the route does, not as a 500.
                await send({"type": "http.response.start", "status": 499, "headers": _GONE})
                await send({"type": "http.response.body", "body": b""})
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._too_large(f"over {self.max_body_bytes} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replaying([body], receive), send)


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` (what was already read: the body, whole) first, then the
    server's own: after the body, that waits for the disconnect, as the server's does."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class CatchAllMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = gone = False

        async def send_and_note(message: Message) -> None:
            nonlocal started, gone
            if gone:
                return
            if message["type"] == "http.response.start":
                started = True
            try:
                await send(message)
            except RuntimeError as exc:
                if not _closed_transport(exc):
                    raise
                # The client reset the connection and uvicorn has not been told yet: nothing to answer.
                gone = True
                log.debug("%s %s: the client went away before the answer (%s)", scope.get("method"),
                          scope.get("path"), exc)  # fmt: skip

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error; the server log has details"
                )
                await response(scope, receive, send)


def _closed_transport(exc: RuntimeError) -> bool:
    """uvloop's error for a write to a transport that is already closed ("unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed"): a client's reset that
    reached the event loop before uvicorn's connection_lost, so uvicorn still lets the app send."""
    return "handler is closed" in str(exc)
