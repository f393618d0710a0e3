"""The run plan: every number a training run is built from, computed once.

The settings layers (`microbert.run_config.resolve`) say what the user asked for; some of it is only
decided at launch: the processes and their device, an "auto" micro-batch (sized from free accelerator
memory), the vocabulary the tokenizer came out with, the number of training sequences (and with it
the steps of an `--epochs` run), the gradient accumulation that keeps a checkpoint's global batch on
another number of ranks. `plan_run` takes the settings and those launch facts and returns one frozen
`RunPlan`: the trainer builds its loader, model, engine and schedule from it, writes it into
`resolved_config.json`, and nothing works these values out again. `microbert configs show` calls the
same function before launch and prints "auto: resolved at launch" for what only the launch can know.

No torch, no DeepSpeed here: `microbert configs show` imports this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microbert.config import ModelConfig
from microbert.run_config import WARMUP_SHARE, Resolved, TrainConfig

if TYPE_CHECKING:
    from microbert.data import PreparedDataset

AT_LAUNCH = "auto: resolved at launch"  # how a value only the launch decides is shown before it
# what the data preparation tells (DataPlan): unknown before launch
_PREPARED_FIELDS = (
    "vocab_size",
    "train_sequences",
    "eval_sequences",
    "cache_key",
    "tokenizer_hash",
    "data_hash",
)


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank, the world, its device ("cpu", "cuda:0"), its precision."""

    rank: int
    local_rank: int
    world_size: int
    device: str
    precision: str  # "bf16" or "fp32" ("auto" only in a plan shown before launch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return str(self.device).split(":")[0]

    @property
    def on_cpu(self) -> bool:
        return self.device_type == "cpu"


@dataclass(frozen=True)
class DataPlan:
    """The prepared data as the run sees it (None: not prepared yet, a plan shown before launch)."""

    dataset: str
    seq_len: int
    vocab_size: int  # the tokenizer's size once prepared (the embedding matrix follows it), else asked
    train_sequences: int | None = None
    eval_sequences: int | None = None
    cache_key: str | None = None
    tokenizer_hash: str | None = None
    data_hash: str | None = None

    @classmethod
    def of(cls, data: PreparedDataset, dataset: str) -> DataPlan:
        """What prepared data `data` (of source `dataset`) tells the plan."""
        from microbert.tokenizer import tokenizer_hash

        return cls(
            dataset=dataset,
            seq_len=data.seq_len,
            vocab_size=data.tokenizer.get_vocab_size(),
            train_sequences=len(data.train),
            eval_sequences=len(data.eval),
            cache_key=data.cache_key,
            tokenizer_hash=tokenizer_hash(data.tokenizer),
            data_hash=data.meta.get("data_hash"),
        )

    @property
    def prepared(self) -> bool:
        return self.train_sequences is not None


@dataclass(frozen=True)
class BatchPlan:
    """The batch geometry: micro-batch per rank × accumulation × ranks = sequences per optimizer step."""

    micro_batch_size: int | None  # None: "auto", sized at launch
    grad_accum: int
    train_batch_size: int | None  # global: micro × accumulation × world size
    batches_per_epoch: int | None  # per rank; None before the data is prepared
    requested_micro_batch_size: int | str  # as the settings give it (an int or "auto")
    requested_grad_accum: int  # as the settings give it, before a resume on another world size

    def checkpoint_record(self) -> dict[str, Any]:
        """The geometry a checkpoint keeps, so a resume on other hardware can keep its global batch."""
        return {
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "train_batch_size": self.train_batch_size,
            "requested": {
                "micro_batch_size": self.requested_micro_batch_size,
                "grad_accum": self.requested_grad_accum,
            },
        }


@dataclass(frozen=True)
class SchedulePlan:
    """The learning-rate schedule: linear warm-up to `peak_lr`, then `shape` down to the floor.

    A run with a step count follows the steps; a `--time-budget` run without one (total_steps None)
    follows the share of its budget spent, and warms up over `warmup_steps` steps when given, else
    over the first `warmup_s` seconds.
    """

    shape: str  # cosine | linear | wsd (microbert.run_config.SCHEDULES)
    peak_lr: float
    min_lr_ratio: float
    decay_fraction: float  # wsd: the share of the run spent decaying
    total_steps: int | None  # None: the clock decides (or, before launch, the data's size)
    warmup_steps: int | None
    time_budget_s: float | None
    warmup_s: float | None  # a clock warm-up: the first WARMUP_SHARE of the budget

    @property
    def follows_clock(self) -> bool:
        return self.total_steps is None and self.time_budget_s is not None

    def warmup_warning(self) -> str | None:
        """A warm-up longer than the run never reaches the peak learning rate: worth a line in the log."""
        if self.total_steps is None or self.warmup_steps is None or self.warmup_steps <= self.total_steps:
            return None
        return (
            f"warning: the warm-up ({self.warmup_steps} steps) is longer than the run ({self.total_steps} "
            f"steps), so the learning rate never reaches its peak {self.peak_lr:g}: lower --warmup-steps "
            "or raise --max-steps"
        )


@dataclass(frozen=True)
class RunPlan:
    """Settings, data, placement, batch and schedule of one run, decided once (see the module doc)."""

    settings: TrainConfig  # the settings in force (grad_accum as the batch plan sets it)
    model: ModelConfig  # the preset with its overrides, the vocabulary sized to the tokenizer
    placement: Placement
    data: DataPlan
    batch: BatchPlan
    schedule: SchedulePlan
    deepspeed: dict[str, Any]  # the layers' DeepSpeed config, before the engine sets batch and precision
    profile: str | None
    ds_config: str | None
    layers: tuple[str, ...]
    unresolved: tuple[str, ...] = ()  # what only the launch decides ("batch.micro_batch_size", ...)

    @property
    def complete(self) -> bool:
        return not self.unresolved

    def length(self) -> str:
        """How long the run is, in words: "450 s of training or 800 steps, whichever comes first"."""
        budget = self.schedule.time_budget_s
        budget_text = f"{budget:g} s of training" if budget is not None else None
        total = self.schedule.total_steps
        steps_text = f"{total} steps" if total is not None else None
        if "schedule.total_steps" in self.unresolved:
            steps_text = f"{self.settings.epochs if self.settings.epochs is not None else 1:g} epoch(s)"
        either = budget_text and steps_text
        return " or ".join(x for x in (budget_text, steps_text) if x) + (
            ", whichever comes first" if either else ""
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as `resolved_config.json` keeps it: the keys it always had, and a `plan` section."""
        at_launch = set(self.unresolved)

        def section(name: str, values: Any) -> dict[str, Any]:
            plain = dataclasses.asdict(values)
            return {k: AT_LAUNCH if f"{name}.{k}" in at_launch else v for k, v in plain.items()}

        place = self.placement
        placement = {
            "rank": place.rank,
            "local_rank": place.local_rank,
            "world_size": place.world_size,
            "device": place.device,
            "precision": place.precision,
        }
        placement = {k: AT_LAUNCH if f"placement.{k}" in at_launch else v for k, v in placement.items()}
        return {
            "profile": self.profile,
            "ds_config": self.ds_config,
            "layers": list(self.layers),
            "train": self.settings.to_dict(),
            "model": {"preset": self.settings.model, **self.model.to_dict()},
            "deepspeed": self.deepspeed,
            "runtime": {
                "world_size": place.world_size,
                "device": place.device_type,
                "precision": place.precision,
                "micro_batch_size": self.batch.micro_batch_size,
                "total_steps": self.schedule.total_steps,
                "dataset_cache_key": self.data.cache_key,
                "tokenizer_hash": self.data.tokenizer_hash,
                "data_hash": self.data.data_hash,
            },
            "plan": {
                "placement": placement,
                "data": section("data", self.data),
                "batch": section("batch", self.batch),
                "schedule": section("schedule", self.schedule),
                "resolved_at_launch": list(self.unresolved),
            },
        }


def batches_per_epoch(num_sequences: int, batch_size: int, world_size: int, *, drop_last: bool = True) -> int:
    """Batches each rank takes from one pass over the data (the loader's epoch: `ShardLoader`)."""
    per_step = batch_size * world_size
    return num_sequences // per_step if drop_last else -(-num_sequences // per_step)


def plan_run(
    resolved: Resolved,
    placement: Placement,
    data: DataPlan | None = None,
    *,
    size_micro_batch: Callable[[ModelConfig], int] | None = None,
    resume_grad_accum: Callable[[int], int] | None = None,
) -> RunPlan:
    """The plan of a run from its resolved settings and what the launch found.

    placement: this process's rank, world and device. data: the prepared data (None before launch).
    size_micro_batch(model): an "auto" micro-batch for this device; resume_grad_accum(micro_batch):
    the accumulation that keeps the latest checkpoint's global batch (train/checkpointing.py). Left
    out, as before launch, what they decide is listed in `unresolved`.
    """
    t = resolved.train
    unresolved: list[str] = []
    if placement.precision == "auto":
        unresolved.append("placement.precision")
    if data is None:
        data = DataPlan(dataset=t.dataset, seq_len=t.seq_len, vocab_size=resolved.model_config.vocab_size)
        unresolved += [f"data.{name}" for name in _PREPARED_FIELDS]
    model = resolved.model_config
    if data.vocab_size != model.vocab_size:
        model = model.replace(vocab_size=data.vocab_size)

    micro: int | None
    if t.micro_batch_size != "auto":
        micro = int(t.micro_batch_size)
    elif size_micro_batch is not None:
        micro = size_micro_batch(model)
    else:
        micro = None
        unresolved.append("batch.micro_batch_size")
    accum = (
        resume_grad_accum(micro) if (resume_grad_accum is not None and micro is not None) else t.grad_accum
    )
    per_epoch = (
        batches_per_epoch(data.train_sequences, micro, placement.world_size)
        if data.train_sequences is not None and micro is not None
        else None
    )
    batch = BatchPlan(
        micro_batch_size=micro,
        grad_accum=accum,
        train_batch_size=micro * accum * placement.world_size if micro is not None else None,
        batches_per_epoch=per_epoch,
        requested_micro_batch_size=t.micro_batch_size,
        requested_grad_accum=t.grad_accum,
    )
    if micro is None:
        unresolved.append("batch.train_batch_size")
    if per_epoch is None:
        unresolved.append("batch.batches_per_epoch")

    total: int | None
    if t.max_steps is not None:
        total = t.max_steps
    elif t.time_budget_s is not None:
        total = None  # the clock decides; the schedule follows it
    elif per_epoch is not None:
        epochs = t.epochs if t.epochs is not None else 1.0
        total = max(1, math.ceil(epochs * per_epoch / accum))
    else:
        total = None
        unresolved.append("schedule.total_steps")
    if t.warmup_steps is not None:
        warmup_steps: int | None = t.warmup_steps
    elif total is not None:
        warmup_steps = max(1, int(WARMUP_SHARE * total))
    else:
        warmup_steps = None
        if "schedule.total_steps" in unresolved:
            unresolved.append("schedule.warmup_steps")
    clock_warmup = total is None and t.time_budget_s is not None and t.warmup_steps is None
    schedule = SchedulePlan(
        shape=t.schedule,
        peak_lr=t.lr,
        min_lr_ratio=t.min_lr_ratio,
        decay_fraction=t.decay_fraction,
        total_steps=total,
        warmup_steps=warmup_steps,
        time_budget_s=t.time_budget_s,
        warmup_s=WARMUP_SHARE * float(t.time_budget_s) if clock_warmup and t.time_budget_s else None,
    )
    return RunPlan(
        settings=dataclasses.replace(t, grad_accum=accum),
        model=model,
        placement=placement,
        data=data,
        batch=batch,
        schedule=schedule,
        deepspeed=resolved.deepspeed,
        profile=resolved.profile,
        ds_config=resolved.ds_config_path,
        layers=tuple(resolved.sources),
        unresolved=tuple(unresolved),
    )
