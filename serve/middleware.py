"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers responses and hides disconnects).

Outermost first: `MetricsMiddleware` counts every answer, 413s and 500s included;
`BodyLimitMiddleware` refuses bodies over the limit by Content-Length and by the bytes actually
streamed (a chunked body has no Content-Length); `CatchAllMiddleware` turns any exception into a
500 error body, logs the traceback server-side, and keeps the exception from reaching uvicorn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import error_response
from serve.metrics import Metrics

log = logging.getLogger("microbert.serve")


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route's path template: every route the app has (`/docs`, mounted static files, …) gets its
    own label, and any other path shares "unmatched", so a scanner cannot grow the metrics without bound."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return str(route.path)
    path = scope.get("path", "")
    for candidate in routes:
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
            label = route_label(self.routes(), scope)
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_duration.labels(label).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.failures.labels(error_type or f"http_{status}").inc()


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
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._too_large(f"over {self.max_body_bytes} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: waits for the disconnect, as the server's does

        await self.app(scope, replay, send)


class CatchAllMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error; the server log has details"
                )
                await response(scope, receive, send)
