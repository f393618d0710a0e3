"""One trainer per run folder: an OS lock on `<run>/.train.lock`, held by global rank 0.

Two trainers on one folder would interleave one log, resume from each other's half-written
checkpoints and race on `export/latest`. The lock is `flock` on a file in the run folder: the kernel
drops it when the process dies however it dies (`kill -9` included), so there is never a stale lock
to clear by hand, and on a shared file system (NFS) it is seen from every node. The file holds the
holder's PID, host and start time, so the second trainer can say whom it ran into. Only global rank
0 takes it: the other ranks of the same run, on this node or another, are not second trainers.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from microbert.errors import MicroBertError

LOCK_FILE = ".train.lock"


class RunFolderBusy(MicroBertError):
    """Another trainer holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `RunFolderBusy` naming the holder; returns at once either way."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent} is in use by another trainer ({_describe(holder)}): wait for it to "
                "finish or stop it, or give this run another --run-dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "it is just starting"
    return f"PID {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
