"""HTTP workers on sockets of their own (serve/workers.py, MICROBERT_REUSE_PORT; "auto": wherever the
kernel balances them): the kernel spreads connections over them; the log says how to keep a restart
from resetting the connections queued at a worker; and an address already taken is refused with a
message, not a traceback, with or without them."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from serve.workers import BALANCED, WorkerSocket, migrate_hint, reserve, wants_reuse_port
from tests.serve.conftest import REPO, free_port, tmp_cwd
from tests.serve.test_api import TEXT

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not BALANCED, reason="SO_REUSEPORT balances connections on Linux only"),
]


def _accept_all(listener: socket.socket) -> list[socket.socket]:
    accepted = []
    while True:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            return accepted


def test_each_unpickled_worker_socket_is_a_listener_of_its_own_on_one_port() -> None:
    # What uvicorn's supervisor does with the list it hands a worker: pickle it into the new process.
    reserved = reserve("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    placeholder = WorkerSocket("127.0.0.1", port)
    listeners = [pickle.loads(pickle.dumps(placeholder)) for _ in range(2)]
    try:
        for listener in listeners:
            assert listener.getsockname() == ("127.0.0.1", port)
            listener.listen(256)
            listener.setblocking(False)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(128)]
        shares = [len(_accept_all(listener)) for listener in listeners]
        # Spread by a hash of each connection's addresses: about half each, whoever accepts first.
        assert sum(shares) == 128 and min(shares) >= 32, shares
        for client in clients:
            client.close()
    finally:
        for listener in listeners:
            listener.close()
        reserved.close()


def test_the_log_says_how_a_restart_keeps_the_queued_connections_where_the_kernel_would_reset_them(
    tmp_path: Path,
) -> None:
    setting = tmp_path / "tcp_migrate_req"
    setting.write_text("0\n")
    hint = migrate_hint(setting)
    assert hint is not None and "net.ipv4.tcp_migrate_req=1" in hint and "MICROBERT_REUSE_PORT=false" in hint
    setting.write_text("1\n")
    assert migrate_hint(setting) is None
    assert migrate_hint(tmp_path / "absent") is None  # before Linux 5.14: no such setting, no advice


def test_auto_gives_the_workers_sockets_of_their_own() -> None:
    assert wants_reuse_port("auto") is True  # with or without a model process (session 20)
    assert wants_reuse_port(True) is True
    assert wants_reuse_port(False) is False


def test_the_reserved_address_takes_no_connections() -> None:
    reserved = reserve("127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionRefusedError):  # bound, not listening: not in the group
            socket.create_connection(reserved.getsockname(), timeout=2).close()
    finally:
        reserved.close()


def test_an_address_a_stopped_server_left_in_time_wait_can_be_reserved() -> None:
    """A server that closed its connections first leaves them in TIME_WAIT on its port for a minute;
    a restart must not be refused for them (uvicorn's own bind is not)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted = listener.accept()[0]
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    reserve("127.0.0.1", port).close()


def _serve(run_dir: Path, port: int, log: Path, reuse_port: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROBERT_", "PROMETHEUS_"))}
    env["MICROBERT_REUSE_PORT"] = str(reuse_port).lower()
    command = ["--model-dir", str(run_dir), "--port", str(port), "--workers", "2"]
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *command],
        cwd=tmp_cwd(log),
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("holder", "reuse_port"), [("plain", True), ("reuseport", True), ("plain", False)])
def test_a_taken_port_is_refused_with_a_message(
    run_dir: Path, tmp_path: Path, holder: str, reuse_port: bool
) -> None:
    if holder == "plain":
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
    else:  # what another microbert-serve's workers hold
        taken = pickle.loads(pickle.dumps(WorkerSocket("127.0.0.1", free_port())))
    taken.listen()
    try:
        result = _serve(run_dir, taken.getsockname()[1], tmp_path / "serve.log", reuse_port)
    finally:
        taken.close()
    assert result.returncode != 0
    assert "cannot listen on 127.0.0.1:" in result.stderr
    assert "choose another --port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _sockets(pid: int) -> set[str]:
    """The inodes of a process's sockets."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _listening(port: int) -> set[str]:
    """The inodes of the sockets listening on 127.0.0.1:port (state 0A in /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {row[9] for row in rows if row[1] == local and row[3] == "0A"}


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]  # fmt: skip


def test_a_burst_of_connections_is_spread_over_the_workers(start_server: Any, run_dir: Path) -> None:
    """Two listening sockets, one in each worker, and a burst of connections answered by both.
    (uvicorn's one shared socket gave 890 of wrk's 1,024 connections to one of two busy workers.)"""
    # "auto" with a model process (the GPU layout, run on a CPU): a socket each
    server = start_server(run_dir, workers=2, env={"MICROBERT_MODEL_PROCESS": "on"})
    workers = _workers(server.process.pid)
    assert len(workers) == 2, workers
    # /ready answers once one worker serves; the other may still be loading its model.
    deadline = time.monotonic() + 60
    while server.log_path.read_text().count("Application startup complete") < 2:
        assert time.monotonic() < deadline, "the second worker never listened"
        time.sleep(0.1)
    assert "each accepting on its own socket (SO_REUSEPORT), all the connections waiting" in (
        server.log_path.read_text()
    )
    # Each worker listens on a socket of its own (uvicorn's workers would share one).
    listening = _listening(server.port)
    assert len(listening) == 2 and all(len(_sockets(pid) & listening) == 1 for pid in workers)
    before = [len(_sockets(pid)) for pid in workers]
    body = json.dumps({"inputs": TEXT}).encode()
    request = (
        f"POST /fill-mask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(128)]
    try:
        for client in clients:
            client.sendall(request)
        for client in clients:  # every connection answered, so every one was accepted
            assert client.recv(64).startswith(b"HTTP/1.1 200")
        shares = [len(_sockets(pid)) - b for pid, b in zip(workers, before, strict=True)]
    finally:
        for client in clients:
            client.close()
    assert sum(shares) == 128 and min(shares) >= 32, shares
    assert server.stop() == 0
