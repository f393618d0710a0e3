"""serve/accept.py: a busy worker's loop takes a burst of waiting connections at once, not one a turn."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serve.accept import GreedyServer, new_event_loop

uvloop = pytest.importorskip("uvloop")

BURST = 300
TURN_S = 0.02  # how long each turn of the loop is kept busy: a worker under a flood


class _Counting(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).made += 1

    def data_received(self, data: bytes) -> None:
        pass


def _accepted_while_busy(make_loop: Callable[[], asyncio.AbstractEventLoop], seconds: float) -> int:
    """Connections accepted within `seconds` by `make_loop`'s server while every turn of its loop
    takes TURN_S, after BURST clients connected at once (the kernel completes their handshakes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    clients: list[socket.socket] = []
    loop = make_loop()

    class Protocol(_Counting):
        made = 0

    async def run() -> int:
        server = await loop.create_server(Protocol, sock=listener, backlog=1024)

        def busy() -> None:  # a handler's CPU at every turn
            time.sleep(TURN_S)
            if not stop.is_set():
                loop.call_soon(busy)

        stop = threading.Event()
        loop.call_soon(busy)
        connecting = threading.Thread(target=lambda: clients.extend(
            socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)
        ))  # fmt: skip
        connecting.start()
        await asyncio.sleep(seconds)
        stop.set()
        made = Protocol.made
        server.close()
        await server.wait_closed()
        connecting.join(10)
        return made

    try:
        return loop.run_until_complete(run())
    finally:
        for client in clients:
            client.close()
        listener.close()
        loop.close()


def test_a_busy_loop_takes_a_burst_of_connections_at_once() -> None:
    """Within half a second (~25 busy turns) every one of 300 connections is taken; uvloop's own
    loop takes about one a turn (the behaviour serve/accept.py exists for)."""
    assert _accepted_while_busy(new_event_loop, 0.5) == BURST
    stock = _accepted_while_busy(uvloop.new_event_loop, 0.5)
    assert stock < BURST / 3, (
        f"uvloop took {stock} of {BURST}: it accepts greedily now, serve/accept.py can go"
    )


class _Upper(asyncio.Protocol):
    """Answers each chunk with it in capitals."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_the_greedy_loop_serves_a_socket_handed_to_it_and_stops_on_close(family: str, tmp_path: Path) -> None:
    """A connection taken by the greedy server carries traffic both ways (uvloop owns it); after
    close() the socket is no longer watched. A Unix socket (`uvicorn --uds`) too: no TCP option is
    set on its connections."""
    path = str(tmp_path / "serve.sock")
    listener = socket.socket(socket.AF_UNIX) if family == "unix" else socket.socket()
    listener.bind(path if family == "unix" else ("127.0.0.1", 0))
    loop = new_event_loop()

    async def run() -> tuple[bytes, bool]:
        server = await loop.create_server(_Upper, sock=listener, backlog=16)
        assert isinstance(server, GreedyServer) and server.is_serving()
        if family == "unix":
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        writer.write(b"fill-mask")
        answer = await asyncio.wait_for(reader.readexactly(9), 5)
        writer.close()
        server.close()
        await server.wait_closed()
        return answer, server.is_serving()

    try:
        answer, serving = loop.run_until_complete(run())
    finally:
        listener.close()
        loop.close()
    assert answer == b"FILL-MASK"
    assert not serving


def test_without_a_socket_the_loop_is_uvloops_own() -> None:
    """host/port servers (uvicorn's single-process path) are left to uvloop."""
    loop = new_event_loop()

    async def run() -> bool:
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        own = not isinstance(server, GreedyServer)
        server.close()
        await server.wait_closed()
        return own

    try:
        assert loop.run_until_complete(run())
    finally:
        loop.close()


class _RunsOutOfDescriptors:
    """A listening socket whose first `times` accept() calls fail as when the process has no
    descriptor left."""

    def __init__(self, sock: socket.socket, times: int):
        self.sock, self.failed, self.times = sock, 0, times

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)

    def accept(self) -> tuple[socket.socket, object]:
        if self.failed < self.times:
            self.failed += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


def test_out_of_descriptors_pauses_accepting_then_takes_the_waiting_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three EMFILEs in a row: said once, accepting resumes after each pause (the kernel keeps the
    connection queued meanwhile): no spin on the error, no log line per pause, no connection lost."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    flaky = _RunsOutOfDescriptors(listener, times=3)
    loop = new_event_loop()

    class Protocol(_Counting):
        made = 0

    async def run() -> tuple[int, float]:
        server = GreedyServer(loop, flaky, Protocol, backlog=16)  # type: ignore[arg-type]
        started = time.monotonic()
        client = socket.create_connection(("127.0.0.1", port))
        while Protocol.made == 0 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        taken_after = time.monotonic() - started
        client.close()
        server.close()
        await server.wait_closed()
        return Protocol.made, taken_after

    with caplog.at_level("ERROR", logger="microbert.serve"):
        try:
            made, taken_after = loop.run_until_complete(run())
        finally:
            listener.close()
            loop.close()
    assert flaky.failed == 3 and made == 1
    assert 0.25 <= taken_after < 3  # after three pauses, not at once and not never
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections (Too many open files): pausing 0.1 s"
    ]
