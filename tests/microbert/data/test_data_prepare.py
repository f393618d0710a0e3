"""prepare_dataset: cache hits, streaming = downloaded, resume after interruption or a full disk."""

from __future__ import annotations

import errno
import gzip
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from microbert.data import cache as data_cache
from microbert.data import prepare as prepare_mod
from microbert.data import prepare_dataset
from microbert.data.cache import CacheWriteError
from microbert.data.encode import Encoder
from microbert.errors import ConfigError, MicroBertError

REPO = Path(__file__).resolve().parents[3]


def _same(a, b) -> None:
    assert np.array_equal(a.train, b.train) and np.array_equal(a.eval, b.eval)
    for key in ("documents", "tokens", "sequences", "train_sequences", "eval_sequences", "tokenizer_hash"):
        assert a.meta[key] == b.meta[key], key


def test_embedded_prepare_then_cache_hit(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    first = prepare_dataset(seq_len=64, vocab_size=600, max_samples=600)
    assert not first.cached and first.path.parent == cache_dir / "datasets"
    assert first.train.dtype == np.uint16 and first.train.shape[1] == 64 and len(first.eval) > 0
    assert first.meta["documents"] == 600 and first.meta["eval_documents"] == 6
    assert first.meta["padding_tokens"] < 2 * 64  # only the last train and the last eval row are padded
    assert (first.train[:, 0] == 2).all() and first.tokenizer.get_vocab_size() <= 600
    assert (first.path / "tokenizer.json").is_file() and not (first.path / "progress.json").exists()

    def no_tokenizing(self, documents):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(Encoder, "encode", no_tokenizing)
    monkeypatch.setattr(prepare_mod, "_train_tokenizer", no_tokenizing)
    started = time.perf_counter()
    second = prepare_dataset("embedded", seq_len=64, vocab_size=600, max_samples="600")
    assert time.perf_counter() - started < 1.0
    assert second.cached and second.cache_key == first.cache_key
    assert isinstance(second.train, np.memmap)
    _same(first, second)
    assert Tokenizer.to_str(second.tokenizer) == Tokenizer.to_str(first.tokenizer)


def test_sequence_lengths_of_a_source_share_its_trained_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    short = prepare_dataset(seq_len=32, vocab_size=500, max_samples=300)

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer trained for seq_len 32 must be reused")

    monkeypatch.setattr(prepare_mod, "_train_tokenizer", no_training)
    long = prepare_dataset(seq_len=96, vocab_size=500, max_samples=300)
    assert long.cache_key != short.cache_key and not long.cached
    assert long.tokenizer.to_str() == short.tokenizer.to_str()
    assert long.meta["text_tokens"] == short.meta["text_tokens"]


def test_key_changes_with_what_changes_the_data(tiny_tokenizer: Tokenizer) -> None:
    base = prepare_dataset(seq_len=32, vocab_size=1000, max_samples=300, tokenizer=tiny_tokenizer)
    assert base.tokenizer.to_str() == tiny_tokenizer.to_str()
    for change in ({"seq_len": 48}, {"max_samples": 200}):
        args = {"seq_len": 32, "vocab_size": 1000, "max_samples": 300, "tokenizer": tiny_tokenizer, **change}
        assert prepare_dataset(**args).cache_key != base.cache_key


def test_streaming_and_downloaded_give_the_same_cache_content(
    imdb_head: Path, tiny_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub code path (`datasets.load_dataset`, both modes) over IMDB rows in the Hub's schema."""
    monkeypatch.setenv("MICROBERT_DATASET_IMDB", str(imdb_head))
    args = {"seq_len": 64, "vocab_size": 1000, "max_samples": 300, "tokenizer": tiny_tokenizer}
    streamed = prepare_dataset("imdb", streaming=True, cache_dir=tmp_path / "a", **args)
    downloaded = prepare_dataset("imdb", streaming=False, cache_dir=tmp_path / "b", **args)
    assert not streamed.cached and not downloaded.cached
    assert streamed.cache_key == downloaded.cache_key
    assert streamed.meta["documents"] == 300
    _same(streamed, downloaded)
    assert (tmp_path / "b" / "hf-datasets").is_dir()  # `datasets`' own files stay inside our cache


def test_interrupted_prepare_keeps_shards_and_resumes(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer, text_folder: Path, tmp_path: Path
) -> None:
    args = {"seq_len": 16, "vocab_size": 1000, "tokenizer": tiny_tokenizer, "shard_tokens": 400, "workers": 1}
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)
    clean = prepare_dataset(text_folder, cache_dir=tmp_path / "clean", **args)
    assert clean.meta["shards"] > 4

    real_commit = prepare_mod._Job._commit
    commits = []

    def commit_then_die(self, *a, **k):
        real_commit(self, *a, **k)
        commits.append(1)
        if len(commits) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod._Job, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(text_folder, **args)
    entries = list((data_cache.cache_root() / "datasets").iterdir())
    assert len(entries) == 1 and not (entries[0] / "meta.json").exists()
    progress = json.loads((entries[0] / "progress.json").read_text())
    assert len(progress["shards"]) == 3
    [listed] = data_cache.list_entries(data_cache.cache_root())  # `microbert data list` names it
    assert listed["complete"] is False and listed["finished_shards"] == 3
    assert listed["seq_len"] == 16 and listed["documents"] == progress["documents"]
    monkeypatch.setattr(prepare_mod._Job, "_commit", real_commit)

    encoded = []
    real_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, docs: encoded.extend(docs) or real_encode(self, docs))
    resumed = prepare_dataset(text_folder, **args)
    assert resumed.meta["resumed_shards"] == 3
    assert len(encoded) == clean.meta["documents"] - progress["documents"]  # finished work is not redone
    _same(clean, resumed)


def test_full_disk_is_a_clear_error_and_nothing_half_written_is_read(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer, text_folder: Path, tmp_path: Path
) -> None:
    args = {"seq_len": 16, "vocab_size": 1000, "tokenizer": tiny_tokenizer, "shard_tokens": 400}
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)
    clean = prepare_dataset(text_folder, cache_dir=tmp_path / "clean", **args)
    real_write = data_cache._write
    writes = []

    def fill_up(handle, chunk):
        writes.append(Path(handle.name).name)
        progress_writes = sum(".progress.json" in name for name in writes)
        if progress_writes >= 2 and ".shard-" in writes[-1]:  # fail part-way through the third shard
            real_write(handle, bytes(chunk)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(handle, chunk)

    monkeypatch.setattr(data_cache, "_write", fill_up)
    with pytest.raises(CacheWriteError, match="disk is full") as info:
        prepare_dataset(text_folder, **args)
    assert "MICROBERT_CACHE_DIR" in str(info.value)
    entry = next((data_cache.cache_root() / "datasets").iterdir())
    progress = json.loads((entry / "progress.json").read_text())
    recorded = {f"shard-{s['index']:05d}.{p}.bin" for s in progress["shards"] for p in ("train", "eval")}
    on_disk = {p.name for p in entry.iterdir() if p.name.startswith(("shard-", ".shard-"))}
    assert on_disk == recorded  # the failed shard left nothing behind
    assert not (entry / "meta.json").exists()
    monkeypatch.setattr(data_cache, "_write", real_write)
    again = prepare_dataset(text_folder, **args)
    assert again.meta["resumed_shards"] == len(progress["shards"])
    _same(clean, again)


def test_bad_arguments_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        prepare_dataset(seq_len=0, vocab_size=3, max_samples="many")
    message = str(info.value)
    assert "seq_len" in message and "vocab_size" in message and "--max-samples" in message


def test_too_small_a_tokenizer_vocab_is_refused(tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="1000 tokens but vocab_size is 100"):
        prepare_dataset(seq_len=32, vocab_size=100, tokenizer=tiny_tokenizer)


def _rank(args: tuple[str, int]) -> tuple[bool, str, bytes]:
    cache, _rank_index = args
    ds = prepare_dataset(seq_len=32, vocab_size=400, max_samples=300, cache_dir=cache)
    return ds.cached, ds.cache_key, np.asarray(ds.train).tobytes()


def test_ranks_prepare_once_and_share(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_rank, [(str(tmp_path / "shared"), r) for r in range(2)])
    assert sorted(r[0] for r in results) == [False, True]  # one prepared, the other waited and read
    assert results[0][1:] == results[1][1:]


def test_worker_processes_give_the_same_data(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer, text_folder: Path, tmp_path: Path
) -> None:
    args = {"seq_len": 16, "vocab_size": 1000, "tokenizer": tiny_tokenizer, "shard_tokens": 400}
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)
    monkeypatch.setattr(prepare_mod, "POOL_AFTER_BATCHES", 2)
    single = prepare_dataset(text_folder, cache_dir=tmp_path / "one", workers=1, **args)
    pooled = prepare_dataset(text_folder, cache_dir=tmp_path / "two", workers=2, **args)
    _same(single, pooled)
    assert pooled.meta["shards"] == single.meta["shards"]


def _prepare_in_fresh_process(cache: Path) -> dict:
    """`microbert data prepare` in a process of its own, into an empty cache folder."""
    argv = ["data", "prepare", "--dataset", "embedded", "--max-samples", "800", "--seq-len", "64"]
    argv += ["--vocab-size", "800", "--json", "--cache-dir", str(cache)]
    result = subprocess.run(
        [sys.executable, "-m", "microbert.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=240
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_two_fresh_processes_prepare_the_same_tokenizer_and_rows(tmp_path: Path) -> None:
    """A fresh cache on another machine gives the same ids (tokenizers' trainer alone would not)."""
    first, second = (_prepare_in_fresh_process(tmp_path / name) for name in ("a", "b"))
    assert first["cache_key"] == second["cache_key"]
    a, b = Path(first["path"]), Path(second["path"])
    for name in ("vocab.txt", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    rows = 64 * 64 * 2  # the first 64 rows of uint16 ids
    assert (a / "train.bin").read_bytes()[:rows] == (b / "train.bin").read_bytes()[:rows]
    assert (
        json.loads((a / "meta.json").read_text())["data_hash"]
        == json.loads((b / "meta.json").read_text())["data_hash"]
    )


def _shakespeare(chars: int) -> str:
    text = gzip.decompress((REPO / "microbert" / "corpus" / "tinyshakespeare.txt.gz").read_bytes())
    return text.decode("utf-8")[:chars]


def test_one_long_line_is_held_out_by_pieces_not_whole(tmp_path: Path) -> None:
    """A 1.2 MB source on one line: about 1% held out (it was 87%: one 1 MiB document)."""
    line = tmp_path / "line.txt"
    line.write_text(" ".join(_shakespeare(200_000).split()) * 6, encoding="utf-8")
    data = prepare_dataset(line, seq_len=64, vocab_size=300)
    assert data.meta["documents"] > 50
    assert len(data.eval) / (len(data.train) + len(data.eval)) < 0.03


def test_megabytes_without_spaces_train_a_tokenizer_in_seconds(tmp_path: Path) -> None:
    """Words longer than WordPiece's 100 characters are [UNK] whole: training leaves them out (a
    1.5 MB word made the merge loop run for over a minute)."""
    rng = np.random.default_rng(0)
    blob = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, 1_500_000))
    path = tmp_path / "blob.txt"
    path.write_text(_shakespeare(200_000) + "\n\n" + blob, encoding="utf-8")
    started = time.perf_counter()
    data = prepare_dataset(path, seq_len=64, vocab_size=300)
    assert time.perf_counter() - started < 30
    assert data.tokenizer.encode("the and").tokens[1:-1] == ["the", "and"]
    path.write_text(blob, encoding="utf-8")
    with pytest.raises(ConfigError, match="longer than 100 characters"):
        prepare_dataset(path, seq_len=64, vocab_size=300)


def test_unreadable_hub_source_leaves_no_cache_entry(cache_dir: Path) -> None:
    with pytest.raises(MicroBertError, match="cannot load"):
        prepare_dataset("hf:nobody/no-such-dataset", seq_len=64, vocab_size=300)
    assert data_cache.list_entries(cache_dir) == []
