"""DeepSpeed engine construction: the config DeepSpeed sees, the client optimizer and LR schedule.

The optimizer is always a client `torch.optim.AdamW` (fused where the accelerator supports it):
DeepSpeed's own FusedAdam needs a CUDA build step that fails on some GPU images, and a client
optimizer works the same on CPU. Nothing here names CUDA or NCCL: devices and the communication
backend come from DeepSpeed's accelerator abstraction.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from microbert.config import ModelConfig
from microbert.errors import MicroBertError
from microbert.model import BertForMaskedLM
from microbert.plan import Placement, RunPlan, SchedulePlan
from microbert.run_config import SCHEDULES, TrainConfig
from train.flat import FlatParameters
from train.nodes import group_timeout
from train.optim import ClippedAdamW


def verbose() -> bool:
    """`microbert-train --verbose` (MICROBERT_VERBOSE=1, so launched ranks see it too)."""
    return os.environ.get("MICROBERT_VERBOSE", "") not in ("", "0")


def library_noise(on: bool) -> None:
    """Show DeepSpeed's info logs and every Python warning (--verbose), or leave the defaults."""
    if on:
        logger = deepspeed.utils.logger
        for handler in [logger, *logger.handlers]:
            handler.setLevel(logging.INFO)
        warnings.simplefilter("default")


def init_distributed(local_rank: int | None, precision: str) -> Placement:
    """Join (or, alone, form) the process group; pick the device and precision.

    The timeout (train/nodes.py, `MICROBERT_DIST_TIMEOUT_S`) bounds how long the other ranks wait
    for one that died or hangs before they fail, instead of torch's 10 (NCCL) or 30 (gloo) minutes.
    """
    library_noise(verbose())
    captured = io.StringIO()
    # DeepSpeed prints "deepspeed_shm_comm_op built successfully" on every start, compiled or
    # loaded from the cache: harmless, and shown with --verbose (or replayed if the start fails).
    with contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(captured):
        try:
            deepspeed.init_distributed(
                dist_backend=get_accelerator().communication_backend_name(), timeout=group_timeout()
            )
        except BaseException:
            print(captured.getvalue(), end="")
            raise
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local = local_rank if local_rank is not None else rank
    accelerator = get_accelerator()
    device = accelerator.device_name(local) if accelerator.device_name() != "cpu" else "cpu"
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        accelerator.set_device(local)
        cap_device_memory(device)
    if precision == "auto":
        precision = "bf16" if not on_cpu and accelerator.is_bf16_supported() else "fp32"
    return Placement(rank=rank, local_rank=local, world_size=world, device=device, precision=precision)


def cap_device_memory(device: str) -> None:
    """`MICROBERT_GPU_MEMORY_GB`: use at most this much of the GPU, as if it were a smaller card.

    For sharing a GPU, and for checking that a profile made for a 24 GB card fits one while running
    on a larger card (`torch.cuda.set_per_process_memory_fraction`; allocations past it fail with
    the usual out-of-memory error and its advice).
    """
    value = os.environ.get("MICROBERT_GPU_MEMORY_GB")
    if not value or torch.device(device).type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        fraction = float(value) * 1e9 / total
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise MicroBertError(
            f"MICROBERT_GPU_MEMORY_GB={value!r}: give a number of GB between 0 and this GPU's "
            f"{total / 1e9:.0f} GB"
        )
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def usable_memory(place: Placement) -> int:
    """Free accelerator memory in bytes, within the per-process cap when one is set."""
    free = int(get_accelerator().available_memory(place.local_rank))
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if place.device_type == "cuda" and get_fraction is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(place.device).total_memory
        capped = int(get_fraction(place.device) * total) - torch.cuda.memory_reserved(place.device)
        free = min(free, capped)
    return free


def device_model(place: Placement) -> str | None:
    """The accelerator's model name (e.g. "NVIDIA H200"), for its peak FLOP/s; None on CPU."""
    if place.on_cpu:
        return None
    module = getattr(torch, place.device_type, None)
    try:
        return str(module.get_device_name(place.local_rank)) if module is not None else None
    except (AttributeError, RuntimeError):
        return None


def decay_factor(progress: float, *, schedule: str, min_ratio: float, decay_fraction: float) -> float:
    """The LR multiplier after warm-up, `progress` running from 0 to 1 over the rest of the run.

    cosine: half a cosine down to `min_ratio`; linear: a straight line down to it (the `transformers`
    Trainer's default shape); wsd (warmup-stable-decay): the peak until the last `decay_fraction` of
    the run, then a straight line down to `min_ratio` — the run can be extended, and the decay is
    where the loss drops.
    """
    p = min(1.0, max(0.0, progress))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    if schedule == "wsd":
        stable = 1.0 - decay_fraction
        return 1.0 if p <= stable else min_ratio + (1.0 - min_ratio) * (1.0 - p) / max(decay_fraction, 1e-9)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def lr_lambda(
    step: int,
    *,
    warmup: int,
    total: int,
    min_ratio: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Linear warm-up to the peak over `warmup` steps, then `schedule` down to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return decay_factor(progress, schedule=schedule, min_ratio=min_ratio, decay_fraction=decay_fraction)


def timed_schedule(schedule: SchedulePlan, clock: Callable[[], float]) -> Callable[[int], float]:
    """The LR multiplier of a run with a wall-clock budget (`--time-budget`): the schedule follows
    the share of the budget spent, not a step count, so the run ends decayed whatever the machine's
    speed. Warm-up is `--warmup-steps` steps when given, else the first 6% of the budget (the plan's
    `warmup_s`). `clock()` gives the training seconds so far (evaluation and checkpoints excluded).

    A closure, not an object: `LambdaLR.state_dict()` (saved in every checkpoint) pickles the
    attributes of callable objects, and the clock belongs to the trainer.
    """
    assert schedule.time_budget_s is not None
    budget = float(schedule.time_budget_s)
    warmup_steps, warmup_s = schedule.warmup_steps, schedule.warmup_s
    warmup_end_s: list[float] = []  # when a step-count warm-up ended

    def factor(step: int) -> float:
        now = clock()
        if warmup_steps is not None:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            if not warmup_end_s:
                warmup_end_s.append(now)
            start = warmup_end_s[0]
        else:
            assert warmup_s is not None
            start = warmup_s
            if now < start:
                return max(now / start, 1e-3)
        progress = (now - start) / max(budget - start, 1e-9)
        return decay_factor(
            progress,
            schedule=schedule.shape,
            min_ratio=schedule.min_lr_ratio,
            decay_fraction=schedule.decay_fraction,
        )

    return factor


def lr_factor(schedule: SchedulePlan, clock: Callable[[], float] | None = None) -> Callable[[int], float]:
    """The plan's LR multiplier per step: over its steps, or over the clock of a time-budget run."""
    if schedule.follows_clock:
        assert clock is not None, "a time-budget run needs the training clock"
        return timed_schedule(schedule, clock)
    assert schedule.total_steps is not None and schedule.warmup_steps is not None, "an unresolved plan"
    warm, total = schedule.warmup_steps, schedule.total_steps

    def factor(step: int) -> float:
        return lr_lambda(
            step,
            warmup=warm,
            total=total,
            min_ratio=schedule.min_lr_ratio,
            schedule=schedule.shape,
            decay_fraction=schedule.decay_fraction,
        )

    return factor


def deepspeed_config(plan: RunPlan) -> dict[str, Any]:
    """The config handed to `deepspeed.initialize`: the plan's batch geometry, ZeRO stage and precision."""
    t, batch = plan.settings, plan.batch
    config = {k: v for k, v in plan.deepspeed.items() if k not in ("bf16", "fp16", "train_batch_size")}
    config["train_micro_batch_size_per_gpu"] = batch.micro_batch_size
    config["gradient_accumulation_steps"] = batch.grad_accum
    config["train_batch_size"] = batch.train_batch_size
    # The client optimizer clips on the device (train/optim.py); DeepSpeed's own clip reads the
    # norm back to the host every step, so it computes no norm and clips nothing.
    config["gradient_clipping"] = 0.0
    zero = dict(config.get("zero_optimization") or {})
    zero["stage"] = t.zero_stage
    zero["compute_grad_norm"] = False
    # One bucket and no overlap machinery: `overlap_comm` synchronises the device per bucket, and
    # with flat parameters there is little to overlap (bench/NOTES.md). A config may override.
    zero.setdefault("overlap_comm", False)
    zero.setdefault("contiguous_gradients", False)
    zero.setdefault("reduce_bucket_size", 500_000_000)
    config["zero_optimization"] = zero
    # bf16 has no loss scale to protect, so no per-parameter inf/NaN scan (and host sync) per step;
    # a diverged loss is caught by the trainer at its logging cadence.
    config["bf16"] = {"enabled": plan.placement.precision == "bf16", "check_grad_overflow": False}
    config.setdefault("steps_per_print", 10**9)  # the trainer does its own logging
    return config


def register_with_zero() -> None:
    """Tell ZeRO that ClippedAdamW is an AdamW: DeepSpeed checks the optimizer's exact type against
    its list of tested ones (and warns "untested optimizer, proceed with caution" on every run),
    while ClippedAdamW only adds an on-device gradient clip to `torch.optim.AdamW`'s step."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    if ClippedAdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(ClippedAdamW)


def build_optimizer(model: FlatParameters, t: TrainConfig, place: Placement) -> ClippedAdamW:
    """AdamW without weight decay on biases and LayerNorm weights (the BERT recipe), clipping itself.

    One parameter group, so the clip sees the global norm; the decay stops at the end of
    `flat_decay`, the first of the two flat parameters (train/optim.py says why).
    """
    fused = not place.on_cpu  # fused AdamW kernels exist for accelerators, not for CPU
    return ClippedAdamW(
        [model.flat_decay, model.flat_no_decay],
        max_grad_norm=float(t.grad_clip),
        weight_decay=t.weight_decay,
        decay_elements=model.flat_decay.numel(),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        fused=fused,
    )


def auto_micro_batch(model_config: ModelConfig, seq_len: int, place: Placement) -> int:
    """Size the micro-batch from free accelerator memory (the seed's "configuration by GPU memory").

    Static memory: bf16 weights and grads plus fp32 master weights and Adam moments, the latter
    split across ranks by ZeRO-1. Per sample: activations kept for backward, about 34·T·d bytes
    per layer in bf16 with fused attention (Korthikanti et al. 2022), plus fp32 logits over the
    masked positions. 20% of the free memory is left for the allocator and communication buffers.
    """
    if place.on_cpu:
        return 32
    free_bytes = usable_memory(place)
    params = model_config.num_parameters()
    static = params * (2 + 2) + params * (4 + 8) / place.world_size
    d, layers, vocab = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    per_sample = 34 * seq_len * d * layers + 0.15 * seq_len * vocab * 4 * 3
    budget = 0.8 * free_bytes - static
    if budget <= per_sample:
        raise MicroBertError(
            f"model {params / 1e6:.0f}M parameters leaves no room for a batch on this GPU "
            f"({free_bytes / 2**30:.1f} GiB free): pick a smaller --model or lower --seq-len"
        )
    batch = int(budget // per_sample)
    return max(1, min(512, 2 ** int(math.log2(batch))))


@dataclass(frozen=True)
class Engine:
    """What `build_engine` made: the DeepSpeed engine, its LR schedule, the client optimizer, and the
    config DeepSpeed was given (`resolved_config.json` keeps it)."""

    engine: Any  # deepspeed.DeepSpeedEngine (untyped)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    optimizer: ClippedAdamW
    config: dict[str, Any]


def build_engine(model: BertForMaskedLM, plan: RunPlan, clock: Callable[[], float] | None = None) -> Engine:
    """`deepspeed.initialize` over the model's flat parameters with the client optimizer and schedule.

    On an accelerator the model is compiled, encoder, head and loss in one graph (see
    `compile_mode`): the fused LayerNorm, dropout, GELU and cross-entropy kernels matter more for
    BERT than anything else but the matmuls. Everything else comes from the plan: the batch
    geometry, the precision, the optimizer's settings and the schedule (a `--time-budget` run's
    follows `clock`, the training seconds so far: `timed_schedule`).
    """
    assert plan.complete, f"an engine needs a complete plan; unresolved: {', '.join(plan.unresolved)}"
    place = plan.placement
    flat = FlatParameters(model)
    mode = compile_mode(place)
    if mode is not None:
        # The wrapper, not the model: the views into the flat parameters are made inside the graph,
        # so their ~150 views and view-backwards cost no host time, and CUDA graphs see the two
        # flat parameters at fixed addresses.
        flat.compile(mode=None if mode == "default" else mode)
    config = deepspeed_config(plan)
    optimizer = build_optimizer(flat, plan.settings, place)
    register_with_zero()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(plan.schedule, clock))
    # DeepSpeed hands the client scheduler back as it is: the LambdaLR above.
    engine, _optimizer, _loader, engine_scheduler = deepspeed.initialize(
        model=flat, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    optimizer.shard_rank = place.rank  # ZeRO-1 hands each rank one slice of the flat group
    return Engine(engine=engine, scheduler=engine_scheduler, optimizer=optimizer, config=config)


COMPILE_MODES = ("off", "default", "reduce-overhead")


def compile_mode(place: Placement) -> str | None:
    """`MICROBERT_COMPILE`: off (eager), default (`torch.compile`), or reduce-overhead (CUDA graphs too).

    reduce-overhead on CUDA: replaying each step's kernels as CUDA graphs takes the host's launch
    work off the critical path, which decides the speed of small BERTs (bench/NOTES.md: bert-mini
    2.0 -> 4.1 M tokens/s on an H100). default on other accelerators; never on a CPU, where
    compiling costs more than a short run gains.
    """
    default = "reduce-overhead" if place.device_type == "cuda" else "default"
    value = os.environ.get("MICROBERT_COMPILE", default).strip().lower()
    value = {"0": "off", "1": "default", "cuda-graphs": "reduce-overhead"}.get(value, value)
    if value not in COMPILE_MODES:
        raise MicroBertError(
            f"MICROBERT_COMPILE={value!r} is not one of {', '.join(COMPILE_MODES)} (or 0 / 1)"
        )
    return None if place.on_cpu or value == "off" else value


def oom_message(t: TrainConfig, micro_batch: int) -> str:
    """What to do when a step runs out of accelerator memory: the flags that shrink it, in order."""
    return (
        f"out of GPU memory at micro-batch {micro_batch} × seq len {t.seq_len} (model {t.model}): "
        f"lower --batch-size (now {micro_batch}; raise --grad-accum to keep the global batch), "
        f"then --seq-len (now {t.seq_len}), or pick a smaller --model"
    )
