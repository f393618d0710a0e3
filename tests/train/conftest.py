"""Trainer test fixtures: a shared data cache and one compiled DeepSpeed op directory.

DeepSpeed's CPU accelerator compiles a small C++ op on first use (30–50 s). Every test process
uses the same stable folder for it (TORCH_EXTENSIONS_DIR when set, else torch's default under
~/.cache/torch_extensions, the one `microbert-train` itself uses), never a temporary one, so the
op is compiled once per machine, not per test, and is shared with real runs.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def train_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
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
