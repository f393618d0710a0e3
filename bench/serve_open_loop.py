"""An open-loop load generator for POST /fill-mask: requests arrive at a fixed rate, whatever the
server answers.

    python -m bench.serve_open_loop --port 8000 --rate 6000 --duration 30 [--processes 2]

A closed-loop client (wrk, bench/serve_load.py) sends a connection's next request when the answer
comes, so it offers what the server answers: it cannot put a server at "4× the rate it sustains"
(issue 13), and a server that slows down slows its clients with it. Here arrival i is due at
`i / rate` seconds whatever happened before. It takes an idle keep-alive connection, or opens a
new one while fewer than `max_connections` are open; with none to be had it is counted as
`not_sent` (the client's own limit, reported beside the rest, never hidden). A connection answered
429 rests for the answer's Retry-After-Ms before it takes another arrival, as a polite client does,
so the server never holds its requests. Latencies run from the arrival's due time, not from when
it was sent, so a late send counts against the server (no coordinated omission).

Arrivals are written from the scheduling loop into asyncio protocols (uvloop's where installed),
no task or stream per request: about 100 µs of the client's CPU a request, against 180 with a task
and asyncio streams an arrival (20,000 requests at 2,000/s to a trivial loopback server) — on 2 cores
the client shares the server's CPU. An arrival still unanswered 10 s after the last is due counts as
`error:unanswered_at_end`.

`--processes N` splits the rate over N processes (one Python process sends several thousand
requests a second). To 127.0.0.1, process i connects from 127.0.0.(i+1): one pair of addresses has
~28,000 ephemeral ports, and a polite client at 4× a GPU's rate needs more connections than that
(most of them resting on a Retry-After). Loopback only; at most 60 s, 100,000 requests/s and
65,536 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from bench.serve_load import DEFAULT_TEXT, LOOPBACK, MAX_DURATION_S
from serve.settings import Settings

try:  # the load generator's own CPU is part of what a 2-core run measures: the faster loop if present
    from uvloop import run as _run_loop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    from asyncio import run as _run_loop  # type: ignore[assignment]

MAX_RATE = 100_000.0
# A connection whose last request left longer ago than this is not reused: the server closes a
# keep-alive connection `keep_alive_s` after it sent its last answer (its default here, less a
# second), and a request written into a connection it is closing fails on the client's side.
# Reckoned from the request, which left before the answer did, not from when the answer was read: a
# client whose loop runs seconds behind (2 cores, the flood's client on the server's cores) reads
# answers late, and reckoned from those reads it wrote into connections uvicorn had closed, counted
# as the server's `error:ConnectionError`s.
_KEEP_ALIVE_S = Settings.model_fields["keep_alive_s"].default - 1.0
MAX_CONNECTIONS = 65_536
_GRACE_S = 10.0  # how long answers are awaited after the last arrival is due
_SLOW_S = 1.0  # a 200 slower than this is described one by one (OpenLoopResult.slow_ok)
_SLOWEST_KEPT = 12


@dataclass
class OpenLoopResult:
    rate: float
    duration_s: float
    arrivals: int = 0
    not_sent: int = 0
    connections_opened: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ok_s: list[float] = field(default_factory=list)
    # The 200s sent on a connection already open (not its first request): the server's queueing
    # without the connect storm of a flood's first seconds, when tens of thousands of connects
    # overflow the listen queue and wait out SYN retries (1, 3, 7 s) before the request is even sent.
    latencies_ok_open_s: list[float] = field(default_factory=list)
    # How late each sent arrival left this client (its due time to its turn on the event loop):
    # a client on the server's cores falls behind, and that lateness is in the 200s' latencies.
    send_lags_s: list[float] = field(default_factory=list)
    # How long each new connection took to connect, and for each 200 slower than `_SLOW_S`: its due
    # time into the run, its latency, whether it was its connection's first request, and that
    # connection's connect time. Whether answers of tens of seconds waited for a connection, waited
    # on a connection the server had, or came all at once, is read here.
    connect_s: list[float] = field(default_factory=list)
    slow_ok: list[tuple[float, float, bool, float]] = field(default_factory=list)
    # What each 429 said: its kind (x-error-type: the HTTP worker's `overloaded`, the model queue's
    # `queue_full`) and its wait (Retry-After-Ms), which sets how soon a polite client comes back,
    # and so how many refusals the server spends its CPU on.
    refusals: Counter[str] = field(default_factory=Counter)
    retry_after_s: list[float] = field(default_factory=list)

    def merge(self, other: OpenLoopResult) -> None:
        self.arrivals += other.arrivals
        self.not_sent += other.not_sent
        self.connections_opened += other.connections_opened
        self.statuses.update(other.statuses)
        self.latencies_ok_s += other.latencies_ok_s
        self.latencies_ok_open_s += other.latencies_ok_open_s
        self.send_lags_s += other.send_lags_s
        self.connect_s += other.connect_s
        self.slow_ok += other.slow_ok
        self.refusals.update(other.refusals)
        self.retry_after_s += other.retry_after_s

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ok_s)
        on_open = sorted(self.latencies_ok_open_s)
        lags = sorted(self.send_lags_s)
        connects = sorted(self.connect_s)
        slow = sorted(self.slow_ok, key=lambda item: item[1], reverse=True)
        waits = sorted(self.retry_after_s)

        def ms(q: float, values: list[float] = ordered) -> float | None:
            if not values:
                return None
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

        return {
            "rate": self.rate,
            "duration_s": round(self.duration_s, 2),
            "arrivals": self.arrivals,
            "not_sent": self.not_sent,
            "connections_opened": self.connections_opened,
            "statuses": dict(self.statuses),
            "ok_per_second": round(self.statuses.get("200", 0) / self.duration_s, 1),
            "latency_ok_ms": {
                "p50": ms(0.5),
                "p99": ms(0.99),
                "max": round(ordered[-1] * 1000, 1) if ordered else None,
                # beside the server's own counts (bench/serve_wrk.py app_ok_ms_at_most): slow
                # answers the server did not see as slow waited before it read them
                "over_1s": len(ordered) - bisect.bisect_right(ordered, 1.0),
                "over_10s": len(ordered) - bisect.bisect_right(ordered, 10.0),
            },
            "latency_ok_open_ms": {
                "count": len(on_open),
                "p50": ms(0.5, on_open),
                "p99": ms(0.99, on_open),
                "max": ms(1.0, on_open),
            },
            "send_lag_ms": {"p50": ms(0.5, lags), "p99": ms(0.99, lags), "max": ms(1.0, lags)},
            "connect_ms": {"p50": ms(0.5, connects), "p99": ms(0.99, connects), "max": ms(1.0, connects)},
            "refusals": dict(self.refusals),
            "retry_after_ms": {
                "p10": ms(0.1, waits),
                "p50": ms(0.5, waits),
                "p90": ms(0.9, waits),
                "max": ms(1.0, waits),
            },
            "slow_ok": {
                "count": len(slow),
                "on_new_connections": sum(1 for item in slow if item[2]),
                "first_due_s": round(min(item[0] for item in slow), 2) if slow else None,
                "last_due_s": round(max(item[0] for item in slow), 2) if slow else None,
                # the slowest few: [due s into the run, latency ms, on a new connection, its connect ms]
                "slowest": [
                    [round(at, 2), round(latency * 1000, 1), fresh, round(connect * 1000, 1)]
                    for at, latency, fresh, connect in slow[:_SLOWEST_KEPT]
                ],
            },
        }


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` in a lower-cased response head, or None."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    at += len(name) + 3
    stop = head.find(b"\r\n", at)
    return head[at : stop if stop >= 0 else len(head)].strip()


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time. The answer is parsed from the bytes
    as they arrive (status, Content-Length, Retry-After-Ms): no task, stream or header dict per
    request, so that the client spends its CPU sending, not on itself (on 2 cores it shares the
    server's; with asyncio streams and a task an arrival, its own send lag was a third of the 200s'
    p99 at 4×, BENCHMARKS.md session 12)."""

    def __init__(self, client: _Client):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due = 0.0  # the due time of the arrival it carries
        self.sent = 0.0  # when its last request left: the server's keep-alive timer starts after this
        self.busy = self.closed = False
        self.requests = 0  # sent on this connection so far
        self.connect_s = 0.0  # how long it took to connect
        self._need = -1  # bytes of the whole answer, once its head is in
        self._status, self._retry_s, self._refusal = "", 0.0, ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.due, self.busy, self.sent = due, True, time.perf_counter()
        self.requests += 1
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = _header(head, b"content-length")
            if not head.startswith(b"http/1.1 ") or length is None or not length.isdigit():
                self.abort("error:unframed_answer")  # not an answer this client can delimit
                return
            retry_ms = _header(head, b"retry-after-ms")
            self._status = head[9:12].decode()
            self._retry_s = int(retry_ms) / 1000 if retry_ms and retry_ms.isdigit() else 0.0
            if self._status == "429":
                self._refusal = (_header(head, b"x-error-type") or b"none").decode()
            self._need = end + 4 + int(length)
        if len(self.buffer) >= self._need:
            del self.buffer[: self._need]
            self._need, self.busy = -1, False
            self.client.answered(self, self._status, self._retry_s, self._refusal)

    def abort(self, error: str) -> None:
        if self.busy:
            self.client.result.statuses[error] += 1
            self.busy = False
            self.client.in_flight -= 1
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection closed while it carried a request is that request's error (the server closed it,
        # or reset it); one closed while idle or resting (the server's keep-alive) is nobody's.
        self.abort(f"error:{type(exc).__name__ if exc is not None else 'ConnectionError'}")
        if not self.closed:
            self.closed = True
            self.client.open_count -= 1


class _Client:
    """The arrivals of one process: each due arrival takes the most recently answered idle connection
    that the server is not about to close, or opens one while fewer than `max_connections` are open,
    or is counted `not_sent`."""

    def __init__(self, host: str, port: int, request: bytes, rate: float, duration_s: float,
                 max_connections: int, source: str | None = None):  # fmt: skip
        self.host, self.port, self.request = host, port, request
        self.local_addr = (source, 0) if source is not None else None
        self.rate, self.duration_s, self.max_connections = rate, duration_s, max_connections
        self.result = OpenLoopResult(rate=rate, duration_s=duration_s)
        self.loop = asyncio.get_running_loop()
        self.idle: deque[_Connection] = deque()  # in the order they became free
        self.connections: list[_Connection] = []
        self.open_count = self.in_flight = 0
        self.start = 0.0  # when the first arrival was due
        self._opening: set[asyncio.Task[None]] = set()

    def answered(self, connection: _Connection, status: str, retry_s: float, refusal: str) -> None:
        self.in_flight -= 1
        now = time.perf_counter()
        self.result.statuses[status] += 1
        if status == "200":
            latency = now - connection.due
            self.result.latencies_ok_s.append(latency)
            fresh = connection.requests == 1
            if not fresh:
                self.result.latencies_ok_open_s.append(latency)
            if latency > _SLOW_S:
                slow = (connection.due - self.start, latency, fresh, connection.connect_s)
                self.result.slow_ok.append(slow)
        if status == "429":
            self.result.refusals[refusal] += 1
            self.result.retry_after_s.append(retry_s)
        if status == "429" and retry_s > 0:  # polite: this connection comes back when told
            self.loop.call_later(retry_s, self._rested, connection)
        else:
            self.idle.append(connection)

    def _rested(self, connection: _Connection) -> None:
        if not connection.closed:
            self.idle.append(connection)

    def _retire(self, connection: _Connection) -> None:
        if not connection.closed:
            connection.closed = True
            self.open_count -= 1
            assert connection.transport is not None
            connection.transport.close()

    def _take_idle(self, now: float) -> _Connection | None:
        """The most recently freed idle connection whose keep-alive the server has not run out."""
        keep_alive_s = _KEEP_ALIVE_S
        while self.idle and now - self.idle[0].sent > keep_alive_s:  # the server may be closing it
            self._retire(self.idle.popleft())
        while self.idle:
            connection = self.idle.pop()
            if connection.closed:
                continue
            if now - connection.sent <= keep_alive_s:
                return connection
            self._retire(connection)
        return None

    async def _open_and_send(self, due: float) -> None:
        started = time.perf_counter()
        try:
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port, local_addr=self.local_addr
            )
        except OSError as exc:
            self.result.statuses[f"error:{type(exc).__name__}"] += 1
            self.open_count -= 1
            self.in_flight -= 1
            return
        self.result.connections_opened += 1
        connection.connect_s = time.perf_counter() - started
        self.result.connect_s.append(connection.connect_s)
        self.connections.append(connection)
        connection.send(self.request, due)

    def _arrive(self, due: float, now: float) -> None:
        self.result.arrivals += 1
        connection = self._take_idle(now)
        if connection is None and self.open_count >= self.max_connections:
            self.result.not_sent += 1
            return
        self.result.send_lags_s.append(now - due)  # the client's own lateness, before any I/O
        self.in_flight += 1
        if connection is not None:
            connection.send(self.request, due)
            return
        self.open_count += 1
        task = self.loop.create_task(self._open_and_send(due))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def run(self) -> OpenLoopResult:
        # Times from time.perf_counter, not the loop's clock: uvloop's counts whole milliseconds.
        start = self.start = time.perf_counter()
        total = int(self.rate * self.duration_s)
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = start + sent / self.rate
            if due > now:  # at least a millisecond: uvloop's timers round less to 0, and would spin
                await asyncio.sleep(max(due - now, 0.001))
                continue
            while sent < total and start + sent / self.rate <= now:  # every arrival due by now
                self._arrive(start + sent / self.rate, now)
                sent += 1
        deadline = start + self.duration_s + _GRACE_S  # answers after the last arrival: bounded
        while self.in_flight > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._opening):
            task.cancel()
        for connection in self.connections:  # one still waiting is counted, not dropped
            connection.abort("error:unanswered_at_end")
        await asyncio.sleep(0)  # let the aborted connections' callbacks run
        return self.result


async def _run(host: str, port: int, request: bytes, rate: float, duration_s: float, max_connections: int,
               source: str | None) -> OpenLoopResult:  # fmt: skip
    return await _Client(host, port, request, rate, duration_s, max_connections, source).run()


def _process(host: str, port: int, request: bytes, rate: float, duration_s: float, connections: int,
             index: int) -> OpenLoopResult:  # fmt: skip
    # Linux answers for all of 127.0.0.0/8 on the loopback device: each process gets a source
    # address of its own, and with it a range of ephemeral ports of its own.
    source = f"127.0.0.{index % 254 + 1}" if host == "127.0.0.1" else None
    return _run_loop(_run(host, port, request, rate, duration_s, connections, source))


def run_open_loop(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    rate: float,
    duration_s: float,
    text: str = DEFAULT_TEXT,
    max_connections: int = 4096,
    processes: int = 1,
) -> OpenLoopResult:
    """`rate` requests a second for `duration_s` seconds, split over `processes` processes."""
    if host not in LOOPBACK:
        raise ValueError(f"load tests go to loopback only ({', '.join(LOOPBACK)}), not {host!r}")
    rate, duration_s = min(rate, MAX_RATE), min(duration_s, MAX_DURATION_S)
    max_connections = min(max_connections, MAX_CONNECTIONS)
    body = json.dumps({"inputs": text}).encode()
    request = (
        f"POST /fill-mask HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    share = (host, port, request, rate / processes, duration_s, max(1, max_connections // processes))
    total = OpenLoopResult(rate=rate, duration_s=duration_s)
    if processes == 1:
        total.merge(_process(*share, 0))
    else:
        with ProcessPoolExecutor(processes) as pool:
            for part in [pool.submit(_process, *share, i) for i in range(processes)]:
                total.merge(part.result())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, required=True, help="requests per second, all processes")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=4096, help="open at most, all processes")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    args = parser.parse_args(argv)
    result = run_open_loop(
        args.host, args.port, rate=args.rate, duration_s=args.duration, text=args.text,
        max_connections=args.connections, processes=args.processes,
    )  # fmt: skip
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
