"""The training run: take the run folder, plan the run, build its parts, then step until done.

`run()` opens a `Launch` (the run folder locked, the process group joined, the log open),
`build_trainer` makes the plan (microbert/plan.py) and everything built from it (data, model,
engine, the step, the meter, evaluation, checkpoints) and restores a checkpoint, and
`Trainer.train` only orders the work, torchtitan-style: a step, then whichever of logging,
evaluation and checkpointing is due.

Exact resume rests on three things: the loader's (epoch, position) saved in every checkpoint; the
masking generator and the dropout RNG reseeded every step from (seed, step, rank) (train/step.py),
so no random stream has to be carried across a restart; and DeepSpeed restoring weights, Adam
moments and the LR schedule. On CPU a run stopped and resumed ends with the very same bits as one
that never stopped.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from microbert.commands.predict import render
from microbert.config import resolve_position_init
from microbert.data import PreparedDataset, ShardLoader, prepare_dataset
from microbert.data.cache import cache_root
from microbert.errors import MicroBertError
from microbert.plan import DataPlan, Placement, RunPlan, plan_run
from microbert.predict import FillMaskPredictor
from microbert.run_config import Resolved, TrainConfig
from train import checkpointing
from train.components import (
    Checkpointer,
    Evaluator,
    Interval,
    IntervalMeter,
    TrainingClock,
    TrainState,
    run_record,
)
from train.engine import (
    Engine,
    auto_micro_batch,
    build_engine,
    compile_mode,
    device_model,
    init_distributed,
    oom_message,
)
from train.launcher import STOP_FILE
from train.nodes import Nodes, PeerLost, discover, peer_lost
from train.reporting import Progress, RunLog, ScalarReport, peak_flops
from train.run_lock import RunLock
from train.step import TrainStep, build_loader, build_model

DEFAULT_PROBES = [
    "The [MASK] of the king was great.",
    "I will not [MASK] it.",
    "He went to the [MASK] and sat down.",
    "What is your [MASK], my lord?",
    "She looked at him with [MASK] eyes.",
]


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0.

    With several ranks the flags are combined every step over a CPU (gloo) group: a reduction of a
    GPU tensor read back with `.item()` would make every step wait for the GPU's queue to drain.
    """

    def __init__(self, place: Placement, stop_file: Path | None = None) -> None:
        self.signal: int | None = None
        self.group = None
        # `microbert-train --hostfile` asks for a stop with a file in the run folder (train/launcher.py):
        # rank 0 looks for it once a second, and the flag travels with the others
        self.stop_file = stop_file if place.is_main else None
        self.run_stop_file = stop_file
        self.file_seen = False
        self._next_look = 0.0
        self.agreed_value = 0
        if place.world_size > 1:
            # every rank creates the group, in the same order (a collective call)
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def agreed(self, out_of_time: bool = False) -> tuple[bool, bool]:
        """(stop, out of time), true on every rank if true on any: a signal (or the stop file), or a
        clock past the time budget. Ranks must stop, and checkpoint, at the same step.

        The stop value reduced is the highest signal number asked for anywhere (1 for the stop
        file), so rank 0's log can say what stopped a run even when the signal reached another node.
        """
        values = (self.signal or (1 if self._file_asked() else 0), int(out_of_time))
        if self.group is not None:
            tensor = torch.tensor(values)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
            values = (int(tensor[0]), int(tensor[1]))
        self.agreed_value = values[0]
        return values[0] > 0, bool(values[1])

    def _file_asked(self) -> bool:
        if self.stop_file is None or self.file_seen:
            return self.file_seen
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + 1.0
            self.file_seen = self.stop_file.exists()
        return self.file_seen

    def reason(self) -> str:
        if self.file_seen and self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)  # honoured: the next start must not stop at once
        if self.agreed_value > 1:
            where = "" if self.signal == self.agreed_value else " on another rank"
            return f"signal {signal.Signals(self.agreed_value).name}{where}"
        if self.agreed_value == 1:
            return f"stop file {self.run_stop_file}"
        return "a stop request"


class Launch:
    """This trainer's place in the world: the run folder (locked), the process group, the log.

    Opened before anything heavy, so a second trainer on a live folder is told at once; closed
    (log and lock released) however the run ends.
    """

    def __init__(self, settings: TrainConfig, local_rank: int | None) -> None:
        self.run_dir = Path(settings.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.export_dir = self.run_dir / "export"
        self.lock = RunLock(self.run_dir)
        # Global rank 0 (the launchers' RANK) takes the folder before the process group forms, so a
        # second trainer is told at once, not after DeepSpeed's start-up; every rank then learns it.
        early = os.environ.get("RANK", "0") == "0"
        problem = self._take_run_folder() if early else None
        self.place: Placement = init_distributed(local_rank, settings.precision)
        if self.place.is_main and not early:
            problem = self._take_run_folder()
        problem = checkpointing.agree(problem)  # every rank stops if rank 0 could not take the folder
        if problem is not None:
            raise MicroBertError(problem)
        checkpointing._barrier()
        self.nodes: Nodes = discover(self.place.rank, self.place.world_size)
        checkpointing.require_shared_run_dir(self.run_dir, self.nodes)
        self.log = RunLog(self.run_dir / "train.log", self.place.is_main)
        self.stop = StopRequest(self.place, self.run_dir / STOP_FILE)

    def _take_run_folder(self) -> str | None:
        """Lock the run folder for this trainer; the problem in words, or None."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before anything in the folder is read, written or cleared
        except MicroBertError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot use {self.run_dir} as the run folder: {exc.strerror or exc}"
        return None

    def close(self) -> None:
        self.log.close()
        self.lock.release()


# --- building a trainer -----------------------------------------------------------------------------
def build_trainer(launch: Launch, resolved: Resolved, launch_command: str) -> Trainer:
    """The run's plan, and every part of the run built from it; the latest checkpoint restored."""
    t, place, log = resolved.train, launch.place, launch.log
    compile_mode(place)  # read first, so a bad MICROBERT_COMPILE is reported before any data is prepared
    log(
        f"run {launch.run_dir} | {place.world_size} process(es) on {place.device_type} | precision "
        f"{place.precision} | layers: {' < '.join(resolved.sources)}"
    )
    if place.is_main:
        for debris in checkpointing.remove_debris(launch.run_dir):
            log(f"removed {debris}, left by a trainer that stopped mid-write")
    if t.resume == "never" and place.is_main:
        _clear_previous_run(launch)
    data = _prepare_data(launch, resolved)
    vocab = data.tokenizer.get_vocab_size()
    if vocab != resolved.model_config.vocab_size:
        log(f"tokenizer has {vocab} tokens: the embedding matrix is sized to match")
    log(
        f"data {t.dataset}: {len(data.train)} training and {len(data.eval)} held-out sequences of "
        f"{t.seq_len} tokens ({'cached' if data.cached else 'prepared'}, {data.path})"
    )
    latest = checkpointing.latest_complete(launch.checkpoint_dir) if t.resume == "auto" else None

    def resume_grad_accum(micro_batch: int) -> int:
        """On another number of ranks than the checkpoint's, keep its global batch (checkpointing.py)."""
        if latest is None:
            return t.grad_accum
        accum, note = checkpointing.batch_for_resume(
            latest,
            requested={"micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum},
            micro_batch=micro_batch,
            world_size=place.world_size,
        )
        if note:
            log(note)
        return accum

    plan = plan_run(
        resolved,
        place,
        DataPlan.of(data, t.dataset),
        size_micro_batch=lambda model: auto_micro_batch(model, t.seq_len, place),
        resume_grad_accum=resume_grad_accum,
    )
    settings, batch = plan.settings, plan.batch
    assert plan.complete and batch.micro_batch_size is not None, plan.unresolved
    model = build_model(plan, data)
    loader = build_loader(plan, data)
    clock = TrainingClock()
    try:
        parts = build_engine(model, plan, clock.seconds)
    except torch.OutOfMemoryError:
        raise MicroBertError(oom_message(settings, batch.micro_batch_size)) from None
    train_step = TrainStep(parts.engine, plan, data)
    flops_per_token = plan.model.training_flops_per_token(settings.seq_len)
    peak = peak_flops(device_model(place))
    log(
        f"model {settings.model}: {plan.model.num_parameters() / 1e6:.2f}M parameters, "
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + 12·L·d·S); micro-batch "
        f"{batch.micro_batch_size} × accumulation {batch.grad_accum} × {place.world_size} rank(s) = "
        f"{batch.train_batch_size} sequences per step; {plan.length()} "
        f"({batch.batches_per_epoch} batches per epoch per rank); dropout "
        f"{plan.model.hidden_dropout_prob:g}, masking {settings.mlm_probability:.0%}, peak LR "
        f"{settings.lr:g} ({settings.schedule}), "
        f"{resolve_position_init(settings.position_init, plan.model.hidden_size)} position init, "
        f"{settings.residual_init} residual init, {settings.output_bias_init} output bias"
    )
    if warning := plan.schedule.warmup_warning():
        log(warning)
    checkpointer = Checkpointer(
        plan, run_dir=launch.run_dir, engine=parts.engine, loader=loader, data=data, log=log
    )
    state, resumed = TrainState(), None
    if latest is not None:
        state, resumed = _resume(launch, plan, parts, loader, clock, latest)
        if place.is_main:
            checkpointer.export_if_behind(state)
    if place.is_main:
        _write_resolved_config(launch.run_dir, plan, parts.config, launch_command, resumed)
    checkpointing._barrier()
    return Trainer(
        launch=launch,
        plan=plan,
        loader=loader,
        parts=parts,
        train_step=train_step,
        meter=IntervalMeter(
            place,
            every=settings.log_every,
            flops_per_token=flops_per_token,
            peak_flops=peak * place.world_size if peak else None,
        ),
        evaluator=Evaluator(plan, data, log),
        checkpointer=checkpointer,
        clock=clock,
        state=state,
    )


def _prepare_data(launch: Launch, resolved: Resolved) -> PreparedDataset:
    """The prepared data, once per cache (train/nodes.py), tokenized to the preset's vocabulary size."""
    t, place = resolved.train, launch.place
    return launch.nodes.prepare_once(
        cache_root(),
        lambda tokenizer: prepare_dataset(
            t.dataset,
            tokenizer=tokenizer,
            seq_len=t.seq_len,
            vocab_size=resolved.model_config.vocab_size,
            max_samples=t.max_samples,
            streaming=t.streaming,
            text_column=t.text_column,
            progress=place.is_main and sys.stderr.isatty(),
        ),
        launch.log,
    )


def _clear_previous_run(launch: Launch) -> None:
    for folder in (launch.checkpoint_dir, launch.export_dir):
        if folder.exists():
            launch.log(f"--resume never: removing the previous run's {folder}")
            shutil.rmtree(folder)
    for name in ("training_history.json", "training_history.png", "status.json"):
        (launch.run_dir / name).unlink(missing_ok=True)


def _resume(
    launch: Launch,
    plan: RunPlan,
    parts: Engine,
    loader: ShardLoader,
    clock: TrainingClock,
    info: checkpointing.CheckpointInfo,
) -> tuple[TrainState, dict[str, Any]]:
    """Weights, optimizer, schedule, loader and RNG from checkpoint `info`; returns the run's state
    there and the resume's record (the step, and the settings changed since: `resolved_config.json`)."""
    place, log = plan.placement, launch.log
    record, saved = run_record(plan), info.record()
    changed: dict[str, list[Any]] = {}
    if saved is None:
        log(f"{info.path} has no {checkpointing.RUN_RECORD} (an older version wrote it): not checked")
    else:
        bound = checkpointing.bound_changes(saved, record)
        if bound:
            raise MicroBertError(
                f"cannot resume {launch.run_dir} from step {info.step}: the checkpoint's weights belong to "
                f"another {'; '.join(bound)}. Resume with the settings the run started with (its "
                "resolved_config.json lists them; the data as it was prepared then), or start afresh "
                "with --resume never or a new --run-dir"
            )
        changed = checkpointing.setting_changes(saved.get("settings", {}), record["settings"])
    client, rank_state = checkpointing.load(
        parts.engine, info, rank=place.rank, world_size=place.world_size, log=log
    )
    history = client["history"]
    state = TrainState(
        step=int(client["step"]),
        tokens_seen=int(client["tokens_seen"]),
        history=history,
        last_eval=history["eval"][-1] if history["eval"] else None,
    )
    clock.resume_from(float(client["elapsed_s"]))
    if rank_state is not None:
        loader.load_state_dict(rank_state["loader"])
        if "rng" in rank_state:
            checkpointing.set_rng_state(rank_state["rng"])
    log(
        f"resumed from step {state.step} ({info.path}); {state.tokens_seen:,} tokens seen, "
        f"loader at epoch {loader.epoch}"
    )
    if changed:
        _apply_changes(plan.settings, parts, changed, state.step, log)
    return state, {"step": state.step, "changed": changed}


def _apply_changes(
    t: TrainConfig, parts: Engine, changed: dict[str, list[Any]], step: int, log: RunLog
) -> None:
    """Settings that differ from the checkpoint's take effect from the resumed step on.

    DeepSpeed restores the optimizer's hyper-parameters and the schedule's peak from the
    checkpoint; the new values are put back here. The schedule's shape (warm-up, decay, total
    steps) is code, not state, and follows the new plan by itself.
    """
    described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    log(f"changed since the checkpoint, applied from step {step} on: {described}")
    scheduler = parts.scheduler
    groups = scheduler.optimizer.param_groups
    for group in groups:
        group["initial_lr"] = t.lr
        group["betas"] = (t.adam_beta1, t.adam_beta2)
        group["eps"] = t.adam_eps
    scheduler.base_lrs = [t.lr for _ in groups]
    last = scheduler.last_epoch
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = t.lr * factor(last)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def _write_resolved_config(
    run_dir: Path,
    plan: RunPlan,
    engine_config: dict[str, Any],
    launch_command: str,
    resumed: dict[str, Any] | None,
) -> None:
    """`resolved_config.json`: the plan, the config DeepSpeed was given, the command, the resumes."""
    resolved = plan.to_dict()
    resolved["deepspeed"] = engine_config
    resolved["runtime"]["launch_command"] = launch_command
    # every resume of this run that changed a setting: the settings above are those in force now
    resumes: list[Any] = []
    previous = run_dir / "resolved_config.json"
    if resumed is not None and previous.is_file():
        try:
            resumes = list(json.loads(previous.read_text()).get("resumes", []))
        except (OSError, ValueError, TypeError):
            resumes = []
    if resumed is not None and resumed["changed"]:
        resumes.append(resumed)
    resolved["resumes"] = resumes
    tmp = run_dir / ".resolved_config.json.tmp"
    tmp.write_text(json.dumps(resolved, indent=2) + "\n")
    os.replace(tmp, run_dir / "resolved_config.json")


# --- the run ------------------------------------------------------------------------------------------
class Trainer:
    """A fully built run (`build_trainer`): `train()` orders the work, `report()` says how it went."""

    def __init__(
        self,
        *,
        launch: Launch,
        plan: RunPlan,
        loader: ShardLoader,
        parts: Engine,
        train_step: TrainStep,
        meter: IntervalMeter,
        evaluator: Evaluator,
        checkpointer: Checkpointer,
        clock: TrainingClock,
        state: TrainState,
    ) -> None:
        self.launch, self.log, self.plan = launch, launch.log, plan
        self.loader, self.parts, self.train_step = loader, parts, train_step
        self.meter, self.evaluator, self.checkpointer = meter, evaluator, checkpointer
        self.clock, self.state = clock, state

    def _finished(self) -> bool:
        total = self.plan.schedule.total_steps
        return total is not None and self.state.step >= total

    def train(self) -> str:
        """Run to the end (or a stop); returns "finished" or "stopped"."""
        t, place, state, stop = self.plan.settings, self.plan.placement, self.state, self.launch.stop
        stop.install()
        progress = Progress(
            self.log, total=self.plan.schedule.total_steps, initial=state.step, every=t.log_every
        )
        scalars = ScalarReport(t.report_to, self.launch.run_dir, state.history, enabled=place.is_main)
        start = self.clock.start()
        self.meter.begin(start)
        first_step = state.step
        batches = self.meter.timed(self.loader)
        try:
            while not self._finished():
                result = self.train_step(state.step, batches)
                state.step += 1
                if state.step == first_step + 1:
                    startup = self.clock.first_step_done(start)
                    self.log(
                        f"first step took {startup:.1f} s (compilation, warm-up): not on the training clock"
                    )
                self.meter.add(result)
                signalled, out_of_time = stop.agreed(self.clock.out_of_time(t.time_budget_s))
                stopping = signalled or state.step == t.stop_at_step
                last = out_of_time or self._finished()
                evaluate = last or self.evaluator.due(state.step)
                checkpoint = last or stopping or self.checkpointer.due(state.step)
                # an evaluation or a checkpoint reads the meter too, so their tokens_seen is current
                if self.meter.due(state.step) or evaluate or checkpoint:
                    self._record(self.meter.read(result.loss), progress)
                paused_at = time.perf_counter()
                if evaluate:
                    self.evaluator.run(
                        self.parts.engine.module, state=state, training_seconds=self.clock.seconds()
                    )
                if checkpoint:
                    self.checkpointer.save(state, elapsed_s=self.clock.seconds(), final=last or stopping)
                scalars.write(state.history)
                # eval and checkpoint time is not training time: keep it out of tokens/s and the clock
                self.meter.exclude(self.clock.exclude_since(paused_at))
                if stopping:
                    reason = "--stop-at-step" if state.step == t.stop_at_step else stop.reason()
                    self.log(f"stopped at step {state.step} ({reason}); the same command resumes from here")
                    return "stopped"
                if last:
                    break  # the time budget is spent (a step count ends the loop by itself)
        finally:
            progress.close()
            scalars.close()
        return "finished"

    def _record(self, interval: Interval, progress: Progress) -> None:
        """The interval's line in the history and the progress bar or log."""
        state = self.state
        if interval.dropped:
            self.log(
                f"warning: {interval.dropped} masked positions did not fit the MLM head's "
                f"{self.train_step.masked_slots} slots before step {state.step} and were left out of the loss"
            )
        state.tokens_seen += interval.tokens
        grad_norm = self.parts.optimizer.last_grad_norm
        record = {
            "step": state.step,
            "loss": interval.loss,
            "lr": float(self.parts.scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_second": interval.tokens_per_second,
            "mfu": interval.mfu,
            "data_wait_share": interval.data_wait_share,
            "tokens_seen": state.tokens_seen,
        }
        state.history["train"].append(record)
        progress.update(state.step, record, self._eta(interval))

    def _eta(self, interval: Interval) -> float:
        """Seconds left: of the time budget, or at this interval's pace, whichever ends first."""
        candidates = []
        budget, total = self.plan.settings.time_budget_s, self.plan.schedule.total_steps
        if budget is not None:
            candidates.append(max(0.0, budget - self.clock.seconds()))
        if total is not None:
            candidates.append((total - self.state.step) * interval.seconds / max(interval.steps, 1))
        return min(candidates)

    # --- the end ----------------------------------------------------------------------------------
    def report(self, outcome: str) -> None:
        """Status file, peak memory and, at the end of a finished run, the probe predictions."""
        place, state = self.plan.placement, self.state
        if not place.is_main:
            return
        peak = _peak_memory(place)
        elapsed = self.clock.seconds()
        total = self.plan.schedule.total_steps
        self.log(
            f"{outcome} at step {state.step}/{total or state.step}: "
            f"{state.tokens_seen:,} non-padding tokens, "
            f"{elapsed:.0f} s of training in all, peak memory {peak}"
        )
        status = {
            "state": outcome,
            "step": state.step,
            "total_steps": total,
            "training_seconds": round(elapsed, 3),
            "startup_seconds": round(self.clock.startup_s, 3),
            "tokens_seen": state.tokens_seen,
            "eval": state.last_eval,
        }
        (self.launch.run_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
        if outcome == "finished":
            probes = self.plan.settings.probe_texts or DEFAULT_PROBES
            predictor = FillMaskPredictor.from_pretrained(self.launch.run_dir, device="cpu")
            block = render(probes, predictor.predict(probes, top_k=5))
            for line in block.rstrip("\n").split("\n"):
                self.log(line)


def _peak_memory(place: Placement) -> str:
    if place.on_cpu:
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{rss_kib / 2**20:.2f} GiB resident (CPU)"
    accelerator = get_accelerator()
    peak = accelerator.max_memory_allocated(place.local_rank)
    reserved = accelerator.max_memory_reserved(place.local_rank)
    return f"{peak / 2**30:.2f} GiB allocated ({reserved / 2**30:.2f} GiB reserved) on {place.device}"


def run(resolved: Resolved, local_rank: int | None) -> int:
    """Train to the end or to a stop; 0 in both cases."""
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        launch = Launch(resolved.train, local_rank)
    except KeyboardInterrupt:
        raise Interrupted(SETUP_INTERRUPTED) from None
    trainer: Trainer | None = None
    try:
        try:
            trainer = build_trainer(launch, resolved, command)
        except KeyboardInterrupt:
            raise Interrupted(SETUP_INTERRUPTED) from None
        trainer.report(trainer.train())
        if dist.is_initialized():
            # every rank leaves together: no NCCL watchdog is left polling a closed store at exit
            dist.barrier()
            dist.destroy_process_group()
    except torch.OutOfMemoryError:
        # a step maps its own (train/step.py); this is an evaluation, an export, or the set-up
        micro_batch = trainer.plan.batch.micro_batch_size if trainer is not None else None
        raise MicroBertError(oom_message(resolved.train, micro_batch or 0)) from None
    except RuntimeError as exc:  # torch.distributed errors are RuntimeErrors
        if not peer_lost(exc):
            raise
        raise PeerLost(exc, launch.checkpoint_dir) from None
    finally:
        launch.close()
    return 0


SETUP_INTERRUPTED = (
    "interrupted (Ctrl-C) while setting up, before the first step: nothing was trained; run the same "
    "command again to start (a data preparation continues where it stopped)"
)


class Interrupted(MicroBertError):
    exit_code = 130  # the shell's code for a command ended by SIGINT
