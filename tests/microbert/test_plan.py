"""The run plan (microbert/plan.py): computed once from the settings layers and the launch facts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from microbert.plan import AT_LAUNCH, DataPlan, Placement, batches_per_epoch, plan_run
from microbert.run_config import resolve


def _place(world: int = 1, device: str = "cpu", precision: str = "fp32") -> Placement:
    return Placement(rank=0, local_rank=0, world_size=world, device=device, precision=precision)


def _data(train_sequences: int = 1000, vocab_size: int = 500) -> DataPlan:
    return DataPlan(
        dataset="embedded",
        seq_len=32,
        vocab_size=vocab_size,
        train_sequences=train_sequences,
        eval_sequences=10,
        cache_key="embedded-s32-x",
        tokenizer_hash="t",
        data_hash="d",
    )


def test_an_epochs_run_gets_its_steps_warmup_and_global_batch_from_the_layers_and_the_data(tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"grad_accum": 3, "epochs": 2.5}))
    resolved = resolve(
        profile=None,
        ds_config="zero1",
        run_file=str(run_file),
        flags={"micro_batch_size": 8, "vocab_size": 512, "run_dir": str(tmp_path / "run")},
    )
    plan = plan_run(resolved, _place(world=2), _data(train_sequences=1000, vocab_size=500))
    per_epoch = 1000 // (8 * 2)
    assert plan.batch.batches_per_epoch == per_epoch == 62
    assert plan.batch.train_batch_size == 8 * 3 * 2
    assert plan.schedule.total_steps == math.ceil(2.5 * per_epoch / 3) == 52
    assert plan.schedule.warmup_steps == max(1, int(0.06 * 52)) == 3
    assert plan.model.vocab_size == 500  # the tokenizer's size, not the 512 asked for
    assert plan.layers == tuple(resolved.sources) and plan.layers[-2:] == (f"run file {run_file}", "flags")
    assert plan.complete and plan.length() == "52 steps"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.batch = plan.batch  # type: ignore[misc]


def test_the_launch_decides_an_auto_micro_batch_and_a_resume_keeps_the_global_batch():
    resolved = resolve(profile="h200_8gpu", ds_config=None, run_file=None, flags={})
    sized_for: list[int] = []

    def size(model):
        sized_for.append(model.vocab_size)
        return 64

    plan = plan_run(
        resolved,
        _place(world=4, device="cuda:0", precision="bf16"),
        _data(train_sequences=100_000, vocab_size=30_000),
        size_micro_batch=size,
        resume_grad_accum=lambda micro: 512 // (micro * 4),  # a checkpoint written by 8 ranks of 64
    )
    assert sized_for == [30_000]  # sized for the model the data makes, once
    assert (plan.batch.micro_batch_size, plan.batch.grad_accum, plan.batch.train_batch_size) == (64, 2, 512)
    assert plan.settings.grad_accum == 2  # the settings in force, as resolved_config.json records them
    assert plan.batch.checkpoint_record()["requested"] == {"micro_batch_size": "auto", "grad_accum": 1}
    assert (plan.schedule.total_steps, plan.schedule.warmup_steps) == (40_000, 2000)
    runtime = plan.to_dict()["runtime"]
    assert (runtime["world_size"], runtime["device"], runtime["micro_batch_size"]) == (4, "cuda", 64)


def test_before_launch_what_only_the_launch_knows_says_so():
    resolved = resolve(profile="h200_8gpu", ds_config=None, run_file=None, flags={})
    plan = plan_run(resolved, _place(world=8, device="cuda", precision="bf16"))
    assert not plan.complete
    shown = plan.to_dict()["plan"]
    assert shown["batch"]["micro_batch_size"] == AT_LAUNCH and shown["batch"]["train_batch_size"] == AT_LAUNCH
    assert shown["data"]["vocab_size"] == AT_LAUNCH and shown["data"]["seq_len"] == 128
    assert shown["schedule"]["total_steps"] == 40_000 and shown["schedule"]["warmup_steps"] == 2000
    assert "batch.micro_batch_size" in shown["resolved_at_launch"]


def test_a_time_budget_run_follows_the_clock_and_warms_up_over_six_percent_of_it():
    resolved = resolve(profile="cpu", ds_config=None, run_file=None, flags={})
    plan = plan_run(resolved, _place(), _data())
    schedule = plan.schedule
    assert schedule.follows_clock and schedule.total_steps is None
    assert (schedule.warmup_steps, schedule.warmup_s) == (None, pytest.approx(0.06 * 450))
    assert plan.length() == "450 s of training"
    with_steps = plan_run(
        resolve(profile="cpu", ds_config=None, run_file=None, flags={"max_steps": 800}), _place(), _data()
    )
    assert not with_steps.schedule.follows_clock and with_steps.schedule.warmup_steps == 48
    assert with_steps.length() == "450 s of training or 800 steps, whichever comes first"


def test_a_warmup_longer_than_the_run_is_worth_a_warning():
    resolved = resolve(
        profile="cpu", ds_config=None, run_file=None, flags={"max_steps": 4, "warmup_steps": 10}
    )
    warning = plan_run(resolved, _place(), _data()).schedule.warmup_warning()
    assert warning is not None and "warm-up (10 steps) is longer than the run (4 steps)" in warning
    fits = resolve(profile="cpu", ds_config=None, run_file=None, flags={"max_steps": 40, "warmup_steps": 10})
    assert plan_run(fits, _place(), _data()).schedule.warmup_warning() is None


def test_batches_per_epoch_is_the_loaders():
    from microbert.data import ShardLoader

    np = pytest.importorskip("numpy")
    rows = np.ones((103, 8), dtype=np.uint16)
    for drop_last in (True, False):
        loader = ShardLoader(rows, batch_size=5, seed=0, rank=1, world_size=2, drop_last=drop_last)
        assert loader.batches_per_epoch == batches_per_epoch(103, 5, 2, drop_last=drop_last)
    assert batches_per_epoch(103, 5, 2) == 10 and batches_per_epoch(103, 5, 2, drop_last=False) == 11
