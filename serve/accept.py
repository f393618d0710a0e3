"""An event loop that accepts every connection waiting on a worker's own listening socket at once.

libuv, the core of uvloop, accepts one connection each time a listening socket is reported
readable (libuv pull request 3696, 2022: most wakes find one connection waiting, and processes
sharing one socket then take turns). A worker accepts about one connection per turn of its event
loop, and under a flood a turn is long: on a 16-core GPU host (8 HTTP workers, each on its own
SO_REUSEPORT socket, 16,384 client connections opened within 0.4 s) each worker accepted about 57
connections a second. The rest waited in the kernel's accept queue, connected as far as the client
could tell, their first request unread for up to 33 s: the slowest answers of the overload run
(bench/NOTES.md, session 15).

asyncio's own loop accepts up to its backlog at each wake. `new_event_loop` gives uvloop's loop with
the same for a listening socket handed to `create_server` (how uvicorn's workers get theirs): the
socket is watched with `add_reader` and drained, at most `ACCEPT_BATCH` connections a wake so that
one wake cannot hold up the requests of the connections already open, each handed to uvloop with
`connect_accepted_socket`. Everything else is uvloop's. Used where each worker has a socket of its
own (serve.workers): where workers share one socket, taking turns is what spreads a burst over them.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("microbert.serve")

# Connections accepted at one wake, at most: a few milliseconds of the loop (each is a socket and a
# task), against a turn of tens of milliseconds under a flood.
ACCEPT_BATCH = 256
# Out of file descriptors or memory: accepting again at once would spin; the kernel keeps the
# connections queued meanwhile (asyncio's loop waits a second; the HTTP workers' answers take ms).
_PAUSE_S = 0.1
_LOG_EVERY_S = 10.0  # a lasting shortage is said once in this long, not at every pause
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class GreedyServer(asyncio.AbstractServer):
    """A listening socket drained at each wake; the connections are uvloop's from then on."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        backlog: int,
    ):
        self._loop, self._sock, self._protocol_factory = loop, sock, protocol_factory
        self._handing: set[asyncio.Task[Any]] = set()  # connections being handed to the loop
        self._serving = self._closed = False
        self._said_at = -_LOG_EVERY_S  # when a shortage was last logged (loop time)
        sock.setblocking(False)
        sock.listen(backlog)
        self._watch()

    def _watch(self) -> None:
        if not self._closed and not self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._serving = True

    def _unwatch(self) -> None:
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left
            except ConnectionAbortedError:
                continue  # reset by the client while it waited: the next one
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                if self._loop.time() - self._said_at >= _LOG_EVERY_S:
                    self._said_at = self._loop.time()
                    log.error("cannot accept connections (%s): pausing %.1f s", exc.strerror, _PAUSE_S)
                self._unwatch()
                self._loop.call_later(_PAUSE_S, self._watch)
                return
            connection.setblocking(False)
            if connection.family in (socket.AF_INET, socket.AF_INET6):  # not on a Unix socket
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._protocol_factory, connection)
            )
            self._handing.add(task)
            task.add_done_callback(functools.partial(self._handed, connection))

    def _handed(self, connection: socket.socket, task: asyncio.Task[Any]) -> None:
        self._handing.discard(task)
        if task.cancelled() or task.exception() is not None:
            connection.close()  # the loop did not take it: nobody else will close it

    # asyncio.AbstractServer
    def close(self) -> None:
        self._unwatch()
        self._closed = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    async def start_serving(self) -> None:
        self._watch()

    async def serve_forever(self) -> None:
        self._watch()
        await self._loop.create_future()  # until cancelled

    async def wait_closed(self) -> None:
        if self._handing:
            await asyncio.gather(*self._handing, return_exceptions=True)


try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None  # type: ignore[assignment]

if uvloop is not None:

    class GreedyAcceptLoop(uvloop.Loop):
        """uvloop's loop, but a socket handed to `create_server` is accepted from by a `GreedyServer`."""

        async def create_server(  # type: ignore[override]
            self,
            protocol_factory: Callable[[], asyncio.BaseProtocol],
            host: Any = None,
            port: Any = None,
            *,
            sock: socket.socket | None = None,
            backlog: int = 100,
            ssl: Any = None,
            **kwargs: Any,
        ) -> asyncio.AbstractServer:
            if sock is None or ssl is not None or kwargs.get("start_serving") is False:
                return await super().create_server(
                    protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
                )
            return GreedyServer(self, sock, protocol_factory, backlog)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A `GreedyAcceptLoop`; asyncio's own loop, which accepts greedily already, without uvloop.
    uvicorn's `loop` setting takes this as `LOOP` (a loop factory named by an import string)."""
    if uvloop is None:  # pragma: no cover
        return asyncio.new_event_loop()
    return GreedyAcceptLoop()


LOOP = f"{__name__}:new_event_loop"
