"""Held-out fill-mask evaluation: what a user of `pipeline("fill-mask")` gets from the model.

A share of the non-special tokens (15% by default) is chosen from a fixed seed, and *every* chosen
position becomes `[MASK]`: the model never sees the token it is asked for. (BERT's 80/10/10
training corruption leaves 10% of the chosen tokens unchanged; scoring those rewards copying the
input, which is how a model that predicts nothing but `the` used to read 14% here.) Reported on
those positions: top-1 and top-5 accuracy, loss and perplexity, and the constant guess — always
answering the most frequent of the scored tokens — so "is it any better than guessing `the`?" has
an answer next to every figure.

Shared by the trainer (every `--eval-every` steps), `microbert eval` and the quality benchmark, so
their numbers mean the same thing. Positions are drawn on the CPU from their own generator: they
depend only on the token rows and the seed, not on the device or the model, so two models (a
MicroBERT one and a `transformers` one) are scored on the very same positions, and evaluating never
disturbs the training RNG streams (which exact resume relies on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microbert.model import BertForMaskedLM

EVAL_MASK_RATE = 0.15  # the standard rate, whatever the training rate, so runs stay comparable
EVAL_SEED = 1234


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy over the scored positions (nats)
    perplexity: float  # exp(loss)
    accuracy: float  # top-1: share of scored positions whose best prediction is the original token
    top5_accuracy: float
    num_masked: int  # scored positions, every one replaced by [MASK]
    baseline_accuracy: float  # the constant guess: always the most frequent scored token
    baseline_token_id: int
    mask_rate: float

    @property
    def over_baseline(self) -> float:
        """Accuracy as a multiple of the constant guess (1.0 = no better than always `the`)."""
        return self.accuracy / self.baseline_accuracy if self.baseline_accuracy else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def choose_positions(
    ids: torch.Tensor, special_token_ids: Sequence[int], mask_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, T) bool on the CPU: the positions to score, `mask_rate` of the non-special tokens."""
    maskable = ~torch.isin(ids, torch.tensor(list(special_token_ids), dtype=ids.dtype))
    return maskable & (torch.rand(ids.shape, generator=generator) < mask_rate)


def _takes_positions(model: nn.Module) -> bool:
    """MicroBERT's model (or the trainer's flat-parameter wrapper of it) runs the head on the asked
    positions only; a `transformers` model returns logits everywhere."""
    return isinstance(model, BertForMaskedLM) or isinstance(getattr(model, "model", None), BertForMaskedLM)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    sequences: np.ndarray,
    *,
    special_token_ids: Sequence[int],
    mask_token_id: int,
    pad_token_id: int = 0,
    batch_size: int = 32,
    max_batches: int | None = None,
    mask_rate: float = EVAL_MASK_RATE,
    seed: int = EVAL_SEED,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Score `model` on `sequences` (N, T) of token ids; every scored position is `[MASK]`ed.

    `model` is a MicroBERT `BertForMaskedLM` or a `transformers` masked-LM model; the special ids
    come from the tokenizer the rows were made with (`microbert.tokenizer.special_token_ids`).
    """
    if not 0.0 < mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    native = _takes_positions(model)
    config: Any = model.config  # MicroBERT's ModelConfig or a transformers BertConfig
    vocab_size = int(config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    total_loss, top1, top5, scored = 0.0, 0, 0, 0
    label_counts = torch.zeros(vocab_size, dtype=torch.long)
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        ids = torch.from_numpy(np.asarray(sequences[b * batch_size : (b + 1) * batch_size], dtype=np.int64))
        chosen = choose_positions(ids, special_token_ids, mask_rate, generator)  # (B, T)
        targets = ids[chosen]  # (M,)
        if targets.numel() == 0:
            continue
        inputs = torch.where(chosen, mask_token_id, ids).to(device)
        attention_mask = (ids != pad_token_id).long().to(device)
        chosen_dev = chosen.to(device)
        if native:
            logits = model(input_ids=inputs, attention_mask=attention_mask, positions=chosen_dev).logits
        else:
            logits = model(input_ids=inputs, attention_mask=attention_mask).logits[chosen_dev]
        logits = logits.float()  # (M, V)
        targets_dev = targets.to(device)
        total_loss += float(F.cross_entropy(logits, targets_dev, reduction="sum"))
        best = logits.topk(min(5, vocab_size), dim=-1).indices  # (M, 5)
        top1 += int((best[:, 0] == targets_dev).sum())
        top5 += int((best == targets_dev[:, None]).any(dim=-1).sum())
        scored += targets.numel()
        label_counts += torch.bincount(targets, minlength=vocab_size)
    model.train(was_training)
    if scored == 0:
        raise ValueError("no token to score: the rows hold only special tokens or padding")
    loss = total_loss / scored
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        accuracy=top1 / scored,
        top5_accuracy=top5 / scored,
        num_masked=scored,
        baseline_accuracy=int(label_counts.max()) / scored,
        baseline_token_id=int(label_counts.argmax()),
        mask_rate=mask_rate,
    )
