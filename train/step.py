"""One optimizer step: mask the micro-batches, forward, backward, step; out of memory in words.
Also the model and the loader it steps over, built from the run plan (the trainer and
bench/train_bench.py build them here, so the benchmark measures the trainer's step).

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

from microbert.data import PreparedDataset, ShardLoader, mask_tokens
from microbert.errors import MicroBertError
from microbert.model import BertForMaskedLM, init_weights, masked_slots_for
from microbert.plan import RunPlan
from train.engine import compile_mode, oom_message

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: (B, T) on the device


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so (seed, step, rank) streams never overlap."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def build_model(plan: RunPlan, data: PreparedDataset) -> BertForMaskedLM:
    """The plan's model, with the same initial weights on every rank and every restart (the
    unigram bias is counted from the same rows on every rank)."""
    torch.manual_seed(plan.settings.seed)
    model = BertForMaskedLM(plan.model)
    init_weights(model, plan.settings, data.train, data.special_token_ids)
    return model


def build_loader(plan: RunPlan, data: PreparedDataset) -> ShardLoader:
    """This rank's endless, resumable batches of the plan's micro-batch size."""
    assert plan.batch.micro_batch_size is not None, "a complete plan"
    place = plan.placement
    return ShardLoader(
        data.train,
        batch_size=plan.batch.micro_batch_size,
        seed=plan.settings.seed,
        rank=place.rank,
        world_size=place.world_size,
        device=place.device,
    )


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
        self, engine: Any, plan: RunPlan, data: PreparedDataset, *, exact_head: bool = False
    ) -> None:
        assert plan.batch.micro_batch_size is not None, "a complete plan"
        self.engine = engine
        self.plan = plan
        self.micro_batch_size = plan.batch.micro_batch_size
        self.mask_token_id = data.mask_token_id
        self.special_token_ids = data.special_token_ids
        place, t = plan.placement, plan.settings
        # On an accelerator the MLM head runs on a fixed number of slots per micro-batch: static
        # shapes, no host sync per step. On a CPU the exact masked set is cheaper.
        self.masked_slots = (
            None
            if place.on_cpu or exact_head
            else masked_slots_for(self.micro_batch_size * t.seq_len, t.mlm_probability)
        )
        self.cuda_graphs = compile_mode(place) == "reduce-overhead"
        self.generator = torch.Generator(device=place.device)

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
