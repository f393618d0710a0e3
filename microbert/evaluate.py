"""Held-out MLM evaluation: loss, masked-token accuracy, perplexity, and the constant-guess baseline.

Shared by the trainer (every `--eval-every` steps) and `microbert eval` (any artifact, any dataset),
so the numbers in a training log and on the command line mean the same thing. Masking uses its own
seeded generator: the same model on the same data always gets the same score, and evaluating never
disturbs the training RNG streams (which exact resume relies on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from microbert.model import IGNORE_INDEX, BertForMaskedLM

SPECIAL_TOKEN_IDS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_TOKEN_ID = 4


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy over masked positions (nats)
    accuracy: float  # share of masked positions whose top-1 prediction is the original token
    perplexity: float  # exp(loss)
    num_masked: int
    baseline_accuracy: float  # best constant guess: always predicting the most frequent masked token
    baseline_token_id: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.inference_mode()
def evaluate(
    model: BertForMaskedLM,
    sequences: np.ndarray,
    *,
    batch_size: int = 32,
    max_batches: int | None = None,
    mlm_probability: float = 0.15,
    seed: int = 1234,
    device: torch.device | str | None = None,
    special_token_ids: Sequence[int] = SPECIAL_TOKEN_IDS,
    mask_token_id: int = MASK_TOKEN_ID,
) -> EvalResult:
    """Evaluate on `sequences` (N, T) of token ids (0 = padding) with dynamic 80/10/10 masking."""
    from microbert.data import mask_tokens  # the data package owns masking; imported late for the CLI

    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    vocab_size = model.config.vocab_size
    total_loss = 0.0
    correct = 0
    masked = 0
    label_counts = torch.zeros(vocab_size, dtype=torch.long, device=device)
    n_batches = math.ceil(len(sequences) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        chunk = np.asarray(sequences[b * batch_size : (b + 1) * batch_size], dtype=np.int64)
        ids = torch.from_numpy(chunk).to(device)
        attention_mask = (ids != 0).long()
        inputs, labels = mask_tokens(
            ids,
            vocab_size=vocab_size,
            mask_token_id=mask_token_id,
            special_token_ids=list(special_token_ids),
            mlm_probability=mlm_probability,
            generator=generator,
        )
        out = model(input_ids=inputs, attention_mask=attention_mask, labels=labels)
        targets = labels[labels != IGNORE_INDEX]
        if targets.numel() == 0:
            continue
        total_loss += float(out.loss) * targets.numel()
        correct += int((out.logits.argmax(-1) == targets).sum())
        masked += targets.numel()
        label_counts += torch.bincount(targets, minlength=vocab_size)
    model.train(was_training)
    if masked == 0:
        return EvalResult(float("nan"), 0.0, float("nan"), 0, 0.0, -1)
    loss = total_loss / masked
    return EvalResult(
        loss=loss,
        accuracy=correct / masked,
        perplexity=math.exp(min(loss, 50.0)),
        num_masked=masked,
        baseline_accuracy=int(label_counts.max()) / masked,
        baseline_token_id=int(label_counts.argmax()),
    )
