"""The run-folder lock on its own: a second holder is refused by name; the lock goes with its holder."""

from __future__ import annotations

import os
import socket

import pytest

from train.run_lock import RunFolderBusy, RunLock


def test_second_holder_is_refused_naming_the_first_then_takes_it_once_released(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderBusy, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
        second.acquire()
    first.release()
    second.acquire()  # released by closing: as when the holder dies, kill -9 included
    second.release()
