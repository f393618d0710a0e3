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
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, normalizers, pre_tokenizers

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
# how a document's end is keyed in the chunk cache: whitespace, so no chunk of text can collide with it
_DOC_CHUNK = "\n"
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
        self._plain, self._lowercase = (
            _plain_word_tokenizer(tokenizer) if self.split_punctuation else (None, False)
        )
        self._reset_cache()

    def _reset_cache(self) -> None:
        # entry 0: a document's end ([SEP]); entry 1: "", which Arrow's split yields at the ends
        self._index: dict[str, int] = {_DOC_CHUNK: 0, "": 1}
        self._ids = np.array([self.sep_id], dtype=self.dtype)  # all cached chunks' ids, concatenated
        self._starts = np.array([0, 1], dtype=np.int64)
        self._lengths = np.array([1, 0], dtype=np.int64)
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
        if joined.count(_DOC_MARK) == len(documents) - 1:
            joined += _DOC_END
            if any(c in joined for c in _SPLIT_CONTROL_CHARS):
                joined = joined.translate(_DROP_CONTROLS)
            uniques, positions = _split_unique(joined)
            uniques[uniques.index(_DOC_MARK)] = _DOC_CHUNK  # the markers: here, and only here, NUL
        else:  # a document contains the marker character itself: split document by document
            chunks: list[str] = []
            for doc in documents:
                chunks += doc.translate(_DROP_CONTROLS).split()
                chunks.append(_DOC_CHUNK)
            uniques = list(dict.fromkeys(chunks))
            where = {chunk: i for i, chunk in enumerate(uniques)}
            positions = np.array([where[c] for c in chunks], dtype=np.int64)
        if len(self._index) > _MAX_CACHED_CHUNKS:
            self._reset_cache()
        index = self._index
        unseen = [u for u in uniques if u not in index]
        if unseen:
            self._add(unseen)
        unique_ids = np.array([index[u] for u in uniques], dtype=np.int64)
        chunk_ids = unique_ids[positions]
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
        base = len(self._starts)
        self._index.update((chunk, base + i) for i, chunk in enumerate(chunks))
        self._ids, self._starts, self._lengths = _append(self._ids, self._starts, self._lengths, ids, lengths)

    def _add_words(self, words: list[str]) -> None:
        """Encode new words, then split the ids back by their offsets.

        Printable-ASCII words (nearly all of English) skip BERT's normaliser, the slowest step of
        `tokenizers` here: for them it only lowercases, which `str.lower` does the same way.
        """
        if self._plain is not None:
            plain: list[str] = []
            other: list[str] = []
            for w in words:
                (plain if w.isascii() and w.isprintable() else other).append(w)
            if plain:
                lowered = [w.lower() for w in plain] if self._lowercase else plain
                self._encode_words(self._plain, plain, lowered)
            if other:
                self._encode_words(self.tokenizer, other, other)
        else:
            self._encode_words(self.tokenizer, words, words)

    def _encode_words(self, tokenizer: Tokenizer, words: list[str], texts_of: list[str]) -> None:
        """Cache `words`, encoded as `texts_of` (the same words, maybe lowercased), a few large calls."""
        parts = max(1, min(64, len(words) // 2000))
        for part in range(parts):
            group, texts = words[part::parts], texts_of[part::parts]
            encoding = tokenizer.encode(" ".join(texts), add_special_tokens=False)
            ids = np.asarray(encoding.ids, dtype=self.dtype)
            if tokenizer is self._plain:  # split on spaces only: the pre-tokenizer's words are ours
                owner = np.array(encoding.word_ids, dtype=np.int64)
            else:
                token_starts = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
                word_starts = np.cumsum([0] + [len(w) + 1 for w in texts[:-1]], dtype=np.int64)
                owner = np.searchsorted(word_starts, token_starts, side="right") - 1
            lengths = np.bincount(owner, minlength=len(group)).astype(np.int64)
            base = len(self._word_starts)
            self._word_index.update((word, base + i) for i, word in enumerate(group))
            self._word_ids, self._word_starts, self._word_lengths = _append(
                self._word_ids, self._word_starts, self._word_lengths, ids, lengths
            )


def _plain_word_tokenizer(tokenizer: Tokenizer) -> tuple[Tokenizer | None, bool]:
    """A copy without normaliser that splits on spaces only, and whether the original lowercases.

    Equivalent to the original on printable-ASCII words without punctuation, when the original's
    normaliser does nothing to such text but (perhaps) lowercase it.
    """
    state = json.loads(tokenizer.to_str())
    normalizer = state.get("normalizer")
    kinds = _kinds(normalizer, "normalizers")
    if not set(kinds) <= {"BertNormalizer", "Lowercase", "NFD", "StripAccents"}:
        return None, False
    parts = normalizer.get("normalizers", [normalizer]) if normalizer else []
    lowercase = any(
        p.get("type") == "Lowercase" or (p.get("type") == "BertNormalizer" and p.get("lowercase"))
        for p in parts
    )
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.normalizer = normalizers.Sequence([])
    plain.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return plain, lowercase


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


def _split_unique(text: str) -> tuple[list[str], np.ndarray]:
    """`text.split()` as (distinct chunks, position of each chunk in that list), computed in Arrow.

    Only the distinct chunks (about a tenth) become Python strings. Arrow's whitespace is Python's
    (checked for every code point, and by a test); it also yields empty strings at the ends, which
    map to the cache's empty entry.
    """
    pieces = pc.utf8_split_whitespace(pa.array([text], type=pa.large_string())).flatten()
    if text[-1:].isspace() and pieces[len(pieces) - 1].as_py() != "":
        # pyarrow 26 now and then keeps the text's final space in its last chunk ('\x00 ' for the
        # document mark; it depends on the memory after the buffer, not on the text): split here
        chunks = text.split()
        uniques = list(dict.fromkeys(chunks))
        where = {chunk: i for i, chunk in enumerate(uniques)}
        return uniques, np.array([where[c] for c in chunks], dtype=np.int64)
    encoded = pieces.dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


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
