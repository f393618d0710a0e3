"""Encoder and Packer: the chunk-cached encoder gives exactly what `tokenizers` gives."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from microbert.data.encode import Encoder, Packer, chunk_local

ODD_TEXTS = [
    "Héllo wörld! \x0bcafé\x1cBAR -- (parenthesised), 'quoted'; semi:colon",
    "中文字符 mixed中文 text and ΣΊΣΥΦΟΣ naïve — “curly quotes” …",
    "a\u200bb  c\u00a0d\u2028e\tf\r\ng",
    "x" * 150 + " a-very-long-word-" * 3,
    "\x85starts with a control, ends with NUL\x00",
    "",
    "   ",
]


def _reference(tok: Tokenizer, docs: list[str], sep: int) -> np.ndarray:
    flat: list[int] = []
    for encoding in tok.encode_batch(docs, add_special_tokens=False):
        flat.extend(encoding.ids)
        flat.append(sep)
    return np.array(flat, dtype=np.int64)


def test_fast_encoder_equals_tokenizers(tiny_tokenizer: Tokenizer, sample_texts: list[str]) -> None:
    encoder = Encoder(tiny_tokenizer, dtype=np.uint16)
    assert encoder.fast and encoder.split_punctuation
    sep = tiny_tokenizer.token_to_id("[SEP]")
    for batch in (sample_texts[:500], sample_texts[500:1500], ODD_TEXTS, sample_texts[:500]):
        assert np.array_equal(encoder.encode(batch), _reference(tiny_tokenizer, batch, sep))


def test_documents_containing_the_boundary_marker(tiny_tokenizer: Tokenizer) -> None:
    docs = ["a NUL\x00inside", "plain text", "\x00"]
    encoder = Encoder(tiny_tokenizer, dtype=np.uint16)
    sep = tiny_tokenizer.token_to_id("[SEP]")
    assert np.array_equal(encoder.encode(docs), _reference(tiny_tokenizer, docs, sep))


def test_other_pre_tokenizers_fall_back_to_plain_encoding(tiny_tokenizer: Tokenizer) -> None:
    tok = Tokenizer.from_str(tiny_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # joins across whitespace: chunks are not independent
    assert not chunk_local(tok)
    encoder = Encoder(tok, dtype=np.uint16)
    assert not encoder.fast
    assert np.array_equal(encoder.encode(ODD_TEXTS), _reference(tok, ODD_TEXTS, tok.token_to_id("[SEP]")))


@pytest.mark.parametrize("seq_len", [8, 13])
def test_packer_rows_hold_the_stream_in_order(tiny_tokenizer: Tokenizer, seq_len: int) -> None:
    stream = np.arange(10, 10 + 101, dtype=np.uint16)
    packer = Packer(tiny_tokenizer, seq_len, np.uint16)
    rows = np.concatenate([packer.add(stream[:40]), packer.add(stream[40:]), packer.finish()])
    assert rows.shape[1] == seq_len
    assert (rows[:, 0] == 2).all()  # [CLS] opens every row
    assert (rows[:-1, -1] == 3).all()  # [SEP] closes every full row
    body = rows[:, 1:-1].ravel()
    assert np.array_equal(body[: len(stream)], stream)
    last = rows[-1]
    used = len(stream) % (seq_len - 2) or seq_len - 2
    assert last[used + 1] == 3 and (last[used + 2 :] == 0).all()  # the only padding is in the last row
    assert np.count_nonzero(rows == 0) < seq_len


def test_packer_carry_resumes_the_same_rows(tiny_tokenizer: Tokenizer) -> None:
    stream = np.arange(10, 200, dtype=np.uint16)
    whole = Packer(tiny_tokenizer, 16, np.uint16)
    expected = np.concatenate([whole.add(stream), whole.finish()])
    first = Packer(tiny_tokenizer, 16, np.uint16)
    head = first.add(stream[:77])
    second = Packer(tiny_tokenizer, 16, np.uint16, carry=first.carry.tolist())
    assert np.array_equal(np.concatenate([head, second.add(stream[77:]), second.finish()]), expected)
