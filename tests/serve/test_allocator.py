"""serve/allocator.py: which malloc the server's processes get, and the real server preloading it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serve import allocator
from tests.serve.conftest import REPO, tmp_cwd
from tests.serve.test_workers import _workers

JEMALLOC = allocator.find_jemalloc()


def test_system_preloads_nothing() -> None:
    library, line = allocator.resolve("system")
    assert library is None and "system" in line


def test_auto_without_jemalloc_falls_back_and_says_how_to_install(tmp_path: Path) -> None:
    library, line = allocator.resolve("auto", dirs=(str(tmp_path),))
    assert library is None
    assert "libjemalloc2" in line


def test_auto_and_jemalloc_find_the_library(tmp_path: Path) -> None:
    (tmp_path / allocator.JEMALLOC_NAME).write_bytes(b"\x7fELF")
    for choice in ("auto", "jemalloc"):
        library, line = allocator.resolve(choice, dirs=("/nonexistent", str(tmp_path)))
        assert library == tmp_path / allocator.JEMALLOC_NAME
        assert str(library) in line


def test_jemalloc_required_but_missing_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(allocator.AllocatorError, match=r"apt-get install libjemalloc2.*ALLOCATOR=system"):
        allocator.resolve("jemalloc", dirs=(str(tmp_path),))


def test_a_path_must_be_a_shared_library(tmp_path: Path) -> None:
    with pytest.raises(allocator.AllocatorError, match="no such file"):
        allocator.resolve(str(tmp_path / "missing.so"))
    text = tmp_path / "notes.txt"
    text.write_text("not a library")
    with pytest.raises(allocator.AllocatorError, match="not a shared library"):
        allocator.resolve(str(text))
    library, _ = allocator.resolve(sys.executable)  # an ELF file
    assert library == Path(sys.executable)


def test_preload_env_puts_the_library_first_and_keeps_the_rest_once() -> None:
    library = Path("/lib/libjemalloc.so.2")
    before = {"LD_PRELOAD": "/lib/a.so:/lib/libjemalloc.so.2 /lib/b.so", "X": "1"}
    env = allocator.preload_env(before, library)
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /lib/a.so /lib/b.so"
    assert env["X"] == "1" and env[allocator.REEXEC_MARK] == "1"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF


def test_a_users_malloc_conf_is_kept_and_other_libraries_get_none() -> None:
    jemalloc = allocator.preload_env({"MALLOC_CONF": "narenas:2"}, Path("/lib/libjemalloc.so.2"))
    assert jemalloc["MALLOC_CONF"] == "narenas:2"
    assert "MALLOC_CONF" not in allocator.preload_env({}, Path("/lib/libtcmalloc_minimal.so.4"))


def test_loaded_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r--p 00000000 fe:01 12 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.loaded(Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"), maps)
    assert not allocator.loaded(Path("/usr/lib/libtcmalloc.so.4"), maps)
    assert not allocator.loaded(Path("/x.so"), tmp_path / "absent")


def test_a_bad_allocator_setting_stops_the_server_with_a_message(run_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROBERT_", "PROMETHEUS_"))}
    env.update(PYTHONPATH=str(REPO), MICROBERT_ALLOCATOR=str(tmp_path / "libnothing.so"))
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--model-dir", str(run_dir)],
        cwd=tmp_cwd(tmp_path / "serve.log"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MICROBERT_ALLOCATOR=" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(JEMALLOC is None, reason=f"no {allocator.JEMALLOC_NAME} ({allocator.INSTALL_HINT})")
def test_the_server_and_its_workers_run_on_jemalloc(start_server: Any, run_dir: Path) -> None:
    """microbert-serve re-executes itself with jemalloc preloaded (same PID); its workers inherit it."""
    server = start_server(run_dir, workers=2)
    workers = _workers(server.process.pid)
    assert len(workers) == 2, workers
    assert all(_maps_jemalloc(pid) for pid in [server.process.pid, *workers])
    assert (
        f"allocator: jemalloc ({JEMALLOC}, MALLOC_CONF={allocator.JEMALLOC_CONF})"
        in server.log_path.read_text()
    )
    environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    assert f"MALLOC_CONF={allocator.JEMALLOC_CONF}".encode() in environ
    assert server.stop() == 0
