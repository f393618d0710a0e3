"""The pure ASGI middleware on its own: a client's reset during the answer, and the Retry-After of
the concurrency limit's refusals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from serve.middleware import CatchAllMiddleware, ConcurrencyLimitMiddleware

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/fill-mask", "headers": []}


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> Message:
    return {"type": "http.disconnect"}


def _failing_send(error: Exception) -> Any:
    async def send(message: Message) -> None:
        raise error

    return send


def test_a_reset_the_server_has_not_seen_yet_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """uvloop refuses the write to a transport the client already reset; nothing is left to answer."""
    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    with caplog.at_level(logging.INFO, logger="microbert.serve"):
        asyncio.run(CatchAllMiddleware(_answer)(SCOPE, _receive, _failing_send(closed)))
    assert not caplog.records


def test_any_other_failure_to_send_is_still_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="microbert.serve"):
        asyncio.run(CatchAllMiddleware(_answer)(SCOPE, _receive, _failing_send(RuntimeError("a bug"))))
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "unhandled error in POST /fill-mask" in caplog.records[0].getMessage()


def test_the_wait_a_refusal_asks_for_follows_refusals_over_completions() -> None:
    """Four times as many refusals as completions in a window: the wait doubles (the square root);
    never above the cap, never below the time a request spends inside; no refusals: back to that."""
    limiter = ConcurrencyLimitMiddleware(_answer, limit=1, total=1)
    limiter.turnover_s = limiter.retry_s = 0.1
    window = ConcurrencyLimitMiddleware._WINDOW_S

    def window_of(refused: int, completed: int) -> float:
        limiter._refused, limiter._completed = refused, completed
        limiter._adapt(limiter._window_start + window)
        return limiter.retry_s

    assert window_of(400, 100) == pytest.approx(0.2)
    assert window_of(400, 100) == pytest.approx(0.4)
    assert window_of(10_000, 1) == ConcurrencyLimitMiddleware._MAX_RETRY_S
    assert window_of(1, 100) == pytest.approx(0.2)  # a tenth
    assert window_of(1, 10_000) == pytest.approx(limiter.turnover_s)  # never below the turnover
    limiter.retry_s = 1.0
    assert window_of(0, 50) == pytest.approx(limiter.turnover_s)
    limiter._refused, limiter._completed = 5, 0
    limiter._adapt(limiter._window_start + window / 2)  # within the window: unchanged
    assert limiter.retry_s == pytest.approx(limiter.turnover_s) and limiter._refused == 5
