"""Fill-mask prediction in the Hugging Face pipeline's exact output shapes, without its overhead.

`transformers.pipeline("fill-mask")` runs the full vocabulary projection at every position of every
input, one input at a time through its data loader. `FillMaskPredictor` does the work of a whole
batch at once and keeps Python out of the per-sentence path:

- `encode` (`FillMaskEncoder`, which needs no model): the texts of a request in one `encode_batch`
  call (Rust, on all cores), as one `InputGroup` (`encode_group`: four flat arrays, no object per
  text), which is also what the service queues and `launch_groups` runs;
- `run`: the batch's input tensors built once with numpy, one forward pass with the head on the
  [MASK] positions only, top-k (and targets) for every mask of the batch in one device operation and
  one device→host copy; lengths are rounded up to buckets so shapes repeat, and on CUDA each bucket's
  forward pass is replayed from a CUDA graph (`cuda_graphs`; on a CPU the same code runs eagerly);
  `run` is `launch` (queue all of it on the device, results copied into pinned host memory behind
  a CUDA event) then `collect` (wait for the event, slice per input), so a caller can prepare or
  format another batch while the device computes;
- `FillMaskFormatter.format`: the pipeline's output, with token strings from a table made at load
  time and each candidate's `sequence` spliced from the tokens' decoded pieces (the text before the
  mask + the candidate + the text after), not decoded once per candidate.

Results match the pipeline's: one mask gives a list of candidates, several masks give a list per
mask (whose `sequence` keeps the special tokens, as the pipeline's does), highest score first. The
service (`serve/`) uses `encode` → `run` → `format` to batch requests that arrive separately;
`predict` chains them for a list of texts.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tokenizers import Tokenizer, decoders

from microbert.checkpoint import Artifact, load_artifact
from microbert.errors import InputError, InputTooLongError
from microbert.model import BertForMaskedLM
from microbert.tokenizer import load_tokenizer

log = logging.getLogger("microbert.predict")


class EmptyInputError(InputError):
    """A text that is empty or only whitespace."""


class NoMaskError(InputError):
    """A text without the mask token."""


class InvalidTextError(InputError):
    """A text that is not valid Unicode (a lone surrogate): it cannot be encoded as UTF-8."""


class Candidate(TypedDict):
    score: float
    token: int
    token_str: str
    sequence: str


# One text's answer: a list of candidates (one mask) or a list of such lists (several masks).
FillMaskResult = list[Candidate] | list[list[Candidate]]


@dataclass
class PreparedInput:
    """A validated, tokenized text and what to predict for it."""

    ids: np.ndarray  # (T,) int64 token ids, [CLS] … [SEP]
    mask_positions: np.ndarray  # (m,) int64 positions of the mask token in ids
    top_k: int = 5
    target_ids: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_masks(self) -> int:
        return len(self.mask_positions)


@dataclass
class ModelOutput:
    """The model's answer for one input: probabilities and ids of its top-k, per mask."""

    scores: np.ndarray  # (m, k) float32, highest first
    token_ids: np.ndarray  # (m, k) int64


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _bounds(counts: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each of consecutive slices `counts` long: per-input views of a group's arrays."""
    ends = np.cumsum(counts).tolist()
    return list(zip([0, *ends][: len(ends)], ends, strict=True))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the slices [start, start + length) end to end, with no Python loop."""
    total = int(lengths.sum())
    return np.repeat(starts - _starts(lengths), lengths) + np.arange(total)


@dataclass
class InputGroup:
    """Inputs that travel, queue and run together (one request's, or one batch of `predict`'s) as
    four flat arrays, with no object per input: what keeps per-sentence Python off the path from the
    tokenizer to the device. They share `top_k` and `target_ids` (a request's inputs do)."""

    ids: np.ndarray  # (N,) int64: every input's token ids, end to end
    lengths: np.ndarray  # (n,) int64: tokens per input
    mask_positions: np.ndarray  # (M,) int64: each input's mask positions, within the input
    mask_counts: np.ndarray  # (n,) int64: masks per input
    top_k: int = 5
    target_ids: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_masks(self) -> int:
        return len(self.mask_positions)

    @classmethod
    def of(cls, inputs: Sequence[PreparedInput]) -> InputGroup:
        """Inputs that share top_k and targets, as one group (their arrays concatenated)."""
        if not inputs:
            empty = np.zeros(0, np.int64)
            return cls(empty, empty, empty, empty)
        first = inputs[0]
        if any(p.top_k != first.top_k or p.target_ids != first.target_ids for p in inputs):
            raise ValueError("the inputs of a group share top_k and targets")
        return cls(
            ids=np.concatenate([p.ids for p in inputs]),
            lengths=np.fromiter((len(p.ids) for p in inputs), dtype=np.int64, count=len(inputs)),
            mask_positions=np.concatenate([p.mask_positions for p in inputs]),
            mask_counts=np.fromiter(
                (len(p.mask_positions) for p in inputs), dtype=np.int64, count=len(inputs)
            ),
            top_k=first.top_k,
            target_ids=first.target_ids,
        )

    def inputs(self) -> list[PreparedInput]:
        """One `PreparedInput` per input (views of the group's arrays), for formatting."""
        if len(self) == 1:
            return [PreparedInput(self.ids, self.mask_positions, self.top_k, self.target_ids)]
        ids, positions = self.ids, self.mask_positions
        return [
            PreparedInput(ids[start:end], positions[m_start:m_end], self.top_k, self.target_ids)
            for (start, end), (m_start, m_end) in zip(
                _bounds(self.lengths), _bounds(self.mask_counts), strict=True
            )
        ]

    def take(self, order: np.ndarray | Sequence[int]) -> InputGroup:
        """The inputs at `order` (indices), in that order, as a group (one gather per array)."""
        order = np.asarray(order, dtype=np.int64)
        lengths, counts = self.lengths[order], self.mask_counts[order]
        return InputGroup(
            ids=self.ids[_ranges(_starts(self.lengths)[order], lengths)],
            lengths=lengths,
            mask_positions=self.mask_positions[_ranges(_starts(self.mask_counts)[order], counts)],
            mask_counts=counts,
            top_k=self.top_k,
            target_ids=self.target_ids,
        )

    def split(self, size: int) -> list[InputGroup]:
        """Consecutive groups of at most `size` inputs (the whole group when it is not larger)."""
        if len(self) <= size:
            return [self]
        return [
            self.take(np.arange(start, min(start + size, len(self)))) for start in range(0, len(self), size)
        ]


@dataclass
class GroupOutput:
    """The model's answer for an `InputGroup`: every mask's top-k, the group's masks in order."""

    scores: np.ndarray  # (M, k) float32, highest first
    token_ids: np.ndarray  # (M, k) int64
    mask_counts: np.ndarray  # (n,) int64: masks per input

    def outputs(self) -> list[ModelOutput]:
        """One `ModelOutput` per input (views)."""
        if len(self.mask_counts) == 1:
            return [ModelOutput(self.scores, self.token_ids)]
        return [
            ModelOutput(self.scores[start:end], self.token_ids[start:end])
            for start, end in _bounds(self.mask_counts)
        ]

    @classmethod
    def joined(cls, parts: Sequence[GroupOutput]) -> GroupOutput:
        """The outputs of a group's consecutive parts (`InputGroup.split`) as the group's."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64), np.zeros(0, np.int64))
        return cls(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.token_ids for p in parts]),
            np.concatenate([p.mask_counts for p in parts]),
        )


@dataclass
class PendingOutputs:
    """A launched batch (`FillMaskPredictor.launch`): its results arrive in `results` (host memory,
    (2, M, k): scores, then ids as floats) once `done` has fired; `collect` waits and slices them."""

    groups: Sequence[InputGroup]
    results: torch.Tensor | None  # None for an empty batch
    done: torch.cuda.Event | None  # None when the results are already there (a CPU)
    keep: torch.Tensor | None = field(default=None, repr=False)  # the pinned inputs, until copied


# `predict` sorts texts by length within windows of this many batches: padding stays low, and
# the next window is tokenized while the device runs.
_SORT_WINDOW = 4

# `encode_batch`/`decode_batch` hand work to a thread pool: worth it for many texts, but for a few a
# plain loop is faster (measured: 0.3-0.7 ms of pool overhead per call on a busy 2-core machine).
_BATCH_CALL = 32


# The replacements `transformers` applies after decoding when `clean_up_tokenization_spaces` is set.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
# One scan finds whether any of them applies; most sequences need none (the decoder cleaned them).
_CLEAN_UP_NEEDED = re.compile("|".join(re.escape(before) for before, _ in _CLEAN_UP))
# A match of one of them reaches at most this many characters beyond any character it covers.
_CLEAN_UP_REACH = max(len(before) for before, _ in _CLEAN_UP) - 1


def clean_up_tokenization(text: str) -> str:
    """The clean-up `transformers` applies after decoding when `clean_up_tokenization_spaces` is set."""
    if _CLEAN_UP_NEEDED.search(text) is None:  # no replacement would change anything
        return text
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text


# Lengths are padded to a multiple of 8 up to 64 tokens, and of 32 beyond.
_BUCKET_STEPS = (8, 32, 64)


def bucket_length(num_tokens: int) -> int:
    """Padded length of a batch whose longest input has `num_tokens`: few distinct shapes, little padding."""
    small, large, switch = _BUCKET_STEPS
    multiple = small if num_tokens <= switch else large
    return -(-num_tokens // multiple) * multiple


def bucket_lengths(num_tokens: np.ndarray) -> np.ndarray:
    """`bucket_length` of each of many lengths, in one numpy pass."""
    small, large, switch = _BUCKET_STEPS
    multiple = np.where(num_tokens <= switch, small, large)
    return -(-num_tokens // multiple) * multiple


def bucket_count(count: int) -> int:
    """Rows (inputs or masks) of a CUDA-graph batch: the next power of two."""
    return 1 << max(0, count - 1).bit_length()


_TOP_K_BLOCK = 128


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs.topk(k, dim=-1)` (values ≥ 0), faster on a CPU for the small k fill-mask asks for.

    A CPU top-k over a 30,522-token row costs ~40-70 µs; the row's maximum per block of 128 is a
    fast reduction, and the k best values all lie in the k blocks with the best maxima (a value in
    another block has k larger values above it), so a top-k of those k × 128 candidates is the same
    answer: ~13 µs a row in a batch of 16, 2.5× faster than the plain top-k from 16 to 1,024 rows
    (measured, one thread; bench/NOTES.md, session 20). The blocks are views of the rows, not a
    padded copy; the last, short block's missing entries read as -1, below any probability. One
    row is as fast plain; a GPU's top-k is fast as it is.
    """
    rows, size = probs.shape
    full, blocks = size // _TOP_K_BLOCK, -(-size // _TOP_K_BLOCK)
    if probs.device.type != "cpu" or k > 8 or blocks < 4 * k or rows < 2:
        return probs.topk(k, dim=-1)
    maxima = probs.new_empty(rows, blocks)
    torch.amax(probs[:, : full * _TOP_K_BLOCK].view(rows, full, _TOP_K_BLOCK), dim=-1, out=maxima[:, :full])
    if blocks > full:
        torch.amax(probs[:, full * _TOP_K_BLOCK :], dim=-1, keepdim=True, out=maxima[:, full:])
    best_blocks = maxima.topk(k, dim=-1).indices  # (rows, k)
    within = torch.arange(_TOP_K_BLOCK, device=probs.device)
    ids = (best_blocks[:, :, None] * _TOP_K_BLOCK + within).view(rows, k * _TOP_K_BLOCK)
    candidates = probs.gather(1, ids.clamp(max=size - 1)).masked_fill_(ids >= size, -1.0)
    values, where = candidates.topk(k, dim=-1)  # (rows, k)
    return values, ids.gather(1, where)


def mask_count(text: str, mask_token: str) -> int:
    """[MASK]s in a text, before tokenizing it: the mask is a special token, matched literally."""
    return text.count(mask_token)


class _Pieces:
    """Each token's text as the decoder writes it at the start of a sequence and after another token.

    WordPiece's decoder (and no decoder: tokens joined by spaces) writes every token on its own,
    so a decoded sequence is its tokens' pieces end to end, and a candidate's `sequence` is the text
    before the mask, the candidate's piece and the text after: a string concatenation per candidate
    instead of a decode. The pieces come from the tokenizer's own `decode`, so its prefix and
    clean-up settings are the ones used. Other decoders (byte-level BPE, Metaspace) are not
    piecewise: `_Pieces.of` gives None for them and the formatter decodes each candidate.
    """

    def __init__(self, first: list[str], after: list[str], special: list[bool], pad_token_id: int):
        self.first = first  # id → its text at the start of a sequence
        self.after = after  # id → its text after another token
        self.special = special  # id → dropped by skip_special_tokens
        self.pad_token_id = pad_token_id
        # id → written at all: [PAD] never is (as the pipeline drops it); specials only when kept.
        self.kept = [i != pad_token_id for i in range(len(first))]
        self.kept_skipping = [k and not sp for k, sp in zip(self.kept, special, strict=True)]

    @classmethod
    def of(cls, tokenizer: Tokenizer, first: list[str], pad_token_id: int) -> _Pieces | None:
        decoder = tokenizer.decoder
        if decoder is not None and not isinstance(decoder, decoders.WordPiece):
            return None
        size = len(first)
        special = [False] * size
        for token_id, token in tokenizer.get_added_tokens_decoder().items():
            if token_id < size:
                special[token_id] = token.special
        anchor = next((i for i in range(size) if not special[i] and first[i]), None)
        if anchor is None:
            return None
        pairs = tokenizer.decode_batch([[anchor, i] for i in range(size)], skip_special_tokens=False)
        start = first[anchor]
        if not all(pair.startswith(start) for pair in pairs):  # not piecewise after all: decode instead
            return None
        return cls(first, [pair[len(start) :] for pair in pairs], special, pad_token_id)

    def sequences(
        self,
        ids: list[int],
        position: int,
        candidates: list[int],
        skip_special: bool,
        clean_up: bool = False,
    ) -> list[str]:
        """The decoded `ids` with each candidate at `position`, [PAD]s dropped (as the pipeline does);
        `clean_up`: each passed through `clean_up_tokenization`.

        The candidates share the text before and after the mask, so the clean-up's scan for a
        pattern (at most `_CLEAN_UP_REACH` + 1 characters) runs on those once, and per candidate
        only on its piece with the few characters either side: a pattern in a sequence lies in
        one of those. Most sequences need no clean-up (the decoder cleaned each piece).
        """
        keep = self.kept_skipping if skip_special else self.kept
        first, after = self.first, self.after
        left = [t for t in ids[:position] if keep[t]]
        right = [t for t in ids[position + 1 :] if keep[t]]
        rest = "".join(map(after.__getitem__, right))
        if left:
            before = first[left[0]] + "".join(map(after.__getitem__, left[1:]))
            piece, dropped = after, before + rest
        else:
            before, piece = "", first
            dropped = first[right[0]] + "".join(map(after.__getitem__, right[1:])) if right else ""
        out = [before + piece[t] + rest if keep[t] else dropped for t in candidates]
        if not clean_up:
            return out
        # One scan of the shared text and one of every candidate's piece with its edges ("\0"
        # between them: no pattern matches across it). Where either finds a pattern, every
        # sequence is cleaned (a no-op for those without one), as `clean_up_tokenization` would.
        edge_before, edge_rest = before[-_CLEAN_UP_REACH:], rest[:_CLEAN_UP_REACH]
        scanned = [before, rest, *(edge_before + piece[t] + edge_rest for t in candidates if keep[t])]
        if len(scanned) < len(candidates) + 2:  # a dropped candidate: its sequence is scanned whole
            scanned.append(dropped)
        if _CLEAN_UP_NEEDED.search("\0".join(scanned)) is None:
            return out
        return [clean_up_tokenization(text) for text in out]


class FillMaskFormatter:
    """Turns model outputs into the pipeline's candidates; needs only the tokenizer (no model).

    The service's HTTP processes format with it while one model process runs the forward passes.
    """

    def __init__(self, tokenizer: Tokenizer, *, pad_token_id: int = 0, clean_up_tokenization_spaces: bool):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.clean_up = clean_up_tokenization_spaces
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        strings = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        self.token_strs: list[str] = [self._clean(s) for s in strings]  # id → token_str, as decode([id])
        self.pieces = _Pieces.of(tokenizer, strings, pad_token_id)

    @classmethod
    def from_folder(cls, folder: Path) -> FillMaskFormatter:
        """A formatter for an artifact folder's tokenizer (verified by whoever loaded its model)."""
        return cls(load_tokenizer(folder), clean_up_tokenization_spaces=_clean_up_setting(folder))

    def _clean(self, text: str) -> str:
        return clean_up_tokenization(text) if self.clean_up else text

    def _decode(self, rows: list[list[int]], skip_special_tokens: bool) -> list[str]:
        if len(rows) >= _BATCH_CALL:
            return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def _decoded(self, prepared: PreparedInput, output: ModelOutput) -> list[list[str]]:
        """Every candidate's sequence, per mask, by decoding (for decoders that are not piecewise)."""
        single = prepared.num_masks == 1
        m, k = output.token_ids.shape
        sequences = np.tile(prepared.ids, (m * k, 1))  # (m*k, T): the input once per candidate
        sequences[np.arange(m * k), np.repeat(prepared.mask_positions, k)] = output.token_ids.reshape(-1)
        rows = [row[row != self.pad_token_id].tolist() for row in sequences]
        decoded = self._decode(rows, single)
        return [decoded[i * k : (i + 1) * k] for i in range(m)]

    def format(self, items: Sequence[tuple[PreparedInput, ModelOutput]]) -> list[FillMaskResult]:
        """One result per input, highest score first; sequences spliced from token pieces."""
        results: list[FillMaskResult] = []
        table, pieces, clean_up = self.token_strs, self.pieces, self.clean_up
        for prepared, output in items:
            single = prepared.num_masks == 1
            token_ids = output.token_ids.tolist()
            if pieces is None:
                sequences = [
                    [self._clean(text) for text in texts] for texts in self._decoded(prepared, output)
                ]
            else:
                ids = prepared.ids.tolist()
                sequences = [
                    pieces.sequences(ids, position, tokens, single, clean_up)
                    for position, tokens in zip(prepared.mask_positions.tolist(), token_ids, strict=True)
                ]
            per_mask: list[list[Candidate]] = [
                [
                    {"score": score, "token": token, "token_str": table[token], "sequence": text}
                    for score, token, text in zip(scores, tokens, texts, strict=True)
                ]
                for scores, tokens, texts in zip(output.scores.tolist(), token_ids, sequences, strict=True)
            ]
            results.append(per_mask[0] if single else per_mask)
        return results


class FillMaskEncoder:
    """Validates and tokenizes texts for one model: needs only its tokenizer, mask token and longest
    input (no model), so the service's HTTP workers tokenize with one while a model process runs
    the forward passes."""

    def __init__(self, tokenizer: Tokenizer, *, mask_token: str = "[MASK]", max_length: int):
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.mask_token = mask_token
        mask_id = tokenizer.token_to_id(mask_token)
        if mask_id is None:
            raise InputError(f"the tokenizer has no mask token {mask_token!r}")
        self.mask_token_id: int = mask_id
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size()
        self.vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids without character offsets (tokenizers >= 0.21), which fill-mask never reads: 15% less
        # per text (measured: 45 against 53 µs for a 24-word sentence).
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def target_ids(self, targets: Sequence[str] | str) -> tuple[int, ...]:
        """Vocabulary ids for targets, as the pipeline resolves them (a word or its first piece)."""
        if isinstance(targets, str):
            targets = [targets]
        ids: list[int] = []
        for target in targets:
            if not isinstance(target, str) or not target.strip():
                raise InputError(f"targets must be non-empty words, got {target!r}")
            token_id = self.vocab.get(target)
            if token_id is None:
                pieces = self.tokenizer.encode(_checked_text(target, "target"), add_special_tokens=False).ids
                if not pieces:
                    raise InputError(f"target {target!r} has no token in the vocabulary")
                token_id = pieces[0]
            if token_id not in ids:
                ids.append(token_id)
        if not ids:
            raise InputError("targets is empty: give at least one word, or leave it out")
        return tuple(ids)

    def check(self, texts: Sequence[str], *, top_k: int = 5) -> None:
        """The checks that need no tokenizing (top_k, empty or invalid texts); the first problem raises."""
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise _at(EmptyInputError("input text is empty"), i)
            _at_index(_checked_text, text, "input", i)

    def encode(
        self,
        texts: Sequence[str],
        *,
        top_k: int = 5,
        target_ids: tuple[int, ...] | None = None,
        checked: bool = False,
    ) -> list[PreparedInput]:
        """`encode_group`, one `PreparedInput` per text."""
        return self.encode_group(texts, top_k=top_k, target_ids=target_ids, checked=checked).inputs()

    def encode_group(
        self,
        texts: Sequence[str],
        *,
        top_k: int = 5,
        target_ids: tuple[int, ...] | None = None,
        checked: bool = False,
    ) -> InputGroup:
        """Tokenize and check every text in one `encode_batch` call; the first problem raises, naming it.
        `checked`: `check` has already passed these texts."""
        if not checked:
            self.check(texts, top_k=top_k)
        k = min(top_k, len(target_ids) if target_ids else self.vocab_size)
        if not texts:
            return InputGroup.of([])
        encode_batch = self._encode_batch
        encodings = (
            encode_batch(list(texts))
            if len(texts) >= _BATCH_CALL
            else [encode_batch([text])[0] for text in texts]
        )
        if len(encodings) == 1:  # a single sentence: two numpy calls, not the batch's dozen
            ids = np.asarray(encodings[0].ids, dtype=np.int64)
            positions = np.flatnonzero(ids == self.mask_token_id)
            if not len(positions) or len(ids) > self.max_length:
                self._refuse(0, len(positions), len(ids))
            counts = np.array([len(ids), len(positions)], dtype=np.int64)
            return InputGroup(ids, counts[:1], positions, counts[1:], k, target_ids)
        # The whole request's ids in one array, and its masks found in one pass (no numpy call per text).
        id_lists = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ends = np.cumsum(lengths)
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(ends[-1]))
        masked = np.flatnonzero(flat == self.mask_token_id)  # (all masks,) positions in `flat`
        owner = np.searchsorted(ends, masked, side="right")  # the input each mask is in
        counts = np.bincount(owner, minlength=len(id_lists))
        bad = np.flatnonzero((counts == 0) | (lengths > self.max_length))
        if len(bad):
            self._refuse(int(bad[0]), int(counts[bad[0]]), int(lengths[bad[0]]))
        positions = masked - (ends - lengths)[owner]  # within each input
        return InputGroup(flat, lengths, positions, counts.astype(np.int64), k, target_ids)

    def _refuse(self, index: int, masks: int, num_tokens: int) -> None:
        """The error for input `index`: no mask first, then too long (the order the checks had)."""
        if not masks:
            raise _at(
                NoMaskError(
                    f"no {self.mask_token} in input: put {self.mask_token} where a word should be predicted"
                ),
                index,
            )
        raise _at(
            InputTooLongError(
                f"input has {num_tokens} tokens; the model accepts at most {self.max_length} "
                "(including [CLS] and [SEP])",
                num_tokens=num_tokens,
                max_tokens=self.max_length,
            ),
            index,
        )


class _CudaGraphs:
    """The forward pass of each (batch, length, masks) bucket captured once as a CUDA graph, then replayed.

    A bert-base pass over a small batch is a few hundred kernel launches that take longer to issue
    than to run; a replay issues them in one call. Graphs share one memory pool (replays run one at
    a time, on one stream). Capture failure or more than `max_graphs` shapes: eager from then on.
    """

    def __init__(self, model: BertForMaskedLM, max_graphs: int = 64):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        key = (*inputs[0].shape, inputs[2].shape[0])
        entry = self.graphs.get(key)
        if entry is None:
            if self.failed or len(self.graphs) >= self.max_graphs:
                return _forward(self.model, inputs)
            started = time.perf_counter()
            try:
                entry = self._capture(inputs)
            except Exception as exc:  # an op that cannot be captured: eager is still correct
                log.warning("CUDA graph capture failed (%s); running eagerly from now on", exc)
                self.failed = True
                return _forward(self.model, inputs)
            self.graphs[key] = entry
            # A capture stalls the passes behind it: say which shape and how long (one line per shape).
            log.info(
                "captured a CUDA graph for %d inputs × %d tokens, %d masks in %.0f ms (%d of at most %d)",
                *key, 1000 * (time.perf_counter() - started), len(self.graphs), self.max_graphs,
            )  # fmt: skip
        static, output, graph = entry
        for target, source in zip(static, inputs, strict=True):
            target.copy_(source, non_blocking=True)
        graph.replay()
        return output

    def _capture(
        self, inputs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]:
        static = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: lazy initialisation, cuBLAS workspaces
                _forward(self.model, static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a reload capturing its graphs must not trip over the serving thread's launches.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = _forward(self.model, static)
        return static, output, graph


def _forward(model: BertForMaskedLM, inputs: list[torch.Tensor]) -> torch.Tensor:
    input_ids, attention_mask, rows, cols = inputs
    return model(input_ids, attention_mask, positions=(rows, cols)).logits  # (M, V)


class FillMaskPredictor:
    def __init__(
        self,
        model: BertForMaskedLM,
        tokenizer: Tokenizer,
        *,
        mask_token: str = "[MASK]",
        clean_up_tokenization_spaces: bool = True,
        max_length: int | None = None,
        cuda_graphs: bool = True,
        bucket_rows: bool | None = None,
    ):
        """`cuda_graphs`: on a CUDA device, replay each bucket's forward pass from a CUDA graph.
        `bucket_rows`: round the batch's rows and mask slots up to powers of two as graphs need
        (default: when graphs are used); a CPU runs the same padded shapes eagerly when asked."""
        self.model = model.eval()
        self.model.keep_padded_decoder()  # on a GPU, the output layer padded once, not per pass
        self.tokenizer = tokenizer
        self.mask_token = mask_token
        positions = model.config.max_position_embeddings
        self.encoder = FillMaskEncoder(
            tokenizer, mask_token=mask_token, max_length=min(max_length or positions, positions)
        )
        self.mask_token_id = self.encoder.mask_token_id
        self.pad_token_id = model.config.pad_token_id
        self.formatter = FillMaskFormatter(
            tokenizer,
            pad_token_id=self.pad_token_id,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )
        # Graphs pay on CUDA, where launches cost more than small kernels; a CPU has no launches.
        self._graphs = _CudaGraphs(self.model) if cuda_graphs and self.device.type == "cuda" else None
        self.bucket_rows = self._graphs is not None if bucket_rows is None else bucket_rows
        self._tokenizer_thread: ThreadPoolExecutor | None = None

    @classmethod
    def from_artifact(cls, artifact: Artifact, **kwargs: Any) -> FillMaskPredictor:
        return cls(artifact.model, artifact.tokenizer, mask_token=artifact.mask_token, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> FillMaskPredictor:
        """Load a run folder's newest export or an artifact folder (MicroBERT or `transformers`)."""
        artifact = load_artifact(path, device=device, dtype=dtype)
        clean_up = _clean_up_setting(artifact.path)
        return cls.from_artifact(artifact, clean_up_tokenization_spaces=clean_up, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- step 1: validate and tokenize (the encoder's) ---------------------------------------------
    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        self.encoder.max_length = value

    def target_ids(self, targets: Sequence[str] | str) -> tuple[int, ...]:
        return self.encoder.target_ids(targets)

    def encode(
        self, texts: Sequence[str], *, top_k: int = 5, target_ids: tuple[int, ...] | None = None
    ) -> list[PreparedInput]:
        return self.encoder.encode(texts, top_k=top_k, target_ids=target_ids)

    def prepare(
        self, text: str, *, top_k: int = 5, target_ids: tuple[int, ...] | None = None
    ) -> PreparedInput:
        return self.encoder.encode([text], top_k=top_k, target_ids=target_ids)[0]

    # --- step 2: the model, batched ----------------------------------------------------------------
    def run(self, batch: Sequence[PreparedInput]) -> list[ModelOutput]:
        """Each input's top-k scores and token ids, per mask, from one forward pass over the batch."""
        return self.collect(self.launch(batch))

    def launch(self, batch: Sequence[PreparedInput]) -> PendingOutputs:
        """`launch_groups` for inputs one by one (consecutive ones that share top_k and targets
        become one group)."""
        groups = [
            InputGroup.of(list(run))
            for _, run in itertools.groupby(batch, key=lambda p: (p.top_k, p.target_ids))
        ]
        return self.launch_groups(groups)

    @torch.inference_mode()
    def launch_groups(self, groups: Sequence[InputGroup]) -> PendingOutputs:
        """Queue one forward pass over every input of `groups` on the device and return without waiting.

        Inputs travel in one pinned host buffer and one copy; the forward pass (or its CUDA graph's
        replay), softmax, top-k and the copy of the results into pinned host memory are queued on
        the current stream, and a CUDA event marks their end. The results are copied out of the
        graph's static buffers before this returns (in stream order), so the next launch, which
        replays into the same buffers, cannot overwrite them. On a CPU every step runs here, in
        full: the same code, no overlap. The host's work is a few numpy calls per group, none per
        input.
        """
        groups = [g for g in groups if len(g)]
        if not groups:
            return PendingOutputs([], None, None)
        device = self.device
        cuda = device.type == "cuda"
        if len(groups) == 1:
            (group,) = groups
            lengths, masks, flat, positions = (
                group.lengths,
                group.mask_counts,
                group.ids,
                group.mask_positions,
            )
        else:
            lengths = np.concatenate([g.lengths for g in groups])
            masks = np.concatenate([g.mask_counts for g in groups])
            flat = np.concatenate([g.ids for g in groups])  # (N,)
            positions = np.concatenate([g.mask_positions for g in groups])
        inputs_n = len(lengths)
        rows_b, length, real = inputs_n, bucket_length(int(lengths.max())), len(positions)
        rows_m = real
        if self.bucket_rows:
            rows_b, rows_m = bucket_count(rows_b), bucket_count(rows_m)
        # One host buffer for all four inputs: (B*T ids, B*T attention, M rows, M columns).
        size = rows_b * length
        host = torch.empty(2 * size + 2 * rows_m, dtype=torch.int64, pin_memory=cuda)
        buffer = host.numpy()
        input_ids = buffer[:size].reshape(rows_b, length)
        attention_mask = buffer[size : 2 * size].reshape(rows_b, length)
        mask_rows, mask_cols = buffer[2 * size : 2 * size + rows_m], buffer[2 * size + rows_m :]
        token_row = np.repeat(np.arange(inputs_n), lengths)
        token_col = np.arange(len(flat)) - np.repeat(_starts(lengths), lengths)
        input_ids.fill(self.pad_token_id)
        input_ids[token_row, token_col] = flat
        attention_mask.fill(0)
        attention_mask[token_row, token_col] = 1
        attention_mask[inputs_n:, 0] = 1  # padding rows of a bucket: one token, so softmax is defined
        mask_rows.fill(0)  # padding slots read position (0, 0), then are dropped
        mask_cols.fill(0)
        mask_rows[:real] = np.repeat(np.arange(inputs_n), masks)
        mask_cols[:real] = positions
        on_device = host.to(device, non_blocking=True)
        tensors = [
            on_device[:size].view(rows_b, length),
            on_device[size : 2 * size].view(rows_b, length),
            on_device[2 * size : 2 * size + rows_m],
            on_device[2 * size + rows_m :],
        ]
        logits = (self._graphs or (lambda x: _forward(self.model, x)))(tensors)[:real]  # (M, V)
        k = max(g.top_k for g in groups)
        # Softmax over the whole vocabulary, then top-k of the probabilities, as the pipeline does: one
        # fused pass and one top-k (measured on a CPU: 20% less than logsumexp beside a top-k of logits).
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # (M, V)
        if any(g.target_ids is not None for g in groups):
            probs = self._only_targets(probs, groups, device)
        top_probs, top_ids = top_k(probs, k)  # (M, k): one top-k for every mask of the batch
        # Ids travel as float32 beside the scores (exact below 2**24), so one copy brings both back.
        both = torch.stack((top_probs, top_ids.float()))  # (2, M, k)
        if not cuda:
            return PendingOutputs(groups, both, None)
        out = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        out.copy_(both, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        # `host` stays referenced until the copy that reads it has run (the event is after it).
        return PendingOutputs(groups, out, done, keep=host)

    def collect(self, pending: PendingOutputs) -> list[ModelOutput]:
        """Wait for a launched batch's results and slice them per input."""
        return [output for group in self.collect_groups(pending) for output in group.outputs()]

    def collect_groups(self, pending: PendingOutputs) -> list[GroupOutput]:
        """Wait for a launched batch's results and slice them per group."""
        if pending.results is None:
            return []
        if pending.done is not None:
            pending.done.synchronize()
        both = pending.results.numpy()
        scores, ids = both[0], both[1].astype(np.int64)
        outputs, start = [], 0
        for g in pending.groups:
            end = start + g.num_masks
            outputs.append(
                GroupOutput(scores[start:end, : g.top_k], ids[start:end, : g.top_k], g.mask_counts)
            )
            start = end
        return outputs

    def _only_targets(
        self, probs: torch.Tensor, groups: Sequence[InputGroup], device: torch.device
    ) -> torch.Tensor:
        """Rows of groups with targets keep only their targets' probabilities (the rest -1, below any);
        other rows untouched."""
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        keep = np.ones(len(probs), dtype=bool)
        start = 0
        for g in groups:
            end = start + g.num_masks
            if g.target_ids is not None:
                keep[start:end] = False
                targets = np.asarray(g.target_ids, dtype=np.int64)
                rows.append(np.repeat(np.arange(start, end), len(targets)))
                cols.append(np.tile(targets, end - start))
            start = end
        allowed = torch.from_numpy(keep).to(device)[:, None].expand_as(probs).clone()
        allowed[
            torch.from_numpy(np.concatenate(rows)).to(device),
            torch.from_numpy(np.concatenate(cols)).to(device),
        ] = True
        return probs.masked_fill(~allowed, -1.0)

    # --- step 3: the pipeline's output shape -----------------------------------------------------
    def format(self, items: Sequence[tuple[PreparedInput, ModelOutput]]) -> list[FillMaskResult]:
        return self.formatter.format(items)

    # --- all three ----------------------------------------------------------------------------------
    def predict(
        self,
        texts: str | Sequence[str],
        *,
        top_k: int = 5,
        targets: Sequence[str] | None = None,
        batch_size: int = 64,
    ) -> list[FillMaskResult]:
        """One result per text.

        Texts are tokenized in windows of `_SORT_WINDOW` batches and sorted by length within each,
        to keep padding low. The host and the device overlap: batch n+1 is launched before batch n
        is formatted, so on a GPU the card's time hides under the host's (on a CPU `launch` does
        the work itself: the same results); and the next window is tokenized in a thread meanwhile.
        """
        if isinstance(texts, str):
            texts = [texts]
        target_ids = self.target_ids(targets) if targets is not None else None
        self.encoder.check(texts, top_k=top_k)  # every text's own problem first, before any model work
        results: list[FillMaskResult | None] = [None] * len(texts)
        pending: tuple[np.ndarray, PendingOutputs] | None = None
        for chunk, group in self._batches(texts, top_k, target_ids, batch_size):
            launched = chunk, self.launch_groups([group])  # queued behind the previous batch on the device
            if pending is not None:
                self._place(results, *pending)  # formats batch n while the device runs batch n+1
            pending = launched
        if pending is not None:
            self._place(results, *pending)
        return [r for r in results if r is not None]

    def _batches(
        self,
        texts: Sequence[str],
        top_k: int,
        target_ids: tuple[int, ...] | None,
        batch_size: int,
    ) -> Iterator[tuple[np.ndarray, InputGroup]]:
        """(indices into `texts`, their inputs) per batch. While one window's batches are launched and
        formatted, the next window is tokenized in a thread (`encode_batch` works in Rust without
        the GIL), so the host's two largest shares run side by side."""
        window = batch_size * _SORT_WINDOW
        offsets = range(0, len(texts), window)

        def encode(offset: int) -> InputGroup:
            try:
                return self.encoder.encode_group(
                    texts[offset : offset + window], top_k=top_k, target_ids=target_ids, checked=True
                )
            except InputError as exc:
                raise _at(exc, getattr(exc, "index", 0) + offset) from None

        upcoming: Future[InputGroup] | None = None
        for n, offset in enumerate(offsets):
            group = encode(offset) if upcoming is None else upcoming.result()
            upcoming = None
            if n + 1 < len(offsets):
                upcoming = self._tokenizing().submit(encode, offsets[n + 1])
            order = np.argsort(group.lengths, kind="stable")
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                yield offset + chunk, group.take(chunk)

    def _tokenizing(self) -> ThreadPoolExecutor:
        """The thread that tokenizes `predict`'s next window (made on first use)."""
        if self._tokenizer_thread is None:
            self._tokenizer_thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="microbert-tokenize"
            )
        return self._tokenizer_thread

    def _place(
        self, results: list[FillMaskResult | None], chunk: np.ndarray, pending: PendingOutputs
    ) -> None:
        (group,) = pending.groups
        (output,) = self.collect_groups(pending)
        formatted = self.format(list(zip(group.inputs(), output.outputs(), strict=True)))
        for i, result in zip(chunk.tolist(), formatted, strict=True):
            results[i] = result


def _checked_text(text: str, what: str) -> str:
    """Text that can be encoded as UTF-8 (JSON's "\\ud800" decodes to a lone surrogate, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTextError(
            f"{what} is not valid Unicode (a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}): send UTF-8 text"
        ) from None
    return text


def _at(error: InputError, index: int) -> InputError:
    """Note which input of a batch an error is about (`index`), for callers that name it."""
    error.index = index  # type: ignore[attr-defined]
    return error


def _at_index(check: Any, text: str, what: str, index: int) -> None:
    try:
        check(text, what)
    except InputError as exc:
        raise _at(exc, index) from None


def _clean_up_setting(folder: Path) -> bool:
    """`clean_up_tokenization_spaces` from the folder's tokenizer config, as `transformers` reads it."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("clean_up_tokenization_spaces", False))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


__all__ = [
    "Candidate",
    "EmptyInputError",
    "FillMaskEncoder",
    "FillMaskFormatter",
    "FillMaskPredictor",
    "FillMaskResult",
    "GroupOutput",
    "InputGroup",
    "InvalidTextError",
    "ModelOutput",
    "NoMaskError",
    "PendingOutputs",
    "PreparedInput",
    "bucket_length",
    "bucket_lengths",
    "clean_up_tokenization",
    "mask_count",
    "top_k",
]
