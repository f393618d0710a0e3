"""The pure ASGI middleware on its own: a client's reset during the answer, and the Retry-After of
the concurrency limit's refusals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from serve.middleware import BodyLimitMiddleware, CatchAllMiddleware, ConcurrencyLimitMiddleware

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


def test_the_wait_a_refusal_asks_for_is_the_time_to_serve_the_clients_already_waiting() -> None:
    """100 clients resting on a 429 and 50 completions in a half-second window (100 a second): the
    next refused client waits 1 s, behind them. Never above the cap, never below the time a request
    spends inside; nobody resting: that time; nothing completing: the cap. What the window refused
    does not enter (the wait scaled by refusals over completions oscillated: bench/NOTES.md)."""
    limiter = ConcurrencyLimitMiddleware(_answer, limit=1, total=1, max_retry_s=2.0)
    limiter.turnover_s = limiter.retry_s = 0.1
    window = ConcurrencyLimitMiddleware._WINDOW_S

    def window_of(resting: int, completed: int) -> float:
        end = limiter._window_start + window
        limiter._told = {("127.0.0.1", port): end + 5.0 for port in range(resting)}
        limiter._told[("127.0.0.1", 99_999)] = end - 0.01  # its wait is over: not resting
        limiter._completed = completed
        limiter._adapt(end)
        assert ("127.0.0.1", 99_999) not in limiter._told
        return limiter.retry_s

    assert window_of(100, 50) == pytest.approx(1.0)
    assert window_of(10, 50) == pytest.approx(0.1)  # 0.1 s to serve them: the turnover
    assert window_of(5, 50) == pytest.approx(limiter.turnover_s)  # never below the turnover
    assert window_of(10_000, 50) == limiter.max_retry_s
    assert window_of(3, 0) == limiter.max_retry_s
    assert window_of(0, 0) == pytest.approx(limiter.turnover_s)
    limiter._told = {("127.0.0.1", 1): limiter._window_start + 100.0}
    limiter._completed = 1
    limiter._adapt(limiter._window_start + window / 2)  # within the window: unchanged
    assert limiter.retry_s == pytest.approx(limiter.turnover_s) and limiter._completed == 1


def _recording_send(statuses: list[int]) -> Send:
    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return send


async def _timed(app: Any, client: tuple[str, int]) -> tuple[int, float]:
    """One request from `client` (address, port: one connection): its status and how long it took."""
    statuses: list[int] = []
    started = asyncio.get_running_loop().time()
    await app({**SCOPE, "client": client}, _receive, _recording_send(statuses))
    return statuses[0], asyncio.get_running_loop().time() - started


def test_a_request_sent_before_its_connections_retry_after_is_over_is_held_until_it_is() -> None:
    """A connection refused with a wait of 0.2 s that re-sends at once waits here for that time, then is
    served; another connection, and the same one once it waited as told, are not held."""
    limiter = ConcurrencyLimitMiddleware(_answer, limit=1, total=1, max_retry_s=2.0)
    limiter.turnover_s = limiter.retry_s = 0.2
    impolite, other, polite = ("127.0.0.1", 40001), ("127.0.0.1", 40002), ("127.0.0.1", 40003)

    async def scenario() -> list[tuple[int, float]]:
        limiter.in_flight = 1  # another request holds the only place
        refusals = [await _timed(limiter, impolite), await _timed(limiter, polite)]
        limiter.in_flight = 0
        results = [*refusals, await _timed(limiter, impolite), await _timed(limiter, other)]
        await asyncio.sleep(0.2)
        return [*results, await _timed(limiter, polite)]

    (refused, _), (also_refused, _), (held, held_s), (fresh, fresh_s), (waited, waited_s) = asyncio.run(
        scenario()
    )
    assert (refused, also_refused, held, fresh, waited) == (429, 429, 200, 200, 200)
    assert held_s >= 0.15 and fresh_s < 0.05 and waited_s < 0.05
    assert limiter.held == 1 and not limiter._told  # each wait is used once


def test_the_wait_of_the_models_queue_full_429_holds_the_connections_next_request() -> None:
    async def queue_full(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"retry-after", b"1"), (b"retry-after-ms", b"150")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    limiter = ConcurrencyLimitMiddleware(queue_full, limit=8, total=8, max_retry_s=2.0)
    client = ("127.0.0.1", 40004)

    async def scenario() -> list[tuple[int, float]]:
        return [await _timed(limiter, client), await _timed(limiter, client)]

    (first, first_s), (second, second_s) = asyncio.run(scenario())
    assert (first, second) == (429, 429) and first_s < 0.05 and second_s >= 0.12
    assert limiter.held == 1


def test_waits_of_connections_that_did_not_come_back_are_forgotten() -> None:
    limiter = ConcurrencyLimitMiddleware(_answer, limit=1, total=1, max_retry_s=2.0)
    now = limiter._window_start
    limiter._told = {("127.0.0.1", port): now + 0.1 * (port % 2) for port in range(1000)}
    limiter._adapt(now + ConcurrencyLimitMiddleware._WINDOW_S)  # a window later: all are over
    assert not limiter._told


def test_a_client_gone_before_its_body_is_counted_as_disconnected_not_as_a_500() -> None:
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    asyncio.run(BodyLimitMiddleware(_answer, max_body_bytes=1024)(SCOPE, _receive, send))
    assert messages[0]["status"] == 499
    assert (b"x-error-type", b"client_disconnected") in messages[0]["headers"]


def test_no_hold_once_the_worker_has_stopped_refusing() -> None:
    """Behind a proxy a refused connection may carry another client's request next: it is held only
    while the worker is still refusing."""
    limiter = ConcurrencyLimitMiddleware(_answer, limit=1, total=1, max_retry_s=2.0)
    limiter.turnover_s = limiter.retry_s = 2.0  # a long wait, still running below
    client = ("127.0.0.1", 40005)

    async def scenario() -> list[tuple[int, float]]:
        limiter.in_flight = 1
        refused = await _timed(limiter, client)
        limiter.in_flight = 0
        await asyncio.sleep(ConcurrencyLimitMiddleware._WINDOW_S + 0.05)  # no refusal since
        return [refused, await _timed(limiter, client)]

    (refused, _), (served, served_s) = asyncio.run(scenario())
    assert (refused, served) == (429, 200) and served_s < 0.05 and limiter.held == 0
