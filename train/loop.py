"""The training run: data, model, engine, resume, the step loop, eval, checkpoints, exports, report.

Exact resume rests on three things: the loader's (epoch, position) saved in every checkpoint; the
masking generator and the dropout RNG reseeded every step from (seed, step, rank), so no random
stream has to be carried across a restart; and DeepSpeed restoring weights, Adam moments and the
LR schedule. On CPU a run stopped and resumed ends with the very same bits as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from microbert.checkpoint import LATEST, save_artifact, update_latest
from microbert.commands.predict import render
from microbert.config import resolve_position_init
from microbert.data import ShardLoader, mask_tokens, prepare_dataset
from microbert.data.cache import cache_root
from microbert.errors import MicroBertError
from microbert.evaluate import EVAL_MASK_RATE, EVAL_SEED, evaluate
from microbert.model import BertForMaskedLM, init_position_embeddings, masked_slots_for
from microbert.predict import FillMaskPredictor
from microbert.run_config import Resolved
from microbert.tokenizer import tokenizer_hash
from train import checkpointing
from train.engine import (
    Placement,
    auto_micro_batch,
    build_engine,
    compile_mode,
    init_distributed,
    oom_message,
    warmup_warning,
)
from train.launcher import STOP_FILE
from train.nodes import PeerLost, discover, peer_lost
from train.reporting import Progress, RunLog, ScalarReport, peak_flops, write_history
from train.run_lock import RunLock

PLOT_EVERY_S = 300.0  # redraw training_history.png at most this often before the end

DEFAULT_PROBES = [
    "The [MASK] of the king was great.",
    "I will not [MASK] it.",
    "He went to the [MASK] and sat down.",
    "What is your [MASK], my lord?",
    "She looked at him with [MASK] eyes.",
]


def _seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so (seed, step, rank) streams never overlap."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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


class Trainer:
    def __init__(self, resolved: Resolved, local_rank: int | None, launch_command: str):
        self.resolved = resolved
        self.t = resolved.train
        self.launch_command = launch_command
        self.run_dir = Path(self.t.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.export_dir = self.run_dir / "export"
        self.lock = RunLock(self.run_dir)
        # Global rank 0 (the launchers' RANK) takes the folder before the process group forms, so a
        # second trainer is told at once, not after DeepSpeed's start-up; every rank then learns it.
        early = os.environ.get("RANK", "0") == "0"
        problem = self._take_run_folder() if early else None
        self.place = init_distributed(local_rank, self.t.precision)
        if self.place.is_main and not early:
            problem = self._take_run_folder()
        problem = checkpointing.agree(problem)  # every rank stops if rank 0 could not take the folder
        if problem is not None:
            raise MicroBertError(problem)
        checkpointing._barrier()
        self.nodes = discover(self.place.rank, self.place.world_size)
        checkpointing.require_shared_run_dir(self.run_dir, self.nodes)
        self.log = RunLog(self.run_dir / "train.log", self.place.is_main)
        self.stop = StopRequest(self.place, self.run_dir / STOP_FILE)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        # training seconds (evaluation and checkpoints excluded): the clock a time budget runs on
        self.clock_origin = time.perf_counter()
        self.paused_s = 0.0
        self.startup_s = 0.0
        self.history: dict[str, Any] = {"train": [], "eval": []}
        self.last_eval: dict[str, Any] | None = None
        self.last_plot = time.monotonic()

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

    # --- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        t, place = self.t, self.place
        # read first, so a bad MICROBERT_COMPILE is reported before any data is prepared
        self.cuda_graphs = compile_mode(place) == "reduce-overhead"
        self.log(
            f"run {self.run_dir} | {place.world_size} process(es) on {place.device.type} | precision "
            f"{place.precision} | layers: {' < '.join(self.resolved.sources)}"
        )
        if place.is_main:
            for debris in checkpointing.remove_debris(self.run_dir):
                self.log(f"removed {debris}, left by a trainer that stopped mid-write")
        if t.resume == "never" and place.is_main:
            self._clear_previous_run()
        model_config = self.resolved.model_config
        data = self.nodes.prepare_once(
            cache_root(),
            lambda tokenizer: prepare_dataset(
                t.dataset,
                tokenizer=tokenizer,
                seq_len=t.seq_len,
                vocab_size=model_config.vocab_size,
                max_samples=t.max_samples,
                streaming=t.streaming,
                text_column=t.text_column,
                progress=place.is_main and sys.stderr.isatty(),
            ),
            self.log,
        )
        self.data = data
        vocab = data.tokenizer.get_vocab_size()
        if vocab != model_config.vocab_size:
            self.log(f"tokenizer has {vocab} tokens: the embedding matrix is sized to match")
            model_config = model_config.replace(vocab_size=vocab)
        self.model_config = model_config
        self.log(
            f"data {t.dataset}: {len(data.train)} training and {len(data.eval)} held-out sequences of "
            f"{t.seq_len} tokens ({'cached' if data.cached else 'prepared'}, {data.path})"
        )
        torch.manual_seed(t.seed)  # the same initial weights on every rank and every restart
        model = BertForMaskedLM(model_config)
        init_position_embeddings(model, t.position_init, t.position_init_std)
        if t.micro_batch_size == "auto":
            self.micro_batch = auto_micro_batch(model_config, t.seq_len, place)
        else:
            self.micro_batch = int(t.micro_batch_size)
        self.requested_batch = {"micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum}
        t.grad_accum = self._grad_accum_for_resume()
        self.loader = ShardLoader(
            data.train,
            batch_size=self.micro_batch,
            seed=t.seed,
            rank=place.rank,
            world_size=place.world_size,
            device=place.device,
        )
        if self.loader.batches_per_epoch < 1:
            raise MicroBertError(
                f"{len(data.train)} training sequences give no full batch of {self.micro_batch} × "
                f"{place.world_size} rank(s): lower --batch-size or use more data (--max-samples)"
            )
        self.total_steps: int | None
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.time_budget_s is not None:
            self.total_steps = None  # the clock decides; the schedule follows it (timed_schedule)
        else:
            epochs = t.epochs if t.epochs is not None else 1.0
            self.total_steps = max(1, math.ceil(epochs * self.loader.batches_per_epoch / t.grad_accum))
        self.engine, self.scheduler, ds_config, self.optimizer = build_engine(
            model,
            t,
            self.resolved.deepspeed,
            self.micro_batch,
            self.total_steps,
            place,
            self.training_seconds,
        )
        self.ds_config = ds_config
        # On an accelerator the MLM head runs on a fixed number of slots per micro-batch: static
        # shapes, no host sync per step. On a CPU the exact masked set is cheaper.
        self.masked_slots = (
            None if place.on_cpu else masked_slots_for(self.micro_batch * t.seq_len, t.mlm_probability)
        )
        self.flops_per_token = model_config.training_flops_per_token(t.seq_len)
        peak = peak_flops(_device_model(place))
        self.peak_flops = peak * place.world_size if peak else None
        self.log(
            f"model {t.model}: {model_config.num_parameters() / 1e6:.2f}M parameters, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP per token (6N + 12·L·d·S); micro-batch "
            f"{self.micro_batch} × accumulation {t.grad_accum} × {place.world_size} rank(s) = "
            f"{ds_config['train_batch_size']} sequences per step; {self._length()} "
            f"({self.loader.batches_per_epoch} batches per epoch per rank); dropout "
            f"{model_config.hidden_dropout_prob:g}, masking {t.mlm_probability:.0%}, peak LR {t.lr:g} "
            f"({t.schedule}), {resolve_position_init(t.position_init, model_config.hidden_size)} "
            "position init"
        )
        if warning := warmup_warning(t, self.total_steps):
            self.log(warning)
        if t.resume == "auto":
            self._resume()
        if place.is_main:
            self._write_resolved_config()
        checkpointing._barrier()

    def _clear_previous_run(self) -> None:
        import shutil

        for folder in (self.checkpoint_dir, self.export_dir):
            if folder.exists():
                self.log(f"--resume never: removing the previous run's {folder}")
                shutil.rmtree(folder)
        for name in ("training_history.json", "training_history.png", "status.json"):
            (self.run_dir / name).unlink(missing_ok=True)

    def _run_record(self) -> dict[str, Any]:
        """What the weights are bound to, and the settings they are trained with (`run.json`)."""
        return {
            "model": checkpointing.model_shape(self.model_config.to_dict()),
            "tokenizer_hash": tokenizer_hash(self.data.tokenizer),
            "data_hash": self.data.meta.get("data_hash"),
            "dataset_cache_key": self.data.cache_key,
            "seq_len": self.t.seq_len,
            "seed": self.t.seed,
            "settings": self.t.to_dict(),
        }

    def _resume(self) -> None:
        info = checkpointing.latest_complete(self.checkpoint_dir)
        if info is None:
            return
        record, saved = self._run_record(), info.record()
        changed: dict[str, list[Any]] = {}
        if saved is None:
            self.log(
                f"{info.path} has no {checkpointing.RUN_RECORD} (an older version wrote it): not checked"
            )
        else:
            bound = checkpointing.bound_changes(saved, record)
            if bound:
                raise MicroBertError(
                    f"cannot resume {self.run_dir} from step {info.step}: the checkpoint's weights belong to "
                    f"another {'; '.join(bound)}. Resume with the settings the run started with (its "
                    "resolved_config.json lists them; the data as it was prepared then), or start afresh "
                    "with --resume never or a new --run-dir"
                )
            changed = checkpointing.setting_changes(saved.get("settings", {}), record["settings"])
        client, rank_state = checkpointing.load(
            self.engine, info, rank=self.place.rank, world_size=self.place.world_size, log=self.log
        )
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.elapsed_before = float(client["elapsed_s"])
        self.history = client["history"]
        self.last_eval = self.history["eval"][-1] if self.history["eval"] else None
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            if "rng" in rank_state:
                checkpointing.set_rng_state(rank_state["rng"])
        self.log(
            f"resumed from step {self.step} ({info.path}); {self.tokens_seen:,} tokens seen, "
            f"loader at epoch {self.loader.epoch}"
        )
        if changed:
            self._apply_changes(changed)
        self.resumed = {"step": self.step, "changed": changed}
        if self.place.is_main:
            self._export_if_behind()

    def _apply_changes(self, changed: dict[str, list[Any]]) -> None:
        """Settings that differ from the checkpoint's take effect from the resumed step on.

        DeepSpeed restores the optimizer's hyper-parameters and the schedule's peak from the
        checkpoint; the new values are put back here. The schedule's shape (warm-up, decay, total
        steps) is code, not state, and follows the new settings by itself.
        """
        t = self.t
        described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        self.log(f"changed since the checkpoint, applied from step {self.step} on: {described}")
        groups = self.scheduler.optimizer.param_groups
        for group in groups:
            group["initial_lr"] = t.lr
            group["betas"] = (t.adam_beta1, t.adam_beta2)
            group["eps"] = t.adam_eps
        self.scheduler.base_lrs = [t.lr for _ in groups]
        step = self.scheduler.last_epoch
        for group, factor in zip(groups, self.scheduler.lr_lambdas, strict=True):
            group["lr"] = t.lr * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    def _export_if_behind(self) -> None:
        """A run killed while exporting has its checkpoint but not its export: write it now."""
        name = f"step-{self.step}"
        latest = self.export_dir / LATEST
        current = latest.read_text().strip() if latest.is_file() else None
        if current == name and (self.export_dir / name).is_dir():
            return
        self.log(f"export/{LATEST} names {current or 'nothing'}, behind checkpoint {name}: exporting it")
        self._export()

    def _grad_accum_for_resume(self) -> int:
        """On another number of ranks than the checkpoint's, keep its global batch (checkpointing.py)."""
        info = checkpointing.latest_complete(self.checkpoint_dir) if self.t.resume == "auto" else None
        if info is None:
            return self.t.grad_accum
        accum, note = checkpointing.batch_for_resume(
            info,
            requested=self.requested_batch,
            micro_batch=self.micro_batch,
            world_size=self.place.world_size,
        )
        if note:
            self.log(note)
        return accum

    def _write_resolved_config(self) -> None:
        resolved = self.resolved.to_dict()
        resolved["model"] = {"preset": self.t.model, **self.model_config.to_dict()}
        resolved["deepspeed"] = self.ds_config
        resolved["runtime"] = {
            "world_size": self.place.world_size,
            "device": self.place.device.type,
            "precision": self.place.precision,
            "micro_batch_size": self.micro_batch,
            "total_steps": self.total_steps,
            "dataset_cache_key": self.data.cache_key,
            "tokenizer_hash": tokenizer_hash(self.data.tokenizer),
            "data_hash": self.data.meta.get("data_hash"),
            "launch_command": self.launch_command,
        }
        # every resume of this run that changed a setting: the settings above are those in force now
        resumes: list[Any] = []
        resumed = getattr(self, "resumed", None)
        previous = self.run_dir / "resolved_config.json"
        if resumed is not None and previous.is_file():
            try:
                resumes = list(json.loads(previous.read_text()).get("resumes", []))
            except (OSError, ValueError, TypeError):
                resumes = []
        if resumed is not None and resumed["changed"]:
            resumes.append(resumed)
        resolved["resumes"] = resumes
        tmp = self.run_dir / ".resolved_config.json.tmp"
        tmp.write_text(json.dumps(resolved, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "resolved_config.json")

    def _length(self) -> str:
        budget = f"{self.t.time_budget_s:g} s of training" if self.t.time_budget_s is not None else None
        steps = f"{self.total_steps} steps" if self.total_steps is not None else None
        return " or ".join(x for x in (budget, steps) if x) + (
            ", whichever comes first" if budget and steps else ""
        )

    def training_seconds(self) -> float:
        """Seconds spent training in this run, restarts included (evaluation and checkpoints not)."""
        return self.elapsed_before + time.perf_counter() - self.clock_origin - self.paused_s

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> str:
        """Run to the end (or a stop); returns "finished" or "stopped"."""
        t, place = self.t, self.place
        self.stop.install()
        progress = Progress(self.log, total=self.total_steps, initial=self.step, every=t.log_every)
        scalars = ScalarReport(t.report_to, self.run_dir, self.history, enabled=place.is_main)
        start = self.clock_origin = time.perf_counter()
        self.paused_s = 0.0
        first_step = self.step
        budget = t.time_budget_s
        interval_start, interval_wait = start, 0.0
        interval_tokens = torch.zeros((), dtype=torch.long, device=place.device)
        interval_steps = 0
        # masked positions that did not fit the head's slots (odds < 1e-9 a batch); read when logging
        dropped = torch.zeros((), dtype=torch.long, device=place.device)
        generator = torch.Generator(device=place.device)
        outcome = "finished"
        try:
            while self.total_steps is None or self.step < self.total_steps:
                step = self.step
                torch.manual_seed(_seed_for(t.seed, step, place.rank, 1))  # dropout stream of this step
                loss_value = torch.zeros((), device=place.device)
                for micro in range(t.grad_accum):
                    wait_start = time.perf_counter()
                    input_ids, attention_mask = next(self.loader)
                    interval_wait += time.perf_counter() - wait_start
                    generator.manual_seed(_seed_for(t.seed, step, place.rank, 2, micro))
                    inputs, labels = mask_tokens(
                        input_ids,
                        vocab_size=self.model_config.vocab_size,
                        mask_token_id=self.data.mask_token_id,
                        special_token_ids=self.data.special_token_ids,
                        mlm_probability=t.mlm_probability,
                        generator=generator,
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
                        raise MicroBertError(oom_message(t, self.micro_batch)) from None
                    loss_value = loss_value + out.loss.detach().float() / t.grad_accum
                    interval_tokens += attention_mask.sum()
                    if self.masked_slots is not None:
                        dropped += (out.num_masked - self.masked_slots).clamp(min=0)
                self.step += 1
                if self.step == first_step + 1:
                    # The first step of a process compiles and warms up (torch.compile, CUDA graphs,
                    # DeepSpeed's buffers): the clock a time budget runs on starts after it.
                    self.startup_s = time.perf_counter() - start
                    self.clock_origin, self.paused_s = time.perf_counter(), 0.0
                    self.log(
                        f"first step took {self.startup_s:.1f} s (compilation, warm-up): "
                        "not on the training clock"
                    )
                interval_steps += 1
                signalled, out_of_time = self.stop.agreed(
                    budget is not None and self.training_seconds() >= budget
                )
                stopping = signalled or self.step == t.stop_at_step
                last = out_of_time or (self.total_steps is not None and self.step >= self.total_steps)
                if (
                    self.step % t.log_every == 0
                    or last
                    or stopping
                    or self.step % t.checkpoint_every == 0
                    or self.step % t.eval_every == 0  # so the eval record's tokens_seen is current
                ):
                    now = time.perf_counter()
                    tokens = int(self._all_ranks(interval_tokens, dist.ReduceOp.SUM))
                    if self.masked_slots is not None and int(dropped):
                        self.log(
                            f"warning: {int(dropped)} masked positions did not fit the MLM head's "
                            f"{self.masked_slots} slots before step {self.step} and were left out of the loss"
                        )
                        dropped.zero_()
                    loss = float(self._all_ranks(loss_value, dist.ReduceOp.AVG))
                    self.tokens_seen += tokens
                    seconds = max(now - interval_start, 1e-9)
                    record = self._train_record(loss, tokens / seconds, interval_wait / seconds)
                    self.history["train"].append(record)
                    # a budget, a step count, or both (whichever comes first)
                    candidates = []
                    if budget is not None:
                        candidates.append(max(0.0, budget - self.training_seconds()))
                    if self.total_steps is not None:
                        candidates.append((self.total_steps - self.step) * seconds / max(interval_steps, 1))
                    remaining = min(candidates)
                    progress.update(self.step, record, remaining)
                    interval_start, interval_wait, interval_steps = now, 0.0, 0
                    interval_tokens.zero_()
                paused_at = time.perf_counter()
                if self.step % t.eval_every == 0 or last:
                    self._evaluate()
                if self.step % t.checkpoint_every == 0 or last or stopping:
                    self._checkpoint(start, final=last or stopping)
                scalars.write(self.history)
                # eval and checkpoint time is not training time: keep it out of tokens/s and the clock
                paused = time.perf_counter() - paused_at
                interval_start += paused
                self.paused_s += paused
                if stopping:
                    reason = "--stop-at-step" if self.step == t.stop_at_step else self.stop.reason()
                    self.log(f"stopped at step {self.step} ({reason}); the same command resumes from here")
                    outcome = "stopped"
                    break
                if last:
                    break  # the time budget is spent (a step count ends the loop by itself)
        finally:
            progress.close()
            scalars.close()
        return outcome

    def _all_ranks(self, value: torch.Tensor, op: Any) -> float:
        """Sum or mean over ranks (logged steps only: one small collective, one host sync)."""
        if self.place.world_size > 1:
            value = value.detach().clone().float() if op == dist.ReduceOp.AVG else value.clone()
            if op == dist.ReduceOp.AVG and self.place.device.type == "cpu":
                dist.all_reduce(value)  # gloo has no AVG
                value /= self.place.world_size
            else:
                dist.all_reduce(value, op=op)
        return float(value.item())

    def _train_record(self, loss: float, tokens_per_second: float, wait_share: float) -> dict[str, Any]:
        grad_norm = self.optimizer.last_grad_norm
        mfu = tokens_per_second * self.flops_per_token / self.peak_flops if self.peak_flops else None
        return {
            "step": self.step,
            "loss": loss,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_second": tokens_per_second,
            "mfu": mfu,
            "data_wait_share": wait_share,
            "tokens_seen": self.tokens_seen,
        }

    def _evaluate(self) -> None:
        if self.place.is_main:
            seconds = self.training_seconds()  # before the evaluation, which is not training time
            # Eagerly: held-out batches have their own shapes (the exact masked set, a short last
            # batch), which would recompile the training graph or record more CUDA graphs.
            with torch.compiler.set_stance("force_eager"):
                result = evaluate(
                    self.engine.module,
                    self.data.eval,
                    batch_size=self.micro_batch,
                    max_batches=self.t.eval_batches,
                    special_token_ids=self.data.special_token_ids,
                    mask_token_id=self.data.mask_token_id,
                    mask_rate=EVAL_MASK_RATE,
                    seed=EVAL_SEED,  # the positions `microbert eval` scores: the two figures agree
                    device=self.place.device,
                )
            record = {
                "step": self.step,
                "training_seconds": seconds,
                "tokens_seen": self.tokens_seen,
                **result.to_dict(),
            }
            self.history["eval"].append(record)
            self.last_eval = record
            self.log(
                f"eval step {self.step}: fill-mask accuracy {result.accuracy * 100:.2f}% top-1, "
                f"{result.top5_accuracy * 100:.2f}% top-5 ({result.over_baseline:.2f}× the constant guess "
                f"{result.baseline_accuracy * 100:.2f}%), loss {result.loss:.4f}, perplexity "
                f"{result.perplexity:.1f}, over {result.num_masked} held-out tokens all [MASK]ed"
            )
        checkpointing._barrier()

    def _checkpoint(self, start: float, *, final: bool) -> None:
        if any(c.step == self.step for c in checkpointing.list_complete(self.checkpoint_dir)):
            return  # already saved (e.g. a stop right after a scheduled checkpoint)
        shared = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.training_seconds(),
            "history": self.history,
        }
        loader_state = json.loads(json.dumps(self.loader.state_dict(), default=_plain))
        rank_state = {"loader": loader_state, "rng": checkpointing.rng_state()}
        folder = checkpointing.save(
            self.engine,
            self.checkpoint_dir,
            self.step,
            shared_state=shared,
            rank_state=rank_state,
            run_record=self._run_record(),
            rank=self.place.rank,
            world_size=self.place.world_size,
            keep=self.t.keep_checkpoints,
            batch={
                "micro_batch_size": self.micro_batch,
                "grad_accum": self.t.grad_accum,
                "train_batch_size": self.ds_config["train_batch_size"],
                "requested": self.requested_batch,
            },
        )
        if self.place.is_main:
            self._export()
            plot = final or time.monotonic() - self.last_plot > PLOT_EVERY_S
            write_history(self.run_dir, self.history, plot=plot)
            if plot:
                self.last_plot = time.monotonic()
            self.log(f"checkpoint step {self.step}: {folder}; export {self.export_dir / f'step-{self.step}'}")
        checkpointing._barrier()

    def _export(self) -> None:
        """The servable artifact of this step; `export/latest` moves only once it is complete."""
        folder = self.export_dir / f"step-{self.step}"
        metadata = {
            "step": self.step,
            "seq_len": self.t.seq_len,
            "tokens_seen": self.tokens_seen,
            "dataset": self.t.dataset,
            "eval": self.last_eval,
        }
        model = self.engine.module.sync_to_model()  # the flat parameters' values, in the model's names
        save_artifact(model, self.data.tokenizer, folder, metadata=metadata)
        update_latest(self.export_dir, folder)
        keep = {f"step-{c.step}" for c in checkpointing.list_complete(self.checkpoint_dir)}
        keep.add(folder.name)
        for old in self.export_dir.glob("step-*"):
            if old.name not in keep:
                import shutil

                shutil.rmtree(old, ignore_errors=True)

    # --- the end ----------------------------------------------------------------------------------
    def report(self, outcome: str, wall_s: float) -> None:
        """Status file, peak memory and, at the end of a finished run, the probe predictions."""
        if not self.place.is_main:
            return
        peak = _peak_memory(self.place)
        elapsed = self.training_seconds()
        self.log(
            f"{outcome} at step {self.step}/{self.total_steps or self.step}: "
            f"{self.tokens_seen:,} non-padding tokens, "
            f"{elapsed:.0f} s of training in all, peak memory {peak}"
        )
        status = {
            "state": outcome,
            "step": self.step,
            "total_steps": self.total_steps,
            "training_seconds": round(elapsed, 3),
            "startup_seconds": round(self.startup_s, 3),
            "tokens_seen": self.tokens_seen,
        }
        status["eval"] = self.last_eval
        (self.run_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
        if outcome == "finished":
            probes = self.t.probe_texts or DEFAULT_PROBES
            predictor = FillMaskPredictor.from_pretrained(self.run_dir, device="cpu")
            block = render(probes, predictor.predict(probes, top_k=5))
            for line in block.rstrip("\n").split("\n"):
                self.log(line)


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and arrays in a loader state."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's loader state")


def _device_model(place: Placement) -> str | None:
    """The accelerator's model name (e.g. "NVIDIA H200"), for its peak FLOP/s; None on CPU."""
    if place.on_cpu:
        return None
    module = getattr(torch, place.device.type, None)
    try:
        return str(module.get_device_name(place.local_rank)) if module is not None else None
    except (AttributeError, RuntimeError):
        return None


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
        trainer = Trainer(resolved, local_rank, command)
    except KeyboardInterrupt:
        raise Interrupted(SETUP_INTERRUPTED) from None
    try:
        try:
            trainer.setup()
        except KeyboardInterrupt:
            raise Interrupted(SETUP_INTERRUPTED) from None
        started = time.perf_counter()
        outcome = trainer.train()
        trainer.report(outcome, time.perf_counter() - started)
        if dist.is_initialized():
            # every rank leaves together: no NCCL watchdog is left polling a closed store at exit
            dist.barrier()
            dist.destroy_process_group()
    except torch.OutOfMemoryError:
        raise MicroBertError(oom_message(resolved.train, getattr(trainer, "micro_batch", 0))) from None
    except RuntimeError as exc:  # torch.distributed errors are RuntimeErrors
        if not peer_lost(exc):
            raise
        raise PeerLost(exc, trainer.checkpoint_dir) from None
    finally:
        trainer.log.close()
        trainer.lock.release()
    return 0


SETUP_INTERRUPTED = (
    "interrupted (Ctrl-C) while setting up, before the first step: nothing was trained; run the same "
    "command again to start (a data preparation continues where it stopped)"
)


class Interrupted(MicroBertError):
    exit_code = 130  # the shell's code for a command ended by SIGINT
