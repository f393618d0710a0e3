"""Start `deepspeed --num_gpus N` for a multi-GPU profile, and make sure no rank outlives us.

The DeepSpeed runner does not forward signals on a single node, so the launcher runs it in a new
process group and sends SIGINT/SIGTERM to the whole group: every rank gets the signal directly,
checkpoints the current step and exits 0. Anything still alive after a grace period is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

GRACE_S = 120.0  # time the ranks get to finish a checkpoint after a stop signal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(num_gpus: int, argv: Sequence[str], master_port: int | None = None) -> list[str]:
    """The command that starts one rank per GPU, each running `python -m train.main ARGV --local_rank=R`."""
    port = master_port or free_port()
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(port),
        "--module",
        "train.main",
        *argv,
    ]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(num_gpus: int, argv: Sequence[str], run_dir: str) -> int:
    """Run the ranks to completion; returns 0 for a finished or cleanly stopped run."""
    command = launch_command(num_gpus, argv)
    print(f"launching {num_gpus} ranks: {' '.join(command)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command, start_new_session=True)
    pgid = child.pid
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
        deadline = time.monotonic() + (GRACE_S if forwarded else 5.0)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            print("launcher: ranks still alive after the runner exited; killing them", file=sys.stderr)
            os.killpg(pgid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded:
        status = Path(run_dir) / "status.json"
        try:
            state = json.loads(status.read_text()).get("state")
        except (OSError, ValueError):
            state = None
        if state in ("stopped", "finished"):
            return 0
    return code if code >= 0 else 128 - code
