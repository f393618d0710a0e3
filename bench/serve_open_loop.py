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

`--processes N` splits the rate over N processes (one Python process sends a few thousand requests
a second). Loopback only; at most 60 s, 100,000 requests/s and 16,384 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.serve_load import DEFAULT_TEXT, LOOPBACK, MAX_DURATION_S, read_response

MAX_RATE = 100_000.0
# A connection idle longer than this is not reused: uvicorn closes keep-alive connections after 5 s
# idle, and a request written into a connection it is closing fails on the client's side.
_KEEP_ALIVE_S = 4.0
MAX_CONNECTIONS = 16_384

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class OpenLoopResult:
    rate: float
    duration_s: float
    arrivals: int = 0
    not_sent: int = 0
    connections_opened: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ok_s: list[float] = field(default_factory=list)
    # How late each sent arrival left this client (its due time to its turn on the event loop):
    # a client on the server's cores falls behind, and that lateness is in the 200s' latencies.
    send_lags_s: list[float] = field(default_factory=list)

    def merge(self, other: OpenLoopResult) -> None:
        self.arrivals += other.arrivals
        self.not_sent += other.not_sent
        self.connections_opened += other.connections_opened
        self.statuses.update(other.statuses)
        self.latencies_ok_s += other.latencies_ok_s
        self.send_lags_s += other.send_lags_s

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ok_s)
        lags = sorted(self.send_lags_s)

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
            },
            "send_lag_ms": {"p50": ms(0.5, lags), "p99": ms(0.99, lags)},
        }


async def _exchange(connection: Connection, request: bytes) -> tuple[str, float]:
    """One request on a keep-alive connection: its status and the Retry-After-Ms it asked for (s)."""
    reader, writer = connection
    writer.write(request)
    status, headers = await read_response(reader)
    return status, int(headers.get("retry-after-ms", 0)) / 1000


async def _run(host: str, port: int, request: bytes, rate: float, duration_s: float, max_connections: int
               ) -> OpenLoopResult:  # fmt: skip
    loop = asyncio.get_running_loop()
    result = OpenLoopResult(rate=rate, duration_s=duration_s)
    idle: deque[tuple[Connection, float]] = deque()  # with when each was answered
    open_count = 0
    pending: set[asyncio.Task[None]] = set()

    async def arrival(taken: tuple[Connection, float] | None, due: float) -> None:
        nonlocal open_count
        now = loop.time()
        result.send_lags_s.append(now - due)  # the client's own lateness, before any I/O
        connection = None
        if taken is not None:  # checked again here: a client behind its schedule starts tasks late
            connection, answered = taken
            if now - answered > _KEEP_ALIVE_S:
                connection[1].close()
                connection = None
        try:
            if connection is None:
                connection = await asyncio.open_connection(host, port)
                result.connections_opened += 1
            status, wait_s = await _exchange(connection, request)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
            result.statuses[f"error:{type(exc).__name__}"] += 1
            if connection is not None:
                connection[1].close()
            open_count -= 1
            return
        answered = loop.time()  # the server's keep-alive timer runs from here, through any rest
        result.statuses[status] += 1
        if status == "200":
            result.latencies_ok_s.append(answered - due)
        if status == "429" and wait_s > 0:
            await asyncio.sleep(wait_s)  # polite: this connection comes back when told
        idle.append((connection, answered))

    def take_idle(now: float) -> tuple[Connection, float] | None:
        """The most recently answered idle connection that the server is not about to close."""
        nonlocal open_count
        while idle:
            connection, answered = idle.pop()
            if now - answered <= _KEEP_ALIVE_S:
                return connection, answered
            connection[1].close()
            open_count -= 1
        return None

    start = loop.time()
    total = int(rate * duration_s)
    sent = 0
    while sent < total:
        now = loop.time()
        due = start + sent / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while sent < total and start + sent / rate <= now:  # every arrival due by now
            result.arrivals += 1
            due = start + sent / rate
            sent += 1
            while idle and now - idle[0][1] > _KEEP_ALIVE_S:  # the server may be closing them
                idle.popleft()[0][1].close()
                open_count -= 1
            taken = take_idle(now)
            if taken is None and open_count < max_connections:
                open_count += 1
            elif taken is None:
                result.not_sent += 1
                continue
            task = asyncio.create_task(arrival(taken, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
    deadline = start + duration_s + 10  # answers still coming after the last arrival: bounded
    while pending and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for task in list(pending):
        task.cancel()
    for (_, writer), _since in idle:
        writer.close()
    result.duration_s = duration_s
    return result


def _process(host: str, port: int, request: bytes, rate: float, duration_s: float, connections: int
             ) -> OpenLoopResult:  # fmt: skip
    return asyncio.run(_run(host, port, request, rate, duration_s, connections))


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
        total.merge(_process(*share))
    else:
        with ProcessPoolExecutor(processes) as pool:
            for part in [pool.submit(_process, *share) for _ in range(processes)]:
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
