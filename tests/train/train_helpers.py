"""Helpers for the trainer tests: tiny settings and a way to run the trainer as users do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Small enough that a step takes milliseconds, large enough that the loss moves.
TINY = [
    "--profile", "cpu",
    "--vocab-size", "500",
    "--seq-len", "32",
    "--batch-size", "8",
    "--max-samples", "300",
    "--eval-batches", "2",
    "--log-every", "1",
]  # fmt: skip


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "train", *args]


def run_train(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_cmd(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def history(run_dir: Path) -> dict:
    return json.loads((run_dir / "training_history.json").read_text())
