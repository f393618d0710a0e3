"""Documents -> token ids -> packed fixed-length sequences.

Tokenizing with `tokenizers` costs most of its time per *call* (building an `Encoding` object per
input), not per character, and on two cores that caps batch encoding near 2-3 MB/s. Natural text
repeats its whitespace-separated chunks ("the", "said,") endlessly, and for BERT-style tokenizers —
normaliser and pre-tokeniser that act within a chunk — a text's ids are the concatenation of its
chunks' ids. So `Encoder` asks `tokenizers` only for chunks it has not seen, a few large calls per
batch, and assembles the rest from a cache with numpy. Tokenizers whose pipeline could join or
split across whitespace fall back to plain batch encoding. Either way the ids are exactly
`tokenizer.encode(text, add_special_tokens=False).ids` (a test checks it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from microbert.tokenizer import CLS, PAD, SEP

# Control characters that Python's str.split() treats as whitespace but BERT's normaliser deletes
# (it keeps only \t \n \r among the controls, as spaces): drop them first so the chunks agree.
_DROP_CONTROLS = {c: None for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x1F, 0x85)}
_SPLIT_CONTROL_CHARS = [chr(c) for c in _DROP_CONTROLS]
# Normalisers and pre-tokenisers that act within a whitespace-separated chunk.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFD", "StripAccents"}
_LOCAL_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
# ASCII punctuation as BERT's pre-tokeniser defines it (every character is a word of its own)
_ASCII_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~ ]|[^!-/:-@\[-`{-~ ]+")
# Marks a document boundary in the chunk list: NUL, which text does not contain (a batch whose text
# does takes the slow path); ASCII, so strings keep their compact one-byte form. Joined with spaces
# so it always forms a chunk of its own.
_DOC_MARK = "\x00"
_DOC_END = f" {_DOC_MARK} "
_MAX_CACHED_CHUNKS = 1_000_000  # ~150 MB of strings and ids; reset when exceeded


def chunk_local(tokenizer: Tokenizer) -> bool:
    """True when encoding a text equals encoding its whitespace-separated chunks one by one."""
    state = json.loads(tokenizer.to_str())
    normalizers = _kinds(state.get("normalizer"), "normalizers")
    pre_tokenizers = _pre_tokenizer_kinds(tokenizer)
    return (
        bool(pre_tokenizers)
        and set(normalizers) <= _LOCAL_NORMALIZERS
        and set(pre_tokenizers) <= _LOCAL_PRE_TOKENIZERS
        and state.get("model", {}).get("type") in ("WordPiece", "WordLevel")
        and not state.get("added_tokens_split", False)
        and all(t.get("special") for t in state.get("added_tokens", []))
    )


def _kinds(component: dict | None, key: str) -> list[str]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [t for c in component.get(key, []) for t in _kinds(c, key)]
    return [component.get("type", "?")]


def _pre_tokenizer_kinds(tokenizer: Tokenizer) -> list[str]:
    return _kinds(json.loads(tokenizer.to_str()).get("pre_tokenizer"), "pretokenizers")


class Encoder:
    """Encodes batches of documents into one flat id stream, each document followed by `[SEP]`."""

    def __init__(self, tokenizer: Tokenizer, *, dtype: np.dtype):
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self.sep_id = _special_id(tokenizer, SEP)
        self.fast = chunk_local(tokenizer)
        self.split_punctuation = self.fast and _pre_tokenizer_kinds(tokenizer) == ["BertPreTokenizer"]
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._index: dict[str, int] = {_DOC_MARK: 0}
        self._ids = np.array([self.sep_id], dtype=self.dtype)  # all cached chunks' ids, concatenated
        self._starts = np.array([0], dtype=np.int64)
        self._lengths = np.array([1], dtype=np.int64)
        self._word_index: dict[str, int] = {}
        self._word_ids = np.empty(0, dtype=self.dtype)
        self._word_starts = np.empty(0, dtype=np.int64)
        self._word_lengths = np.empty(0, dtype=np.int64)

    def encode(self, documents: Sequence[str]) -> np.ndarray:
        """The documents' ids, concatenated, each followed by the `[SEP]` that marks its end."""
        if not documents:
            return np.empty(0, dtype=self.dtype)
        if not self.fast:
            flat: list[int] = []
            for encoding in self.tokenizer.encode_batch_fast(list(documents), add_special_tokens=False):
                flat.extend(encoding.ids)
                flat.append(self.sep_id)
            return np.array(flat, dtype=self.dtype)
        joined = _DOC_END.join(documents)
        if joined.count(_DOC_MARK) == len(documents) - 1:  # one split() call for the whole batch
            joined += _DOC_END
            if any(c in joined for c in _SPLIT_CONTROL_CHARS):
                joined = joined.translate(_DROP_CONTROLS)
            chunks = joined.split()
        else:  # a document contains the marker character itself
            chunks = []
            for doc in documents:
                chunks += doc.translate(_DROP_CONTROLS).split()
                chunks.append(_DOC_MARK)
        if len(self._index) > _MAX_CACHED_CHUNKS:
            self._reset_cache()
        unseen = set(chunks).difference(self._index)
        if unseen:
            self._add(sorted(unseen))
        index = self._index
        chunk_ids = np.array([index[c] for c in chunks], dtype=np.int64)  # the hot loop: keep it plain
        return _gather(self._ids, self._starts[chunk_ids], self._lengths[chunk_ids])

    def _add(self, chunks: list[str]) -> None:
        """Cache the ids of new chunks, asking `tokenizers` only for the words it has not seen.

        BERT's pre-tokeniser makes every punctuation character a word of its own, so a chunk such
        as `king,` is the words `king` and `,`: splitting there first shrinks the text that new
        chunks send to the (slow) normaliser several times over.
        """
        if self.split_punctuation:
            # one regex pass over all new chunks; the spaces between them come back as " " pieces
            pieces = _ASCII_PUNCTUATION.findall(" ".join(chunks) + " ")
        else:
            pieces = [piece for chunk in chunks for piece in (chunk, " ")]
        unseen = set(pieces)
        unseen.discard(" ")
        unseen.difference_update(self._word_index)
        if unseen:
            self._add_words(sorted(unseen))
        self._word_index[" "] = -1
        word_index = self._word_index
        word_ids = np.array([word_index[w] for w in pieces], dtype=np.int64)
        del self._word_index[" "]
        is_space = word_ids < 0
        owner: np.ndarray = np.cumsum(is_space) - is_space  # the chunk each piece belongs to
        word_ids, owner = word_ids[~is_space], owner[~is_space]
        word_lengths = self._word_lengths[word_ids]
        ids = _gather(self._word_ids, self._word_starts[word_ids], word_lengths)
        lengths = np.bincount(owner, weights=word_lengths, minlength=len(chunks)).astype(np.int64)
        base = len(self._index)
        self._index.update((chunk, base + i) for i, chunk in enumerate(chunks))
        self._ids, self._starts, self._lengths = _append(self._ids, self._starts, self._lengths, ids, lengths)

    def _add_words(self, words: list[str]) -> None:
        """Encode words a few large texts at a time, then split the ids back by their offsets."""
        parts = max(1, min(64, len(words) // 2000))
        groups = [words[i::parts] for i in range(parts)]
        texts = [" ".join(group) for group in groups]
        for group, encoding in zip(
            groups, self.tokenizer.encode_batch(texts, add_special_tokens=False), strict=True
        ):
            ids = np.asarray(encoding.ids, dtype=self.dtype)
            token_starts = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            word_starts = np.cumsum([0] + [len(w) + 1 for w in group[:-1]], dtype=np.int64)
            owner = np.searchsorted(word_starts, token_starts, side="right") - 1
            lengths = np.bincount(owner, minlength=len(group)).astype(np.int64)
            base = len(self._word_index)
            self._word_index.update((word, base + i) for i, word in enumerate(group))
            self._word_ids, self._word_starts, self._word_lengths = _append(
                self._word_ids, self._word_starts, self._word_lengths, ids, lengths
            )


def _append(
    values: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    new_values: np.ndarray,
    new_lengths: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Append entries to a ragged store (values, start and length per entry)."""
    new_starts = len(values) + np.cumsum(new_lengths) - new_lengths
    return (
        np.concatenate([values, new_values]),
        np.concatenate([starts, new_starts]),
        np.concatenate([lengths, new_lengths]),
    )


def _gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[0]:starts[0]+lengths[0]] + values[starts[1]:...] + ..., without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=values.dtype)
    nonzero = lengths > 0
    starts, lengths = starts[nonzero], lengths[nonzero]
    out_starts = np.cumsum(lengths) - lengths
    index = np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, lengths)
    return values[index]


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return token_id


class Packer:
    """Packs an id stream into `[CLS] <seq_len-2 ids> [SEP]` rows; the remainder waits for more.

    Documents run on from one row into the next (RoBERTa's FULL-SENTENCES packing), so only the very
    last row of a dataset carries padding. `carry` is the unfinished remainder, saved with each shard
    so an interrupted prepare resumes mid-stream.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, dtype: np.dtype, carry: Sequence[int] = ()):
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.cls_id, self.sep_id, self.pad_id = (_special_id(tokenizer, t) for t in (CLS, SEP, PAD))
        self.carry = np.asarray(carry, dtype=self.dtype)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Rows completed by these ids, shape (n, seq_len)."""
        stream = np.concatenate([self.carry, ids]) if len(self.carry) else ids
        body = self.seq_len - 2
        full = len(stream) // body
        self.carry = stream[full * body :].copy()
        return self._rows(stream[: full * body].reshape(full, body))

    def finish(self) -> np.ndarray:
        """The last, padded row (if any text remains), shape (0 or 1, seq_len)."""
        if not len(self.carry):
            return np.empty((0, self.seq_len), dtype=self.dtype)
        body = np.full((1, self.seq_len - 2), self.pad_id, dtype=self.dtype)
        body[0, : len(self.carry)] = self.carry
        rows = self._rows(body)
        rows[0, len(self.carry) + 1] = self.sep_id
        rows[0, -1] = self.pad_id if len(self.carry) + 2 < self.seq_len else self.sep_id
        self.carry = self.carry[:0]
        return rows

    def _rows(self, body: np.ndarray) -> np.ndarray:
        rows = np.empty((len(body), self.seq_len), dtype=self.dtype)
        rows[:, 0] = self.cls_id
        rows[:, 1:-1] = body
        rows[:, -1] = self.sep_id
        return rows
