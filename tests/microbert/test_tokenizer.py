import pytest

from microbert.errors import ConfigError
from microbert.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

transformers = pytest.importorskip("transformers")

TEXTS = ["Call me Ishmael. Some years ago—never mind how long precisely.", "Héllo, WORLD! Don't [MASK] me."]


def test_special_tokens_and_template(tiny_tokenizer):
    assert [tiny_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = tiny_tokenizer.encode("to be or not to be").ids
    assert ids[0] == 2 and ids[-1] == 3
    assert tiny_tokenizer.encode("to be [MASK] not").ids.count(4) == 1


@pytest.mark.parametrize("kind", ["wordpiece", "wordlevel"])
def test_transformers_autotokenizer_gives_identical_ids(tmp_path, sample_texts, kind):
    tok = train_tokenizer(sample_texts[:1500], vocab_size=800, kind=kind)
    written = save_tokenizer(tok, tmp_path)
    assert ("vocab.txt" in written) == (kind == "wordpiece")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + sample_texts[:50]:
        assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.mask_token == "[MASK]" and hf.pad_token_id == 0


def test_lowercase_is_an_option(sample_texts):
    cased = train_tokenizer(sample_texts[:500], vocab_size=600, lowercase=False)
    lower = train_tokenizer(sample_texts[:500], vocab_size=600)
    assert cased.encode("KING").tokens != lower.encode("KING").tokens
    assert lower.encode("KING").ids == lower.encode("king").ids


def test_round_trip_and_hash(tmp_path, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, tmp_path)
    again = load_tokenizer(tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(tiny_tokenizer)
    (tmp_path / "tokenizer.json").unlink()  # vocab.txt alone still gives the same ids
    assert load_tokenizer(tmp_path).encode(TEXTS[0]).ids == tiny_tokenizer.encode(TEXTS[0]).ids


def test_bad_input():
    with pytest.raises(ConfigError, match="kind"):
        train_tokenizer(["a b c"], vocab_size=100, kind="bpe")
    with pytest.raises(ConfigError, match="empty"):
        train_tokenizer(["", "   "], vocab_size=100)
