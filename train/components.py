"""The parts of a training run that keep their own time: the training clock, the interval meter,
evaluation and checkpointing. Each answers its own "is it my step?" (`due(step)`); the trainer
(train/loop.py) only orders them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from microbert.checkpoint import LATEST, save_artifact, update_latest
from microbert.data import PreparedDataset, ShardLoader
from microbert.evaluate import EVAL_MASK_RATE, EVAL_SEED, evaluate
from microbert.plan import Placement, RunPlan
from train import checkpointing
from train.reporting import write_history
from train.step import Batch, StepResult

PLOT_EVERY_S = 300.0  # redraw training_history.png at most this often before the end


@dataclass
class TrainState:
    """How far the run is: what a checkpoint saves besides weights, optimizer and loader."""

    step: int = 0
    tokens_seen: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"train": [], "eval": []})
    last_eval: dict[str, Any] | None = None


class TrainingClock:
    """Seconds spent training, restarts included; evaluation, checkpoints and each process's first
    (compiling) step excluded. A time budget runs on this clock, and so does its LR schedule."""

    def __init__(self) -> None:
        self.elapsed_before = 0.0  # training seconds of the processes before this one (a resume)
        self.origin = time.perf_counter()
        self.paused_s = 0.0
        self.startup_s = 0.0  # this process's first step: compilation and warm-up

    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.origin - self.paused_s

    def resume_from(self, elapsed_s: float) -> None:
        self.elapsed_before = elapsed_s

    def start(self) -> float:
        """The loop starts now; returns the time."""
        self.origin, self.paused_s = time.perf_counter(), 0.0
        return self.origin

    def first_step_done(self, started: float) -> float:
        """The first step of a process compiles and warms up (torch.compile, CUDA graphs, DeepSpeed's
        buffers): the clock starts after it. Returns the seconds it took."""
        now = time.perf_counter()
        self.startup_s = now - started
        self.origin, self.paused_s = now, 0.0
        return self.startup_s

    def exclude_since(self, since: float) -> float:
        """Take the time since `since` (an evaluation, a checkpoint) off the clock; returns it."""
        paused = time.perf_counter() - since
        self.paused_s += paused
        return paused

    def out_of_time(self, budget_s: float | None) -> bool:
        return budget_s is not None and self.seconds() >= budget_s


def over_ranks(value: torch.Tensor, op: Any, place: Placement) -> float:
    """Sum or mean over ranks (logged steps only: one small collective, one host sync)."""
    if place.world_size > 1:
        value = value.detach().clone().float() if op == dist.ReduceOp.AVG else value.clone()
        if op == dist.ReduceOp.AVG and place.on_cpu:
            dist.all_reduce(value)  # gloo has no AVG
            value /= place.world_size
        else:
            dist.all_reduce(value, op=op)
    return float(value.item())


@dataclass(frozen=True)
class Interval:
    """The steps since the last logged one, over all ranks."""

    loss: float  # the last step's
    tokens: int  # non-padding
    seconds: float
    steps: int
    tokens_per_second: float
    data_wait_share: float
    mfu: float | None  # None where the device has no known peak (a CPU)
    dropped: int  # masked positions left out of the loss (the MLM head's slots were full)


class IntervalMeter:
    """Throughput between logged steps: non-padding tokens/s, the share of time spent waiting for
    data, and MFU = tokens/s × FLOPs per token / peak FLOP/s of all ranks (train/reporting.py).
    Counts stay on the device until `read`, at the logging cadence (`--log-every`)."""

    def __init__(
        self, place: Placement, *, every: int, flops_per_token: int, peak_flops: float | None
    ) -> None:
        self.place, self.every = place, every
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens = torch.zeros((), dtype=torch.long, device=place.device)
        # masked positions that did not fit the head's slots (odds < 1e-9 a batch)
        self.dropped = torch.zeros((), dtype=torch.long, device=place.device)
        self.counts_dropped = False
        self.wait_s, self.steps, self.start = 0.0, 0, time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def begin(self, now: float) -> None:
        self.start = now

    def timed(self, loader: Iterator[Batch]) -> Iterator[Batch]:
        """The loader's batches, the time spent waiting for each counted as data wait."""
        while True:
            wait_start = time.perf_counter()
            batch = next(loader)
            self.wait_s += time.perf_counter() - wait_start
            yield batch

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.tokens += result.tokens
        if result.dropped is not None:
            self.dropped += result.dropped
            self.counts_dropped = True

    def exclude(self, seconds: float) -> None:
        """Evaluation and checkpoint time is not training time: keep it out of tokens/s."""
        self.start += seconds

    def read(self, loss: torch.Tensor) -> Interval:
        """The interval's figures over all ranks (collectives: every rank calls it at the same step)."""
        now = time.perf_counter()
        tokens = int(over_ranks(self.tokens, dist.ReduceOp.SUM, self.place))
        dropped = int(self.dropped) if self.counts_dropped else 0
        mean_loss = over_ranks(loss, dist.ReduceOp.AVG, self.place)
        seconds = max(now - self.start, 1e-9)
        tokens_per_second = tokens / seconds
        mfu = tokens_per_second * self.flops_per_token / self.peak_flops if self.peak_flops else None
        interval = Interval(
            loss=mean_loss,
            tokens=tokens,
            seconds=seconds,
            steps=self.steps,
            tokens_per_second=tokens_per_second,
            data_wait_share=self.wait_s / seconds,
            mfu=mfu,
            dropped=dropped,
        )
        self.start, self.wait_s, self.steps = now, 0.0, 0
        self.tokens.zero_()
        if dropped:
            self.dropped.zero_()
        return interval


class Evaluator:
    """The held-out fill-mask evaluation every `--eval-every` steps (and at the end), on rank 0."""

    def __init__(self, plan: RunPlan, data: PreparedDataset, log: Callable[[str], None]) -> None:
        assert plan.batch.micro_batch_size is not None, "a complete plan"
        self.plan, self.data, self.log = plan, data, log
        self.every = plan.settings.eval_every
        self.batch_size = plan.batch.micro_batch_size

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, model: torch.nn.Module, *, state: TrainState, training_seconds: float) -> None:
        """Score the model; the record goes into the history (rank 0), every rank waits for it."""
        if self.plan.placement.is_main:
            # Eagerly: held-out batches have their own shapes (the exact masked set, a short last
            # batch), which would recompile the training graph or record more CUDA graphs.
            with torch.compiler.set_stance("force_eager"):
                result = evaluate(
                    model,
                    self.data.eval,
                    batch_size=self.batch_size,
                    max_batches=self.plan.settings.eval_batches,
                    special_token_ids=self.data.special_token_ids,
                    mask_token_id=self.data.mask_token_id,
                    mask_rate=EVAL_MASK_RATE,
                    seed=EVAL_SEED,  # the positions `microbert eval` scores: the two figures agree
                    device=self.plan.placement.device,
                )
            record = {
                "step": state.step,
                "training_seconds": training_seconds,
                "tokens_seen": state.tokens_seen,
                **result.to_dict(),
            }
            state.history["eval"].append(record)
            state.last_eval = record
            self.log(
                f"eval step {state.step}: fill-mask accuracy {result.accuracy * 100:.2f}% top-1, "
                f"{result.top5_accuracy * 100:.2f}% top-5 ({result.over_baseline:.2f}× the constant guess "
                f"{result.baseline_accuracy * 100:.2f}%), loss {result.loss:.4f}, perplexity "
                f"{result.perplexity:.1f}, over {result.num_masked} held-out tokens all [MASK]ed"
            )
        checkpointing._barrier()


def run_record(plan: RunPlan) -> dict[str, Any]:
    """What the weights are bound to, and the settings they are trained with (`run.json`)."""
    return {
        "model": checkpointing.model_shape(plan.model.to_dict()),
        "tokenizer_hash": plan.data.tokenizer_hash,
        "data_hash": plan.data.data_hash,
        "dataset_cache_key": plan.data.cache_key,
        "seq_len": plan.settings.seq_len,
        "seed": plan.settings.seed,
        "settings": plan.settings.to_dict(),
    }


class Checkpointer:
    """Checkpoints every `--checkpoint-every` steps (and at the end or a stop), each with its export:
    the servable artifact folder, `export/latest` moved only once it is complete."""

    def __init__(
        self,
        plan: RunPlan,
        *,
        run_dir: Path,
        engine: Any,
        loader: ShardLoader,
        data: PreparedDataset,
        log: Callable[[str], None],
    ) -> None:
        self.plan, self.engine, self.loader, self.data, self.log = plan, engine, loader, data, log
        self.every = plan.settings.checkpoint_every
        self.run_dir = run_dir
        self.checkpoint_dir, self.export_dir = run_dir / "checkpoints", run_dir / "export"
        self.last_plot = time.monotonic()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, state: TrainState, *, elapsed_s: float, final: bool) -> None:
        if any(c.step == state.step for c in checkpointing.list_complete(self.checkpoint_dir)):
            return  # already saved (e.g. a stop right after a scheduled checkpoint)
        place = self.plan.placement
        shared = {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "elapsed_s": elapsed_s,
            "history": state.history,
        }
        loader_state = json.loads(json.dumps(self.loader.state_dict(), default=_plain))
        rank_state = {"loader": loader_state, "rng": checkpointing.rng_state()}
        folder = checkpointing.save(
            self.engine,
            self.checkpoint_dir,
            state.step,
            shared_state=shared,
            rank_state=rank_state,
            run_record=run_record(self.plan),
            rank=place.rank,
            world_size=place.world_size,
            keep=self.plan.settings.keep_checkpoints,
            batch=self.plan.batch.checkpoint_record(),
        )
        if place.is_main:
            self.export(state)
            plot = final or time.monotonic() - self.last_plot > PLOT_EVERY_S
            write_history(self.run_dir, state.history, plot=plot)
            if plot:
                self.last_plot = time.monotonic()
            self.log(
                f"checkpoint step {state.step}: {folder}; export {self.export_dir / f'step-{state.step}'}"
            )
        checkpointing._barrier()

    def export(self, state: TrainState) -> None:
        """The servable artifact of this step; `export/latest` moves only once it is complete."""
        folder = self.export_dir / f"step-{state.step}"
        metadata = {
            "step": state.step,
            "seq_len": self.plan.settings.seq_len,
            "tokens_seen": state.tokens_seen,
            "dataset": self.plan.settings.dataset,
            "eval": state.last_eval,
        }
        model = self.engine.module.sync_to_model()  # the flat parameters' values, in the model's names
        save_artifact(model, self.data.tokenizer, folder, metadata=metadata)
        update_latest(self.export_dir, folder)
        keep = {f"step-{c.step}" for c in checkpointing.list_complete(self.checkpoint_dir)}
        keep.add(folder.name)
        for old in self.export_dir.glob("step-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def export_if_behind(self, state: TrainState) -> None:
        """A run killed while exporting has its checkpoint but not its export: write it now."""
        name = f"step-{state.step}"
        latest = self.export_dir / LATEST
        current = latest.read_text().strip() if latest.is_file() else None
        if current == name and (self.export_dir / name).is_dir():
            return
        self.log(f"export/{LATEST} names {current or 'nothing'}, behind checkpoint {name}: exporting it")
        self.export(state)


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and arrays in a loader state."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's loader state")
