"""Data-test fixtures: every test gets its own cache folder (never ~/.cache) and small sources."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

SHARED_CORPORA = Path(__file__).resolve().parents[3].parent / "shared" / "corpora"
IMDB = SHARED_CORPORA / "imdb_train.jsonl.gz"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MICROBERT_CACHE_DIR", str(folder))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return folder


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of two small .txt files (paragraphs separated by blank lines)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    sentence = "the quick brown fox jumps over the lazy dog while the king reads a book"
    words = sentence.split(" ")
    for n in range(2):
        paragraphs = [" ".join(words[i % 7 :] + words[: i % 7]) + f" number {i}." for i in range(150)]
        (folder / f"part{n}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def imdb_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 400 IMDB reviews, in the Hub's {"text", "label"} schema, gzipped JSON lines."""
    if not IMDB.is_file():
        pytest.skip("no IMDB sample on this machine (the shared corpora are not beside the checkout)")
    path = tmp_path_factory.mktemp("imdb") / "imdb_head.jsonl.gz"
    with gzip.open(IMDB, "rt", encoding="utf-8") as src, gzip.open(path, "wt", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 400))
    return path
