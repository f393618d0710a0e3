"""The data pipeline: text sources -> tokenized, packed shard cache -> masked batches.

    from microbert.data import prepare_dataset, PreparedDataset, mask_tokens, ShardLoader

    ds = prepare_dataset("embedded", seq_len=128, vocab_size=8000)      # once; later calls hit the cache
    loader = ShardLoader(ds.train, batch_size=32, seed=0, rank=r, world_size=w, device="cuda")
    input_ids, attention_mask = next(loader)                              # (B, T) LongTensors on device
    input_ids, labels = mask_tokens(input_ids, vocab_size=..., mask_token_id=ds.mask_token_id,
                                    special_token_ids=ds.special_token_ids)

Additions to the agreed API (all keyword arguments with defaults, or extra attributes):
- `prepare_dataset(..., eval_fraction=0.01, tokenizer_sample_chars=32M, shard_tokens=32M,
  workers=None)` (workers: encoder processes for sources over ~3 MB; default one per core);
  `max_samples` also accepts "500k" / "5M" strings. A tokenizer trained on a source is cached once and
  shared by all sequence lengths prepared from it.
- `PreparedDataset.meta` keys: documents, eval_documents, tokens (non-padding ids), text_tokens,
  padding_tokens, padding_fraction, sequences, train_sequences, eval_sequences, seq_len, vocab_size,
  dtype, tokenizer_hash, source, seconds, shards, resumed_shards.
- `PreparedDataset.seq_len`, `.mask_token_id`, `.special_token_ids` (ids of [PAD] [UNK] [CLS] [SEP] [MASK]).
- `mask_tokens(..., whole_word_mask: torch.BoolTensor | None)`: the vocabulary-sized "continues a
  word" mask from `continuation_token_mask(tokenizer)`; when given, whole words are masked together.
- `ShardLoader(..., pad_token_id=0)`; `loader.close()` stops the CUDA prefetch thread;
  `ShardLoader.state_dict()` also carries seed, world_size, batch_size and num_sequences; loading a
  state saved with another world size keeps the same global batches when batch_size * world_size is
  unchanged.
- `parse_count("500k") -> 500000` for `--max-samples`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microbert.data.prepare import PreparedDataset, prepare_dataset
from microbert.data.sources import HUB_DATASETS, parse_count

if TYPE_CHECKING:
    from microbert.data.loader import ShardLoader
    from microbert.data.masking import continuation_token_mask, mask_tokens

_LAZY = {"ShardLoader": "loader", "mask_tokens": "masking", "continuation_token_mask": "masking"}


def __getattr__(name: str) -> Any:
    """Import the torch-using parts on first use: `microbert data prepare` never pays for torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"microbert.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HUB_DATASETS",
    "PreparedDataset",
    "ShardLoader",
    "continuation_token_mask",
    "mask_tokens",
    "parse_count",
    "prepare_dataset",
]
