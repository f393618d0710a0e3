"""Dynamic MLM masking (BERT's 80/10/10), done on the batch's own device.

Masking at batch time rather than in the cache means every epoch sees new masks, and doing it on
the GPU keeps the loader down to slicing arrays. All random draws come from one generator, so a
batch's masks are reproducible from the generator state alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers) skips


@functools.lru_cache(maxsize=16)
def _id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The special ids on the device, made once: a per-step copy from host memory would make the
    CPU wait for the GPU's queue to drain (pageable copies are synchronous)."""
    return torch.tensor(ids, dtype=torch.long, device=device)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: Sequence[int],
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
    whole_word_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch for MLM: returns (masked input_ids, labels), both (B, T) long.

    Each maskable position (not a special token, not padding) is chosen with probability
    `mlm_probability`; a chosen position becomes [MASK] 80% of the time, a random ordinary token 10%,
    and stays as it is 10%. Labels hold the original id at chosen positions and -100 elsewhere.
    `whole_word_mask` — a (vocab_size,) bool tensor, True for tokens that continue a word (`##ing`),
    from `continuation_token_mask` — makes the choice per word: all pieces of a word or none.
    The input is not modified. `generator` must live on the input's device.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    device = input_ids.device
    input_ids = input_ids.long()
    special_ids = list(special_token_ids)
    specials = _id_tensor(tuple(special_ids), device)
    maskable = ~torch.isin(input_ids, specials)  # (B, T); padding is a special token
    draw = torch.rand(input_ids.shape, device=device, generator=generator)  # (B, T)
    if whole_word_mask is not None:
        continues = whole_word_mask.to(device)[input_ids] & maskable  # (B, T)
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        word_start = torch.where(continues, 0, positions).cummax(dim=1).values  # (B, T)
        draw = draw.gather(1, word_start)  # every piece takes its word's first draw
    chosen = maskable & (draw < mlm_probability)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, device=device, generator=generator)  # (B, T)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    # random replacements are ordinary tokens: ids above the specials (which are 0..4 in MicroBERT)
    low = max(special_ids) + 1 if special_ids else 0  # from the list: no device sync
    random_ids = torch.randint(low, vocab_size, input_ids.shape, device=device, generator=generator)
    masked = torch.where(to_mask, mask_token_id, input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def continuation_token_mask(tokenizer: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(vocab_size,) bool: True for WordPiece tokens that continue a word (`##…`)."""
    size = vocab_size or tokenizer.get_vocab_size()
    mask = torch.zeros(size, dtype=torch.bool)
    for token, token_id in tokenizer.get_vocab().items():
        if token.startswith("##") and token_id < size:
            mask[token_id] = True
    return mask
