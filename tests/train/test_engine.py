"""Engine pieces that need no process group: the DeepSpeed config the trainer hands over, and the
micro-batch sized from free accelerator memory."""

from __future__ import annotations

import pytest

from microbert.config import get_preset
from microbert.errors import MicroBertError
from microbert.plan import plan_run
from microbert.run_config import resolve
from train import engine
from train.engine import Placement, auto_micro_batch, deepspeed_config


def _place(device: str = "cuda:0", world: int = 8, precision: str = "bf16") -> Placement:
    return Placement(rank=0, local_rank=0, world_size=world, device=device, precision=precision)


def test_deepspeed_config_sets_batch_geometry_precision_and_zero_stage():
    resolved = resolve(profile="h200_8gpu", ds_config=None, run_file=None, flags={"grad_accum": 2})
    config = deepspeed_config(plan_run(resolved, _place(), size_micro_batch=lambda model: 48))
    assert config["train_micro_batch_size_per_gpu"] == 48
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 48 * 2 * 8
    assert config["zero_optimization"]["stage"] == 1
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert config["gradient_clipping"] == 0.0 and config["zero_optimization"]["compute_grad_norm"] is False
    assert "optimizer" not in config and "scheduler" not in config  # always a client optimizer
    cpu = deepspeed_config(plan_run(resolved, _place("cpu", 1, "fp32"), size_micro_batch=lambda model: 8))
    assert cpu["bf16"]["enabled"] is False and cpu["train_batch_size"] == 16


class _FakeAccelerator:
    def __init__(self, free_bytes: int):
        self.free_bytes = free_bytes

    def available_memory(self, device_index: int | None = None) -> int:
        return self.free_bytes


def test_auto_micro_batch_grows_with_free_memory_and_refuses_when_nothing_fits(monkeypatch):
    config = get_preset("bert-base")
    sizes = []
    for gib in (20, 70, 130):
        monkeypatch.setattr(engine, "get_accelerator", lambda gib=gib: _FakeAccelerator(gib * 2**30))
        sizes.append(auto_micro_batch(config, 128, _place()))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert all(s & (s - 1) == 0 and 1 <= s <= 512 for s in sizes)  # powers of two
    monkeypatch.setattr(engine, "get_accelerator", lambda: _FakeAccelerator(2**28))
    with pytest.raises(MicroBertError, match="smaller --model or lower --seq-len"):
        auto_micro_batch(config, 512, _place(world=1))
    assert auto_micro_batch(config, 128, _place("cpu", 1, "fp32")) == 32  # no GPU memory to size from


def test_compile_mode_defaults_to_cuda_graphs_on_cuda_and_never_compiles_on_cpu(monkeypatch):
    from train.engine import compile_mode

    monkeypatch.delenv("MICROBERT_COMPILE", raising=False)
    assert compile_mode(_place()) == "reduce-overhead"
    assert compile_mode(_place("cpu", 1, "fp32")) is None
    for value, expected in (("0", None), ("off", None), ("1", "default"), ("cuda-graphs", "reduce-overhead")):
        monkeypatch.setenv("MICROBERT_COMPILE", value)
        assert compile_mode(_place()) == expected
    monkeypatch.setenv("MICROBERT_COMPILE", "fastest")
    with pytest.raises(MicroBertError, match="MICROBERT_COMPILE='fastest' is not one of"):
        compile_mode(_place())
