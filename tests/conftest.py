"""Shared fixtures: a small tokenizer and a random-weight artifact, built once per test session."""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from microbert.checkpoint import save_artifact
from microbert.config import get_preset
from microbert.model import BertForMaskedLM
from microbert.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Every process a test starts sees this environment's scripts first, as in an activated virtualenv.
# It also decides which `ninja` builds DeepSpeed's CPU op: the one pip installs beside torch, or the
# system's. Their build logs differ in version, so each switch between them rebuilt the op from
# scratch (~45 s on 2 cores): the README tests had this folder first on PATH, the training tests not.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# Tests never reach the network: the Hub clients fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test writes into the user's ~/.cache/microbert or Hugging Face cache: the session's own
    folders, inherited by every subprocess a test starts. (Tests that need their own cache set it
    per test on top of this; the torch extensions folder stays shared, see tests/train/conftest.py.)"""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MICROBERT_CACHE_DIR", str(root / "microbert"))
        patch.setenv("HF_HOME", str(root / "huggingface"))
        yield root


def _sample_text() -> list[str]:
    """Tiny Shakespeare, from the copy embedded in the package: the same text everywhere, with or
    without ../shared beside the checkout."""
    text = gzip.decompress((REPO / "microbert" / "corpus" / "tinyshakespeare.txt.gz").read_bytes())
    return [p for p in text.decode("utf-8").split("\n\n") if p.strip()][:3000]


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return _sample_text()


@pytest.fixture(scope="session")
def tiny_tokenizer(sample_texts: list[str]):
    return train_tokenizer(sample_texts, vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    return get_preset("bert-tiny").replace(
        vocab_size=tiny_tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_tokenizer, tiny_config) -> Path:
    """A complete artifact folder (random weights) for predictor, CLI and service tests."""
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config).eval()
    return save_artifact(
        model, tiny_tokenizer, tmp_path_factory.mktemp("artifact") / "step-7", metadata={"step": 7}
    )
