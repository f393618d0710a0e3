"""Dynamic masking: 80/10/10, specials and padding never masked, reproducible from the generator."""

from __future__ import annotations

import torch

from microbert.data import continuation_token_mask, mask_tokens
from microbert.tokenizer import train_tokenizer

SPECIALS = [0, 1, 2, 3, 4]
VOCAB = 1000


def _batch(rows: int = 64, length: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[:, 0], ids[:, 60], ids[:, -1] = 2, 3, 3  # [CLS] ... [SEP] ... [SEP]
    ids[-1, 100:] = 0  # padding
    return ids


def _mask(ids: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(
        ids, vocab_size=VOCAB, mask_token_id=4, special_token_ids=SPECIALS, generator=g, **kwargs
    )


def test_rates_labels_and_specials() -> None:
    ids = _batch()
    original = ids.clone()
    masked, labels = _mask(ids)
    assert torch.equal(ids, original)  # the input is left alone
    chosen = labels != -100
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert not (chosen & special).any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.14 < rate < 0.16
    as_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    randomised = chosen & ~as_mask & ~unchanged
    n = chosen.sum().item()
    assert 0.77 < as_mask.sum().item() / n < 0.83
    assert 0.07 < unchanged.sum().item() / n < 0.13  # includes random draws that hit the same id
    assert 0.07 < randomised.sum().item() / n < 0.13
    assert (masked[randomised] >= 5).all() and (masked[randomised] < VOCAB).all()
    assert not ((masked == 4) & ~chosen).any()


def test_deterministic_given_the_generator() -> None:
    ids = _batch()
    a, b, c = _mask(ids, 7), _mask(ids, 7), _mask(ids, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_rate_is_configurable() -> None:
    _, labels = _mask(_batch(), mlm_probability=0.5)
    assert 0.47 < (labels != -100).float().mean().item() / 0.95 < 0.55


def test_whole_word_masking_takes_all_pieces_of_a_word() -> None:
    # a small vocabulary over long words: most words are several WordPiece pieces
    words = ["unbelievably", "extraordinary", "circumstances", "notwithstanding", "the", "a"]
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, 60)
    continues = continuation_token_mask(tokenizer)
    ids = torch.tensor([tokenizer.encode(" ".join(words * 30)).ids[:200]] * 8)
    assert continues[ids].any(), "the sample should contain multi-piece words"
    _, labels = mask_tokens(
        ids,
        vocab_size=tokenizer.get_vocab_size(),
        mask_token_id=4,
        special_token_ids=SPECIALS,
        generator=torch.Generator().manual_seed(0),
        whole_word_mask=continues,
    )
    chosen = labels != -100
    assert chosen.any()
    special = torch.isin(ids, torch.tensor(SPECIALS))
    # pairs (previous piece, continuation piece), neither special (an [UNK] is never masked)
    pair = continues[ids][:, 1:] & ~special[:, 1:] & ~special[:, :-1]
    assert pair.any()
    # a continuation piece is chosen exactly when the piece before it is
    assert torch.equal(chosen[:, 1:][pair], chosen[:, :-1][pair])
