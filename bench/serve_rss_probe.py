"""Where the server's memory goes under a burst: RSS idle, with many idle connections, and after each
of several bursts of one request per connection.

    python bench/serve_rss_probe.py --model-dir runs/cpu [--workers 2] [--connections 1024] [--bursts 4]

The overload benchmark (`bench/serve_wrk.py --overload`) sees RSS step up in its first seconds and
then stay flat. This separates the candidates: connection state (the idle-connections row), the
first full queue (the first burst) and a leak (growth from burst to burst). Prints one JSON object of
MiB for the server's process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_wrk import rss_mib, wait_ready

BODY = json.dumps({"inputs": "The [MASK] of the king was great."}).encode()
REQUEST = (
    b"POST /fill-mask HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)


def _connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def _burst(sockets: list[socket.socket], settle_s: float) -> None:
    """One request on every connection at once, then read what came back and close."""
    for s in sockets:
        with contextlib.suppress(OSError):  # the server may close a connection it refused
            s.sendall(REQUEST)
    time.sleep(settle_s)
    for s in sockets:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.recv(65536)
        s.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", default="2")
    parser.add_argument("--connections", type=int, default=1024)
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds for a burst to be answered")
    args = parser.parse_args()
    env = {**os.environ, "MICROBERT_PORT": str(args.port)}
    command = ["microbert-serve", "--model-dir", args.model_dir, "--workers", args.workers]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{args.port}", server)
        time.sleep(2)
        out = {"idle": rss_mib(server.pid)}
        sockets = _connect(args.port, args.connections)
        time.sleep(3)
        out[f"{args.connections}_idle_connections"] = rss_mib(server.pid)
        for burst in range(1, args.bursts + 1):
            _burst(sockets, args.settle)
            out[f"after_burst_{burst}"] = rss_mib(server.pid)
            sockets = _connect(args.port, args.connections)
        for s in sockets:
            s.close()
        time.sleep(3)
        out["connections_closed"] = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
