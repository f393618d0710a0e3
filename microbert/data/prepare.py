"""`prepare_dataset`: a source, tokenized once into packed rows in the content-addressed cache.

The work is done once per cache key (source + sample limit + tokenizer + sequence length + held-out
share); every later call — on this rank or any other — memory-maps the result. Preparing streams the
source in batches: documents are encoded, packed into rows, and every `shard_tokens` tokens the rows
are committed as a shard (written, flushed, renamed) together with the point to resume from. An
interrupted prepare therefore keeps its finished shards and continues after the last one. When the
source is exhausted the shards are joined into `train.bin` / `eval.bin` and `meta.json` is written;
only then is the entry visible as data.

Same source and settings, same bytes: the tokenizer training is reproducible (microbert/tokenizer.py),
so two machines preparing one key write the same `tokenizer.json` and `train.bin`; `meta.json` records
both hashes (`tokenizer_hash`, `data_hash`), which a run folder keeps to check a resume against.
Documents longer than `DOCUMENT_PIECE_CHARS` are cut into pieces first (at a line end or a space),
so the every-100th held-out split is by document whatever the source looks like (one 3 MB line
included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tokenizers import Tokenizer

from microbert.data import cache as cache_mod
from microbert.data.cache import META_FILE, PROGRESS_FILE, ensure_dir, read_json, write_json_atomic
from microbert.data.encode import Encoder, Packer
from microbert.data.parallel import EncoderPool, default_workers
from microbert.data.sources import Source, iter_documents, parse_count, resolve_source
from microbert.errors import ConfigError, MicroBertError
from microbert.tokenizer import (
    CLS,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    load_tokenizer,
    mask_token_id,
    save_tokenizer,
    special_token_ids,
    tokenizer_hash,
)
from microbert.tokenizer import train_tokenizer as _train_tokenizer

log = logging.getLogger(__name__)

# 2: reproducible tokenizer training, long documents cut into pieces, data_hash in meta.json
FORMAT_VERSION = 2
DEFAULT_SHARD_TOKENS = 32 << 20  # 64 MiB of uint16 per shard: little lost to an interruption
BATCH_CHARS = 1 << 20  # text handed to the encoder at a time
DEFAULT_TOKENIZER_SAMPLE_CHARS = 32 << 20  # WordPiece learns its vocabulary from the first 32 M characters
MIN_SEQ_LEN, MAX_SEQ_LEN = 8, 65536
POOL_AFTER_BATCHES = 8  # sources of more than ~8 MB of text are encoded by a pool of processes
DOCUMENT_PIECE_CHARS = 1 << 14  # a longer document is cut into pieces of at most this many characters


@dataclass
class PreparedDataset:
    """A prepared dataset: the tokenizer and memory-mapped rows of token ids (0 = [PAD])."""

    tokenizer: Tokenizer
    train: np.ndarray  # (num_sequences, seq_len) uint16 | uint32
    eval: np.ndarray  # (num_eval_sequences, seq_len), documents never seen in train
    cache_key: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def special_token_ids(self) -> list[int]:
        return special_token_ids(self.tokenizer)

    @property
    def mask_token_id(self) -> int:
        return mask_token_id(self.tokenizer)


def prepare_dataset(
    source: str | os.PathLike[str] = "embedded",
    *,
    seq_len: int,
    vocab_size: int,
    max_samples: int | str | None = None,
    streaming: bool = False,
    text_column: str = "text",
    tokenizer: str | Path | Tokenizer | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    eval_fraction: float = 0.01,
    tokenizer_sample_chars: int = DEFAULT_TOKENIZER_SAMPLE_CHARS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
) -> PreparedDataset:
    """Tokenize and pack `source` into the cache (once), then return it memory-mapped.

    Safe to call from every rank at once: one process prepares under a file lock; the others wait
    for it and then read the finished entry (`cached=True`).
    """
    started = time.perf_counter()
    max_samples = _validate(seq_len, vocab_size, max_samples, text_column, eval_fraction, shard_tokens)
    src = resolve_source(source, text_column=text_column)
    given = _given_tokenizer(tokenizer, vocab_size)
    key_fields = {
        "format": FORMAT_VERSION,
        "source": src.identity,
        "max_samples": max_samples,
        "seq_len": seq_len,
        "eval_fraction": eval_fraction,
        "tokenizer": tokenizer_hash(given)
        if given is not None
        else {"train": "wordpiece", "vocab_size": vocab_size, "sample_chars": tokenizer_sample_chars},
    }
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    key = f"{src.slug}-s{seq_len}-{digest}"
    root = cache_mod.cache_root(cache_dir)
    entry = cache_mod.datasets_dir(root) / key
    if (entry / META_FILE).is_file():
        return _open(entry, cached=True)
    ensure_dir(cache_mod.locks_dir(root))
    lock = FileLock(str(cache_mod.locks_dir(root) / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Exception:  # filelock.Timeout: another process is preparing this key
        log.info("waiting for another process to finish preparing %s", key)
        lock.acquire()
    try:
        if (entry / META_FILE).is_file():
            return _open(entry, cached=True)
        job = _Job(
            src=src,
            entry=entry,
            key_fields=key_fields,
            seq_len=seq_len,
            vocab_size=vocab_size,
            max_samples=max_samples,
            streaming=streaming,
            eval_fraction=eval_fraction,
            given=given,
            hf_cache=cache_mod.hf_datasets_dir(root),
            sample_chars=tokenizer_sample_chars,
            shard_tokens=shard_tokens,
            show_progress=progress,
            started=started,
            workers=default_workers() if workers is None else max(1, workers),
        )
        try:
            job.run()
        except cache_mod.CacheWriteError:
            raise  # a full disk: the entry stays, listed as unfinished, and the next run continues
        except BaseException:
            job.discard_if_empty()  # an unreadable source or Ctrl-C before the first shard
            raise
        return _open(entry, cached=False)
    finally:
        lock.release()


def _validate(
    seq_len: Any, vocab_size: Any, max_samples: Any, text_column: Any, eval_fraction: Any, shard_tokens: Any
) -> int | None:
    problems = []
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
        problems.append(f"seq_len must be an integer from {MIN_SEQ_LEN} to {MAX_SEQ_LEN}, got {seq_len!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 6 <= vocab_size < 2**32:
        problems.append(f"vocab_size must be an integer of at least 6, got {vocab_size!r}")
    try:
        limit = parse_count(max_samples)
    except ConfigError as exc:
        problems.extend(exc.problems)
        limit = None
    if not isinstance(text_column, str) or not text_column:
        problems.append(f"text_column must be a column name, got {text_column!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction <= 0.5:
        problems.append(f"eval_fraction must be between 0 and 0.5, got {eval_fraction!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        problems.append(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if problems:
        raise ConfigError(problems)
    return limit


def _given_tokenizer(tokenizer: str | Path | Tokenizer | None, vocab_size: int) -> Tokenizer | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        path = Path(tokenizer).expanduser()
        if path.is_file():
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as exc:
                raise ConfigError(f"{path} is not a tokenizer.json: {exc}") from None
        else:
            tok = load_tokenizer(path)
    missing = [t for t in (PAD, CLS, SEP, MASK) if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(
            f"the tokenizer has no {', '.join(missing)} token(s); MicroBERT needs {SPECIAL_TOKENS}"
        )
    if tok.token_to_id(PAD) != 0:
        raise ConfigError(f"the tokenizer's {PAD} id is {tok.token_to_id(PAD)}; the data format needs 0")
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but vocab_size is {vocab_size}: "
            "the model could not embed its ids"
        )
    return tok


def _dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)


def _open(entry: Path, *, cached: bool) -> PreparedDataset:
    """Memory-map a finished entry (no tokenization, no copy)."""
    meta = read_json(entry / META_FILE)
    if meta is None or meta.get("format") != FORMAT_VERSION:
        raise MicroBertError(
            f"{entry / META_FILE} is unreadable or from another version; `microbert cache clear`"
        )
    tok = load_tokenizer(entry)
    dtype, seq_len = np.dtype(meta["dtype"]), int(meta["seq_len"])

    def rows(name: str, count: int) -> np.ndarray:
        path = entry / name
        expected = count * seq_len * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise MicroBertError(
                f"{path} is missing or has the wrong size; `microbert cache clear {entry.name}`"
            )
        if count == 0:
            return np.empty((0, seq_len), dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count, seq_len))

    return PreparedDataset(
        tokenizer=tok,
        train=rows("train.bin", int(meta["train_sequences"])),
        eval=rows("eval.bin", int(meta["eval_sequences"])),
        cache_key=entry.name,
        path=entry,
        meta=meta,
        cached=cached,
    )


PARTS = ("train", "eval")


SHARD_PREFIX = "shard-"


def shard_path(entry: Path, index: int, part: str) -> Path:
    """Shard `index` of `part` ("train" or "eval"): the one place its file name is written."""
    return entry / f"{SHARD_PREFIX}{index:05d}.{part}.bin"


@dataclass
class _Stats:
    """Running totals of the text read so far, for meta.json."""

    text_chars: int = 0
    text_tokens: int = 0  # without the [SEP] that ends each document
    eval_documents: int = 0
    padding_tokens: int = 0


@dataclass
class _Shard:
    index: int
    train_sequences: int
    eval_sequences: int


@dataclass
class _Progress:
    """What `progress.json` records after every committed shard: enough to resume after the last one."""

    key: dict[str, Any]
    shards: list[_Shard] = field(default_factory=list)
    documents: int = 0  # documents of the source that the committed shards hold
    stats: _Stats = field(default_factory=_Stats)
    # token ids read but not yet packed into a row, per part: the next shard starts with them
    carry: dict[str, list[int]] = field(default_factory=lambda: {part: [] for part in PARTS})
    finished: bool = False

    @classmethod
    def read(cls, path: Path, key: dict[str, Any]) -> _Progress:
        """The record at `path` when it is one of this cache key; otherwise a fresh start."""
        data = read_json(path)
        if data is None or data.get("key") != key:
            return cls(key)
        try:
            return cls(
                key=key,
                shards=[_Shard(**shard) for shard in data["shards"]],
                documents=int(data["documents"]),
                stats=_Stats(**data["stats"]),
                carry={part: list(data["carry"][part]) for part in PARTS},
                finished=bool(data["finished"]),
            )
        except (KeyError, TypeError):  # not a record this version wrote: start again
            return cls(key)

    def write(self, path: Path) -> None:
        write_json_atomic(path, dataclasses.asdict(self))

    def sequences(self, part: str) -> int:
        return sum(
            shard.train_sequences if part == "train" else shard.eval_sequences for shard in self.shards
        )


@dataclass
class _Job:
    """One preparation of one cache entry: resumable from its last committed shard."""

    src: Source
    entry: Path
    key_fields: dict[str, Any]
    seq_len: int
    vocab_size: int
    max_samples: int | None
    streaming: bool
    eval_fraction: float
    given: Tokenizer | None  # the caller's tokenizer; None trains one on the source
    hf_cache: Path
    sample_chars: int  # text the tokenizer is trained on
    shard_tokens: int
    show_progress: bool
    started: float  # perf_counter() when prepare_dataset was called, for meta.json's seconds
    workers: int
    # document k is held out when k % eval_every == 0 (none when eval_fraction == 0)
    eval_every: int = field(init=False)
    state: _Progress = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.eval_every = round(1 / self.eval_fraction) if self.eval_fraction > 0 else 0

    def discard_if_empty(self) -> None:
        """After a failure before the first shard: remove the entry, there is nothing to resume."""
        if self.entry.is_dir() and not (self.entry / PROGRESS_FILE).is_file():
            shutil.rmtree(self.entry, ignore_errors=True)

    def is_eval(self, index: int) -> bool:
        return self.eval_every > 0 and index % self.eval_every == 0

    def documents(self) -> Iterator[str]:
        """The documents of the split: the source's first `max_samples`, long ones cut into pieces."""
        docs = iter_documents(self.src, streaming=self.streaming, hf_cache_dir=self.hf_cache)
        if self.max_samples is not None:
            docs = islice(docs, self.max_samples)
        for doc in docs:
            yield from document_pieces(doc)

    def run(self) -> None:
        ensure_dir(self.entry)
        self.state = _Progress.read(self.entry / PROGRESS_FILE, self.key_fields)
        tok = self._tokenizer()
        dtype = _dtype(tok)
        self._drop_orphans()
        resumed_shards = len(self.state.shards)
        if not self.state.finished:
            self._tokenize(tok, dtype)
        self._finish(tok, dtype, resumed_shards)

    def _tokenizer(self) -> Tokenizer:
        if (self.entry / "tokenizer.json").is_file():  # resuming: the ids already written use it
            return load_tokenizer(self.entry)
        tok = self.given if self.given is not None else self._trained_tokenizer()
        staging = ensure_dir(self.entry / ".tokenizer-tmp")
        for name in save_tokenizer(tok, staging):
            os.replace(staging / name, self.entry / name)
        staging.rmdir()
        return tok

    def _trained_tokenizer(self) -> Tokenizer:
        """Train on the source, or reuse the tokenizer trained on it before (for another seq_len).

        Kept in `tokenizers/<key>/` so every sequence length of a source shares one vocabulary without
        training it again (retraining would give the same tokenizer, at the cost of the training).
        """
        recipe = {key: self.key_fields[key] for key in ("format", "source", "max_samples", "eval_fraction")}
        recipe["tokenizer"] = self.key_fields["tokenizer"]
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.entry.parent.parent / "tokenizers" / f"{self.src.slug}-v{self.vocab_size}-{digest}"
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
        log.info("training a WordPiece tokenizer (vocab %d) on %s", self.vocab_size, self.src.name)
        tok = _train_tokenizer(self._sample(), self.vocab_size)
        staging = ensure_dir(folder.with_name(f".{folder.name}.tmp-{os.getpid()}"))
        save_tokenizer(tok, staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same tokenizer first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
            return load_tokenizer(folder)
        return tok

    def _sample(self) -> Iterator[str]:
        taken = 0
        for index, doc in enumerate(self.documents()):
            if self.is_eval(index):
                continue
            yield doc
            taken += len(doc)
            if taken >= self.sample_chars:
                return

    def _shard_paths(self, part: str) -> list[Path]:
        return [shard_path(self.entry, shard.index, part) for shard in self.state.shards]

    def _drop_orphans(self) -> None:
        """Remove shards no progress record names (written, but interrupted before being recorded)."""
        keep = {path.name for part in PARTS for path in self._shard_paths(part)}
        for path in self.entry.iterdir():
            if (path.name.startswith(SHARD_PREFIX) and path.name not in keep) or ".tmp-" in path.name:
                path.unlink(missing_ok=True)

    def _tokenize(self, tok: Tokenizer, dtype: np.dtype) -> None:
        encoder = Encoder(tok, dtype=dtype)
        packers = {part: Packer(tok, self.seq_len, dtype, self.state.carry[part]) for part in PARTS}
        pending: dict[str, list[np.ndarray]] = {part: [] for part in PARTS}
        pending_rows = 0
        stats = self.state.stats
        bar = _progress_bar(self.show_progress, self.src.name)

        def take(encoded: list[np.ndarray], tag: tuple[int, int, int, int]) -> None:
            """Pack one encoded batch (in source order) and commit a shard when one is full."""
            nonlocal pending_rows
            end_index, chars, n_train, n_eval = tag
            for part, ids, n_docs in (("train", encoded[0], n_train), ("eval", encoded[1], n_eval)):
                stats.text_tokens += len(ids) - n_docs  # less the [SEP] after each document
                rows = packers[part].add(ids)
                pending[part].append(rows)
                pending_rows += len(rows)
            stats.text_chars += chars
            stats.eval_documents += n_eval
            if bar is not None:
                bar.update(chars)
            if pending_rows * self.seq_len >= self.shard_tokens:
                self._commit(pending, packers, end_index)
                pending_rows = 0

        pool: EncoderPool | None = None
        index = self.state.documents
        docs = islice(self.documents(), index, None)  # resume after the last committed shard
        try:
            for number, batch in enumerate(_batches(docs)):
                parts: list[list[str]] = [[], []]  # train, eval
                for doc in batch:
                    parts[self.is_eval(index)].append(doc)
                    index += 1
                tag = (index, sum(map(len, batch)), len(parts[0]), len(parts[1]))
                if pool is None and self.workers > 1 and number + 1 >= POOL_AFTER_BATCHES:
                    pool = EncoderPool(
                        tok, dtype, self.workers, encoder
                    )  # the source is large: use every core
                if pool is None:
                    take([encoder.encode(p) for p in parts], tag)
                else:
                    for encoded, done_tag in pool.submit(parts, tag):
                        take(encoded, done_tag)
            if pool is not None:
                for encoded, done_tag in pool.drain():
                    take(encoded, done_tag)
        finally:
            if pool is not None:
                pool.close()
        for part in PARTS:
            last = packers[part].finish()
            stats.padding_tokens += int(np.count_nonzero(last == packers[part].pad_id))
            pending[part].append(last)
        self.state.finished = True
        self._commit(pending, packers, index)
        if bar is not None:
            bar.close()

    def _commit(
        self, pending: dict[str, list[np.ndarray]], packers: dict[str, Packer], documents: int
    ) -> None:
        """Write the pending rows as the next shard, then record it (and where to resume)."""
        shard = len(self.state.shards)
        counts = {}
        for part in PARTS:
            rows = [r for r in pending[part] if len(r)]
            counts[part] = sum(len(r) for r in rows)
            path = shard_path(self.entry, shard, part)
            cache_mod.write_bytes_atomic(path, (np.ascontiguousarray(r).data.cast("B") for r in rows))
            pending[part].clear()
        self.state.shards.append(_Shard(shard, counts["train"], counts["eval"]))
        self.state.documents = documents
        self.state.carry = {part: packers[part].carry.tolist() for part in PARTS}
        self.state.write(self.entry / PROGRESS_FILE)

    def _finish(self, tok: Tokenizer, dtype: np.dtype, resumed_shards: int) -> None:
        """Join the shards into train.bin / eval.bin, then write meta.json: the entry is complete."""
        state, stats = self.state, self.state.stats
        totals = {part: state.sequences(part) for part in PARTS}
        if totals["train"] == 0:
            raise MicroBertError(
                f"{self.src.name} has too little text: {state.documents} document(s) gave no training "
                "sequence (the first document of every 100 is held out for evaluation); give more text"
            )
        data_hash = hashlib.sha256()
        for part in PARTS:
            cache_mod.write_bytes_atomic(
                self.entry / f"{part}.bin", _hashed(self._shard_paths(part), data_hash)
            )
        total_slots = (totals["train"] + totals["eval"]) * self.seq_len
        non_padding = total_slots - stats.padding_tokens
        meta = {
            "format": FORMAT_VERSION,
            "cache_key": self.entry.name,
            "source": self.src.name,
            "source_identity": self.src.identity,
            "max_samples": self.max_samples,
            "seq_len": self.seq_len,
            "vocab_size": tok.get_vocab_size(),
            "tokenizer_hash": tokenizer_hash(tok),
            # sha256 of train.bin then eval.bin: what a run folder checks a resume against
            "data_hash": data_hash.hexdigest()[:16],
            "dtype": dtype.name,
            "documents": state.documents,
            "eval_documents": stats.eval_documents,
            "text_chars": stats.text_chars,
            "text_tokens": stats.text_tokens,
            "tokens": non_padding,
            "padding_tokens": total_slots - non_padding,
            "padding_fraction": round((total_slots - non_padding) / max(total_slots, 1), 6),
            "sequences": totals["train"] + totals["eval"],
            "train_sequences": totals["train"],
            "eval_sequences": totals["eval"],
            "eval_every": self.eval_every,
            "shards": len(state.shards),
            "resumed_shards": resumed_shards,
            "seconds": round(time.perf_counter() - self.started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "key": self.key_fields,
        }
        write_json_atomic(self.entry / META_FILE, meta)
        for part in PARTS:
            for path in self._shard_paths(part):
                path.unlink(missing_ok=True)
        (self.entry / PROGRESS_FILE).unlink(missing_ok=True)


def _hashed(paths: list[Path], digest: Any) -> Iterator[memoryview]:
    """The bytes of the files, in order, added to digest on the way."""
    for path in paths:
        data = np.fromfile(path, dtype=np.uint8).data
        digest.update(data)
        yield data


def document_pieces(doc: str, limit: int = DOCUMENT_PIECE_CHARS) -> Iterator[str]:
    """doc, or its pieces of at most limit characters, cut at the last line end or space in the
    second half of each window (else at the limit): one long line becomes many documents."""
    start, end = 0, len(doc)
    while end - start > limit:
        window_end = start + limit
        cut = doc.rfind("\n", start + limit // 2, window_end)
        if cut < 0:
            cut = doc.rfind(" ", start + limit // 2, window_end)
        cut = window_end if cut < 0 else cut + 1
        piece = doc[start:cut].strip()
        if piece:
            yield piece
        start = cut
    piece = doc[start:end] if start == 0 else doc[start:end].strip()
    if piece:
        yield piece


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _progress_bar(enabled: bool, name: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"preparing {name}", unit="char", unit_scale=True, dynamic_ncols=True)
