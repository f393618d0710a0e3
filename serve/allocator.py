"""Which malloc the server's processes use (`MICROBERT_ALLOCATOR`), and preloading it.

Why: under a sustained overload on a CPU (bench/NOTES.md, session 11), the processes that run the
model grew by ~5 MiB/s with glibc's malloc while their live allocations stayed flat: `mallinfo2`
showed ~130 MiB in use and the free bytes kept inside the heap rising from ~80 to ~250 MiB in 60 s.
torch's CPU tensors change size with every batch's shape, and glibc keeps the holes they leave.
Preloaded jemalloc returns them (RSS flat over the same run); so did a fixed 4 MiB mmap threshold,
but at a 23–32% cost in sentences per second, since every large tensor then faults in fresh pages.
jemalloc's own default did the same to tensors of 8 MiB and more (its "oversize" arena gives them
back at once): 32-input requests lost ~13% (medians of 7 runs) until `JEMALLOC_CONF` turned that
arena off.

A library can only be preloaded into a process before it starts, so `microbert-serve` re-executes
itself once with `LD_PRELOAD` set; its HTTP workers and its model process inherit the variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Where Debian, Ubuntu (libjemalloc2) and Red Hat-like systems (jemalloc) install the library.
JEMALLOC_NAME = "libjemalloc.so.2"
JEMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
INSTALL_HINT = "apt-get install libjemalloc2 (Debian, Ubuntu) or dnf install jemalloc"
# jemalloc's settings where the user has set no MALLOC_CONF: no separate arena for allocations of
# 8 MiB and more, which jemalloc otherwise returns to the kernel as soon as they are freed (a batch's
# activations, freed and allocated again every forward pass on a CPU).
JEMALLOC_CONF = "oversize_threshold:0"
# Set in the re-executed process, so a library that the loader refused is not retried forever.
REEXEC_MARK = "MICROBERT_ALLOCATOR_PRELOADED"


class AllocatorError(ValueError):
    """`MICROBERT_ALLOCATOR` names a library that cannot be used; the message says what to do."""


def find_jemalloc(dirs: tuple[str, ...] = JEMALLOC_DIRS) -> Path | None:
    for folder in dirs:
        path = Path(folder) / JEMALLOC_NAME
        if path.is_file():
            return path
    return None


def resolve(choice: str, dirs: tuple[str, ...] = JEMALLOC_DIRS) -> tuple[Path | None, str]:
    """The library to preload for `choice` (None: the system's malloc) and a log line that says why.

    `auto`: jemalloc where it is installed (Linux only), else the system's malloc with a hint;
    `jemalloc`: jemalloc or an error; `system`: nothing preloaded; a path: that library.
    """
    if choice == "system":
        return None, "allocator: the system's malloc (MICROBERT_ALLOCATOR=system)"
    if choice in ("auto", "jemalloc"):
        found = find_jemalloc(dirs) if sys.platform.startswith("linux") else None
        if found is not None:
            conf = os.environ.get("MALLOC_CONF") or JEMALLOC_CONF
            return found, f"allocator: jemalloc ({found}, MALLOC_CONF={conf})"
        if choice == "jemalloc":
            raise AllocatorError(
                f"MICROBERT_ALLOCATOR=jemalloc but {JEMALLOC_NAME} is not installed: {INSTALL_HINT}, "
                "or set MICROBERT_ALLOCATOR=system"
            )
        return None, (
            f"allocator: the system's malloc ({JEMALLOC_NAME} not found; under sustained load the model's "
            f"processes may grow: {INSTALL_HINT})"
        )
    path = Path(choice)
    if not path.is_file():
        raise AllocatorError(
            f"MICROBERT_ALLOCATOR={choice}: no such file; give auto, jemalloc, system or the path of a "
            "malloc library (.so)"
        )
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            raise AllocatorError(f"MICROBERT_ALLOCATOR={choice} is not a shared library (no ELF header)")
    return path, f"allocator: {path}"


def loaded(library: Path, maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether `library` is mapped into this process (preloaded, or linked)."""
    try:
        text = maps.read_text()
    except OSError:
        return False
    return str(library.resolve()) in text or str(library) in text


def preload_env(env: dict[str, str], library: Path) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD, keeping whatever was preloaded already, and
    `JEMALLOC_CONF` for a jemalloc unless MALLOC_CONF is set."""
    rest = [item for item in env.get("LD_PRELOAD", "").replace(":", " ").split() if item != str(library)]
    env = {**env, "LD_PRELOAD": " ".join([str(library), *rest]), REEXEC_MARK: "1"}
    if "jemalloc" in library.name and not env.get("MALLOC_CONF"):
        env["MALLOC_CONF"] = JEMALLOC_CONF
    return env


def reexec_with(library: Path, module: str, args: list[str]) -> None:
    """Replace this process by `python -m module args` with `library` preloaded (same PID)."""
    env = preload_env(dict(os.environ), library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)
