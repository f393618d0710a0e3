"""Several HTTP workers on one port, each accepting on a listening socket of its own (SO_REUSEPORT).

uvicorn's `--workers N` binds one socket in the parent and every worker accepts from it, one
connection each time its event loop wakes on it (libuv's rule, serve.accept): the workers whose loops
turn fastest take most of a burst of new connections, and keep them for as long as the clients keep
their connections alive. Measured on 2 cores under `wrk -c1024`: one worker held
890 connections and the other 135 (bench/NOTES.md, session 10, with a model process); on a 16-core
GPU host with 8 workers, session 9 saw one worker grow by 0.9 GB in a run whose slowest answers
took seconds, and a per-worker limit refuse 101,522 requests at 256 connections: signs of connections
piling on one worker, whose event loop then sets their latency while the other workers idle.

With SO_REUSEPORT each worker listens on its own socket bound to the same address, and the kernel
spreads new connections over the listening sockets by a hash of each connection's addresses, so
each worker gets about its share whatever its loop is doing. The supervision (restarting a worker
that dies, SIGHUP's rolling restart, SIGTERM) stays uvicorn's `Multiprocess`: the only change is
the socket each worker is given. The parent binds the address first without listening: that
checks it is free (a clear error rather than workers failing one after another) and holds it for
the workers, but a socket that does not listen takes no connections.

Each socket also has a listen queue of its own: N workers queue N × 2,048 connections the kernel has
completed and no worker has accepted yet, where one shared socket queues 2,048. On a 16-core GPU host
at 4× the sustainable rate (8 workers and a model process, 16,384 client connections) the shared
socket's queue overflowed 141,206 times (SYNs dropped, connects retried after 1, 3, 7 … s, 932
connections reset) and the workers' sockets none (BENCHMARKS.md, session 14). On 2 cores (2 workers,
each with its own model) the shared socket once answered more 200s under a flood (session 14: median
524 a second against 127), but that was before each worker drained its own socket at every wake
(below, session 15); since then own sockets answer as many or more there (one server core at 4× its
sustainable rate: 632 / 594 against 536 / 580 200s a second, session 20; 548 / 464 against 535 / 514,
session 19), and at a steady 64 connections they are ~10% faster, because the shared socket's split
of a burst of connections is luck: wrk's 64 landed anywhere from 40 / 34 to 66 / 8 on the two
workers, and the 66 / 8 runs were the slowest by a quarter (10 of 11 interleaved pairs ahead with
own sockets, sessions 19 and 20). So `reuse_port` "auto" gives workers their own sockets wherever
the kernel spreads connections over them (`wants_reuse_port`).

Each worker also accepts every connection waiting on its socket when it wakes (serve.accept), where
uvloop would take one a turn of the event loop: with a socket to itself, nobody else would take them.

The cost: a worker restarted by SIGHUP closes its socket, and connections still waiting in its queue
are reset, unless the kernel moves them to the other workers (`net.ipv4.tcp_migrate_req = 1`, Linux
5.14 and later; `migrate_hint` says so in the log). Where SO_REUSEPORT does not spread connections
(not Linux), or `reuse_port` is off, the workers share one socket, as uvicorn's do.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Any

from serve import accept

log = logging.getLogger("microbert.serve")

# Linux balances connections over the sockets of a SO_REUSEPORT group; BSD and macOS give them all
# to one socket, which would be worse than sharing one.
BALANCED = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT and SO_REUSEADDR, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """The address for the workers, held by a socket that does not listen (see the module's doc).

    SO_REUSEPORT would also let this server's workers join the sockets of *another* server of the
    same user on that port and silently share its traffic; a plain bind first refuses an address
    that anything listens on, as uvicorn's own bind does. (Two servers started on one port within
    the same second could still both pass it before either listens: a reservation that refused
    that would also refuse the connections of a stopped server still in TIME_WAIT.)"""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    return reuseport_socket(host, port)


class WorkerSocket:
    """Stands for a worker's listening socket in the list uvicorn's supervisor hands each worker.

    uvicorn pickles that list into every worker it spawns (at start, on a restart, on SIGHUP);
    unpickling this object in the worker binds a new SO_REUSEPORT socket there, so each worker gets
    a socket of its own without any change to the supervisor. uvicorn's server calls listen() on it.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return reuseport_socket, (self.host, self.port)


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def wants_reuse_port(setting: bool | str) -> bool:
    """Whether the HTTP workers get sockets of their own: as set, and for "auto" too (measured better
    with a model process under overload and without one at steady load and under overload, module
    docstring); `run_workers` still shares one socket where the kernel would not spread connections."""
    return True if setting == "auto" else bool(setting)


def migrate_hint(setting: Path = MIGRATE_REQ) -> str | None:
    """A line for the log where the kernel resets, rather than moves, the connections waiting in the
    queue of a worker's socket when that worker stops (a SIGHUP restart); None where it moves them
    or has no such setting (before Linux 5.14, or not Linux: nothing to be done there)."""
    try:
        value = setting.read_text().strip()
    except OSError:
        return None
    if value != "0":
        return None
    return (
        "a worker restarted by SIGHUP resets the connections waiting in its socket's queue; "
        "`sysctl -w net.ipv4.tcp_migrate_req=1` (root, or docker run --sysctl) moves them to the other "
        "workers, and MICROBERT_REUSE_PORT=false shares one socket instead"
    )


def run_workers(config: Any, workers: int, reuse_port: bool) -> int:
    """Serve `config` (an app import string) with `workers` uvicorn workers, each on a socket of its
    own where the system balances them and `reuse_port` asks for it, else on one shared socket;
    1, with a message, when the address is taken."""
    from uvicorn.supervisors import Multiprocess

    own_sockets = reuse_port and BALANCED
    try:
        reserved = reserve(config.host, config.port) if own_sockets else config.bind_socket()
    except (OSError, SystemExit) as exc:  # uvicorn's bind_socket logs its error and exits
        reason = exc.strerror if isinstance(exc, OSError) else "see the line above"
        log.error(
            "cannot listen on %s:%s (%s): stop what holds that address or choose another --port/--host",
            config.host, config.port, reason,
        )  # fmt: skip
        return 1
    if not own_sockets:
        Multiprocess(config, sockets=[reserved]).run()
        return 0
    port = reserved.getsockname()[1]  # the port the kernel chose, when 0 was asked for
    # A worker with a socket of its own drains its queue at each wake (serve.accept: uvloop takes one
    # connection a turn of the loop, and a burst would wait in the queue for tens of seconds).
    config.loop = accept.LOOP
    log.info(
        "%d HTTP workers on http://%s:%d, each accepting on its own socket (SO_REUSEPORT), all the "
        "connections waiting at each wake (press CTRL+C to quit)", workers, config.host, port,
    )  # fmt: skip
    hint = migrate_hint()
    if hint:
        log.info("%s", hint)
    try:
        Multiprocess(config, sockets=[WorkerSocket(config.host, port)]).run()  # type: ignore[list-item]
    finally:
        reserved.close()
    return 0
