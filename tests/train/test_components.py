"""The parts of a run that keep their own time (train/components.py): each answers "is it my step?",
the meter's figures over an interval, and the training clock that leaves evaluation out."""

from __future__ import annotations

import time

import pytest
import torch

from microbert.plan import DataPlan, Placement, plan_run
from microbert.run_config import resolve
from train.components import Checkpointer, Evaluator, IntervalMeter, TrainingClock
from train.step import StepResult

CPU = Placement(rank=0, local_rank=0, world_size=1, device="cpu", precision="fp32")


def _plan(tmp_path, **flags):
    resolved = resolve(
        profile="cpu", ds_config=None, run_file=None, flags={"run_dir": str(tmp_path), **flags}
    )
    data = DataPlan(dataset="embedded", seq_len=64, vocab_size=4096, train_sequences=5000, eval_sequences=50)
    return plan_run(resolved, CPU, data)


def test_each_part_answers_its_own_cadence(tmp_path):
    plan = _plan(tmp_path, eval_every=4, checkpoint_every=6, log_every=3)
    # what they are given besides the plan is never touched by due()
    evaluator = Evaluator(plan, data=None, log=print)  # type: ignore[arg-type]
    checkpointer = Checkpointer(plan, run_dir=tmp_path, engine=None, loader=None, data=None, log=print)  # type: ignore[arg-type]
    meter = IntervalMeter(CPU, every=plan.settings.log_every, flops_per_token=1, peak_flops=None)
    steps = range(1, 13)
    assert [s for s in steps if evaluator.due(s)] == [4, 8, 12]
    assert [s for s in steps if checkpointer.due(s)] == [6, 12]
    assert [s for s in steps if meter.due(s)] == [3, 6, 9, 12]


def _result(tokens: int, dropped: int | None = None) -> StepResult:
    return StepResult(
        loss=torch.tensor(2.5),
        tokens=torch.tensor(tokens),
        dropped=torch.tensor(dropped) if dropped is not None else None,
    )


def test_the_meter_reads_an_interval_then_starts_the_next_from_zero():
    meter = IntervalMeter(CPU, every=10, flops_per_token=1000, peak_flops=4e9)
    start = time.perf_counter()
    meter.begin(start)
    batches = meter.timed(iter([(torch.ones(1), torch.ones(1))] * 2))
    next(batches), next(batches)
    meter.add(_result(300, dropped=1))
    meter.add(_result(200, dropped=2))
    meter.exclude(-1.0)  # an hour-long evaluation would shift the start forward; here back by a second
    interval = meter.read(torch.tensor(2.5))
    assert (interval.tokens, interval.steps, interval.dropped, interval.loss) == (500, 2, 3, 2.5)
    assert interval.seconds >= 1.0 and interval.tokens_per_second == pytest.approx(500 / interval.seconds)
    assert interval.mfu == pytest.approx(interval.tokens_per_second * 1000 / 4e9)
    assert 0 <= interval.data_wait_share < 1
    meter.add(_result(7))
    after = meter.read(torch.tensor(1.0))
    assert (after.tokens, after.steps, after.dropped) == (7, 1, 0) and after.seconds < 1.0
    assert IntervalMeter(CPU, every=1, flops_per_token=1, peak_flops=None).read(torch.tensor(0.0)).mfu is None


def test_the_training_clock_leaves_out_the_first_step_and_paused_time():
    clock = TrainingClock()
    clock.resume_from(100.0)  # seconds trained before a restart
    started = clock.start()
    time.sleep(0.2)
    assert clock.first_step_done(started) >= 0.2 and clock.startup_s >= 0.2
    before = clock.seconds()
    assert 100.0 <= before < 100.2  # the compiling first step is not on the clock
    paused_at = time.perf_counter()
    time.sleep(0.2)
    assert clock.exclude_since(paused_at) >= 0.2
    assert clock.seconds() - before < 0.2  # nor is an evaluation
    assert clock.out_of_time(100.0) and not clock.out_of_time(200.0) and not clock.out_of_time(None)
