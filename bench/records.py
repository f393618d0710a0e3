"""Benchmark records: appended as JSON lists to `bench/results/<date>-<device>.json` (and `$OUT`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit the figures came from, "-dirty" when the tree differs from it.

    `MICROBERT_COMMIT` overrides it: a copy of the tree on a benchmark machine may carry a stale
    `.git` ("unknown" outside a git checkout).
    """
    if os.environ.get("MICROBERT_COMMIT"):
        return os.environ["MICROBERT_COMMIT"]
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, cwd=REPO
    )
    return out.stdout.strip() or "unknown"


def cpu_model() -> str:
    """The host's processor, as the kernel names it: a figure of the HTTP workers (Python on the
    CPU) depends on it as much as on the count of cores (bench/NOTES.md, session 17: two 16-core
    GPU hosts sustained 8,700 and 12,600 requests/s on 8 of their cores)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def append_records(records: list[dict], device: str) -> None:
    if not records:
        return
    name = f"{dt.date.today().isoformat()}-{device.replace(' ', '_')}.json"
    paths = [REPO / "bench" / "results" / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(existing + records, indent=1) + "\n")
