"""Trainer test fixtures: a shared data cache and one compiled DeepSpeed op directory.

DeepSpeed's CPU accelerator compiles a small C++ op on first use (30–50 s); every test process
points TORCH_EXTENSIONS_DIR at the same stable folder so that happens once per machine, not per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
        MICROBERT_CACHE_DIR=str(tmp_path_factory.mktemp("data-cache")),
        MICROBERT_NO_BAR="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env
