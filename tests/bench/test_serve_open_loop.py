"""bench/serve_open_loop.py: arrivals at the asked rate whatever the server answers, 429s rested on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from bench.serve_open_loop import OpenLoopResult, run_open_loop


class SlowServer:
    """A loopback HTTP/1.1 server that answers each request after `delay_s`: every third with 429
    and Retry-After-Ms (`retry_ms`), the rest with 200. It counts the requests and the connections
    it sees, and closes a connection idle for `keep_alive_s` after its last answer (as uvicorn does)."""

    def __init__(self, delay_s: float, retry_ms: int = 300, keep_alive_s: float = 5.0):
        self.delay_s, self.requests, self.connections = delay_s, 0, 0
        self.peers: set[str] = set()  # the clients' addresses
        self.retry_ms, self.keep_alive_s = retry_ms, keep_alive_s
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peers.add(writer.get_extra_info("peername")[0])
        try:
            while True:
                length = 0
                try:
                    line = await asyncio.wait_for(reader.readline(), self.keep_alive_s)
                except TimeoutError:
                    writer.close()
                    return
                while line not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    line = await reader.readline()
                if not line:
                    return
                await reader.readexactly(length)
                self.requests += 1
                # Decided on arrival, not after the sleep, when other requests have moved the count:
                # exactly every third request is refused however the answers interleave.
                refuse = self.requests % 3 == 0
                await asyncio.sleep(self.delay_s)
                if refuse:
                    head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                    head += f"Retry-After-Ms: {self.retry_ms}\r\nX-Error-Type: overloaded\r\n".encode()
                else:
                    head = b"HTTP/1.1 200 OK\r\n"
                writer.write(head + b"Content-Length: 2\r\n\r\n{}")
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(10)


@pytest.fixture
def slow_server() -> Iterator[SlowServer]:
    server = SlowServer(delay_s=0.2)
    yield server
    server.stop()


def test_arrivals_keep_their_rate_while_the_server_takes_its_time(slow_server: SlowServer) -> None:
    """200 arrivals a second for 2 s against answers that take 0.2 s: all 400 are sent (a closed-loop
    client with few connections would send fewer), on about rate × delay connections plus those
    resting after a 429, and the 200s' latency counts the server's 0.2 s."""
    result = run_open_loop("127.0.0.1", slow_server.port, rate=200, duration_s=2, max_connections=512)
    summary = result.summary()
    assert summary["arrivals"] == 400 and summary["not_sent"] == 0
    assert slow_server.requests == 400
    assert summary["statuses"]["200"] + summary["statuses"]["429"] == 400
    assert summary["statuses"]["429"] == 400 // 3  # every third
    assert 40 <= summary["connections_opened"] <= 150, summary
    assert 190 <= summary["latency_ok_ms"]["p50"] < 400
    # the 200s on connections already open: some, not all (each connection's first answer is left out)
    on_open = summary["latency_ok_open_ms"]
    assert 0 < on_open["count"] < summary["statuses"]["200"] and 190 <= on_open["p50"] < 400, on_open
    # what the 429s told: their kind (x-error-type) and their waits, which the rests followed
    assert summary["refusals"] == {"overloaded": 400 // 3}
    assert summary["retry_after_ms"] == {"p10": 300.0, "p50": 300.0, "p90": 300.0, "max": 300.0}


def test_arrivals_beyond_the_connection_limit_are_counted_not_sent(slow_server: SlowServer) -> None:
    result = run_open_loop("127.0.0.1", slow_server.port, rate=200, duration_s=1, max_connections=10)
    assert result.arrivals == 200 and result.not_sent > 100
    assert sum(result.statuses.values()) == 200 - result.not_sent


def test_a_connection_resting_after_a_429_is_not_reused_once_the_server_may_have_closed_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's keep-alive timer runs from its answer, through the client's Retry-After rest: a
    connection that rested 0.3 s on a server that closes idle connections after 0.3 s must not carry
    the next arrival (a client that wrote into closed connections reported spurious
    `error:ConnectionError`s in the overload records of 2 cores)."""
    monkeypatch.setattr("bench.serve_open_loop._KEEP_ALIVE_S", 0.25)
    server = SlowServer(delay_s=0.05, retry_ms=300, keep_alive_s=0.3)
    try:
        result = run_open_loop("127.0.0.1", server.port, rate=5, duration_s=4, max_connections=64)
    finally:
        server.stop()
    summary = result.summary()
    assert set(summary["statuses"]) == {"200", "429"}, summary
    assert summary["arrivals"] == 20 and summary["not_sent"] == 0
    assert summary["send_lag_ms"]["p99"] is not None and summary["send_lag_ms"]["p99"] < 100


def test_an_arrival_unanswered_at_the_end_is_counted_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.serve_open_loop._GRACE_S", 0.3)
    server = SlowServer(delay_s=3)
    try:
        summary = run_open_loop("127.0.0.1", server.port, rate=5, duration_s=1, max_connections=64).summary()
    finally:
        server.stop()
    assert summary["arrivals"] == 5 and summary["statuses"] == {"error:unanswered_at_end": 5}, summary


def test_each_process_connects_from_an_address_of_its_own(slow_server: SlowServer) -> None:
    """One pair of loopback addresses has ~28,000 ephemeral ports; a process an address lifts that."""
    result = run_open_loop("127.0.0.1", slow_server.port, rate=40, duration_s=1, processes=2)
    assert result.arrivals == 40 and result.not_sent == 0
    assert slow_server.peers == {"127.0.0.1", "127.0.0.2"}


def test_only_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_open_loop("192.0.2.1", 80, rate=1, duration_s=1)


def test_slow_answers_are_counted_beside_the_quantiles() -> None:
    result = OpenLoopResult(rate=100.0, duration_s=1.0)
    result.latencies_ok_s = [0.02] * 97 + [1.0, 2.5, 51.0]  # 1.0 s exactly is not over 1 s
    latency = result.summary()["latency_ok_ms"]
    assert latency == {"p50": 20.0, "p99": 51_000.0, "max": 51_000.0, "over_1s": 2, "over_10s": 1}


def test_the_answers_on_open_connections_are_summarised_apart_and_merged() -> None:
    """A flood's first seconds (connects in SYN retries) set the whole p99; the 200s sent on
    connections already open say what the server's queue did."""
    first = OpenLoopResult(rate=100.0, duration_s=1.0)
    first.latencies_ok_s = [0.02] * 98 + [3.0, 3.1]  # the two slow ones waited for their connects
    first.latencies_ok_open_s = [0.02] * 98
    second = OpenLoopResult(rate=100.0, duration_s=1.0)
    second.latencies_ok_open_s = [0.05, 0.06]
    first.merge(second)
    summary = first.summary()
    assert summary["latency_ok_ms"]["p99"] == 3_100.0
    assert summary["latency_ok_open_ms"] == {"count": 100, "p50": 20.0, "p99": 60.0, "max": 60.0}


def test_slow_answers_are_described_one_by_one() -> None:
    """Answers of 1.2 s to 20 arrivals in the first second: every 200 is slow, each on the new
    connection it opened (none is free again before the last arrival), due within the first second."""
    server = SlowServer(delay_s=1.2)
    try:
        summary = run_open_loop("127.0.0.1", server.port, rate=20, duration_s=1, max_connections=64).summary()
    finally:
        server.stop()
    slow = summary["slow_ok"]
    assert summary["statuses"]["200"] == slow["count"] == 14  # 20 arrivals, every third refused
    assert slow["on_new_connections"] == 14 and summary["connections_opened"] == 20
    assert 0 <= slow["first_due_s"] <= slow["last_due_s"] < 1.0
    assert len(slow["slowest"]) == 12 and all(1200 <= row[1] < 3000 and row[2] for row in slow["slowest"])
    assert summary["connect_ms"]["max"] is not None and summary["connect_ms"]["max"] < 1000
    # every 200 was its connection's first: none counts among the answers on open connections
    assert summary["latency_ok_open_ms"] == {"count": 0, "p50": None, "p99": None, "max": None}


def test_keep_alive_is_reckoned_from_when_the_request_left_not_from_a_late_read() -> None:
    """A client behind on its loop reads an answer long after the server sent it; the server's
    keep-alive runs from its send. Of two idle connections answered 0.1 s ago by the client's clock,
    the one whose request left half a second short of the server's keep-alive ago (the server may
    have closed it) is retired, the other (1 s ago) is reused."""
    from bench.serve_open_loop import _Client, _Connection
    from serve.settings import Settings

    keep_alive_s = Settings.model_fields["keep_alive_s"].default

    class Transport:
        closed = False

        def close(self) -> None:
            self.closed = True

    async def run() -> None:
        client = _Client("127.0.0.1", 9, b"", rate=1.0, duration_s=1.0, max_connections=4)
        now = time.perf_counter()
        stale, fresh = _Connection(client), _Connection(client)
        for connection, left_s_ago in ((stale, keep_alive_s - 0.5), (fresh, 1.0)):
            connection.transport = Transport()  # type: ignore[assignment]
            connection.sent = now - left_s_ago
            client.open_count += 1
        client.idle.extend([fresh, stale])  # the stale one freed last: the first one tried
        assert client._take_idle(now) is fresh
        assert stale.closed and stale.transport.closed  # type: ignore[union-attr]
        assert client.open_count == 1

    asyncio.run(run())
