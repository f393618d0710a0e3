"""One optimizer step: mask the micro-batches, forward, backward, step; out of memory in words.

The random streams of a step are reseeded from (seed, step, rank) before it runs: the dropout
stream from (…, 1), the masking generator from (…, 2, micro-batch). No stream is carried across
steps, so a run resumed at step N draws exactly the masks and dropout an uninterrupted run drew
there, and the step is a function of its batches alone. The result stays on the device: reading
it back (a host sync) is the interval meter's business, at its logging cadence only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from microbert.data import mask_tokens
from microbert.errors import MicroBertError
from microbert.plan import RunPlan
from train.engine import oom_message

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: (B, T) on the device


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so (seed, step, rank) streams never overlap."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class StepResult:
    """Device scalars of one step: its mean loss, its non-padding tokens, and the masked positions
    that did not fit the MLM head's fixed slots (None when the head takes the exact masked set)."""

    loss: torch.Tensor
    tokens: torch.Tensor
    dropped: torch.Tensor | None


class TrainStep:
    """`step(n, batches)`: optimizer step n over `grad_accum` micro-batches drawn from `batches`."""

    def __init__(
        self,
        engine: Any,
        plan: RunPlan,
        *,
        mask_token_id: int,
        special_token_ids: list[int],
        masked_slots: int | None,
        cuda_graphs: bool,
    ) -> None:
        assert plan.batch.micro_batch_size is not None, "a complete plan"
        self.engine = engine
        self.plan = plan
        self.micro_batch_size = plan.batch.micro_batch_size
        self.mask_token_id = mask_token_id
        self.special_token_ids = special_token_ids
        self.masked_slots = masked_slots
        self.cuda_graphs = cuda_graphs
        self.generator = torch.Generator(device=plan.placement.device)

    def __call__(self, step: int, batches: Iterator[Batch]) -> StepResult:
        t, place = self.plan.settings, self.plan.placement
        accum = self.plan.batch.grad_accum
        torch.manual_seed(seed_for(t.seed, step, place.rank, 1))  # dropout stream of this step
        loss = torch.zeros((), device=place.device)
        tokens: torch.Tensor | None = None
        dropped: torch.Tensor | None = None
        for micro in range(accum):
            input_ids, attention_mask = next(batches)
            self.generator.manual_seed(seed_for(t.seed, step, place.rank, 2, micro))
            inputs, labels = mask_tokens(
                input_ids,
                vocab_size=self.plan.model.vocab_size,
                mask_token_id=self.mask_token_id,
                special_token_ids=self.special_token_ids,
                mlm_probability=t.mlm_probability,
                generator=self.generator,
            )
            try:
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.engine(
                    input_ids=inputs,
                    attention_mask=attention_mask,
                    labels=labels,
                    masked_slots=self.masked_slots,
                )
                self.engine.backward(out.loss)
                self.engine.step()
            except torch.OutOfMemoryError:
                raise MicroBertError(oom_message(t, self.micro_batch_size)) from None
            loss = loss + out.loss.detach().float() / accum
            micro_tokens = attention_mask.sum()
            tokens = micro_tokens if tokens is None else tokens + micro_tokens
            if self.masked_slots is not None:
                over = (out.num_masked - self.masked_slots).clamp(min=0)
                dropped = over if dropped is None else dropped + over
        assert tokens is not None  # grad_accum ≥ 1
        return StepResult(loss=loss, tokens=tokens, dropped=dropped)
