"""ShardLoader: disjoint ranks, deterministic order, exact resume from state_dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microbert.data import ShardLoader
from microbert.errors import ConfigError


def _rows(n: int = 103, length: int = 8) -> np.ndarray:
    rows = np.zeros((n, length), dtype=np.uint16)
    rows[:, 0] = np.arange(n) + 10  # row id in the first column
    rows[:, 1:5] = 7
    return rows


def _ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return (batch[0][:, 0] - 10).tolist()


def test_ranks_read_disjoint_rows_covering_the_epoch() -> None:
    rows = _rows(96)
    seen = []
    for rank in range(4):
        loader = ShardLoader(rows, batch_size=6, seed=3, rank=rank, world_size=4)
        assert loader.batches_per_epoch == 4
        seen += [i for _ in range(4) for i in _ids(next(loader))]
    assert sorted(seen) == list(range(96))


def test_batches_shapes_mask_and_epochs() -> None:
    loader = ShardLoader(_rows(), batch_size=10, seed=0)
    input_ids, attention_mask = next(loader)
    assert input_ids.dtype == torch.long and input_ids.shape == (10, 8)
    assert torch.equal(attention_mask, (input_ids != 0).long())
    assert loader.batches_per_epoch == 10
    for _ in range(9):
        next(loader)
    assert loader.epoch == 1 and loader.position == 0


def test_order_depends_on_seed_and_epoch_only() -> None:
    a = ShardLoader(_rows(), batch_size=10, seed=5)
    b = ShardLoader(_rows(), batch_size=10, seed=5)
    c = ShardLoader(_rows(), batch_size=10, seed=6)
    first_a = [_ids(next(a)) for _ in range(20)]
    assert first_a == [_ids(next(b)) for _ in range(20)]
    assert first_a != [_ids(next(c)) for _ in range(20)]
    epoch0 = [i for batch in first_a[:10] for i in batch]
    assert sorted(epoch0) != epoch0  # shuffled
    assert first_a[:10] != first_a[10:]  # a new order each epoch


def test_state_dict_resumes_exactly() -> None:
    straight = ShardLoader(_rows(), batch_size=10, seed=1)
    expected = [_ids(next(straight)) for _ in range(25)]
    first = ShardLoader(_rows(), batch_size=10, seed=1)
    for _ in range(13):
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = ShardLoader(_rows(), batch_size=10, seed=1)
    resumed.load_state_dict(state)
    assert [_ids(next(resumed)) for _ in range(12)] == expected[13:]


def test_other_world_size_same_global_batch_sees_the_same_data() -> None:
    one = ShardLoader(_rows(), batch_size=8, seed=2)
    global_batches = [sorted(_ids(next(one))) for _ in range(6)]
    two = [ShardLoader(_rows(), batch_size=4, seed=2, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.load_state_dict({**one.state_dict(), "position": 2, "epoch": 0})
    for g in range(2, 6):
        assert sorted(_ids(next(two[0])) + _ids(next(two[1]))) == global_batches[g]


def test_without_drop_last_every_row_is_seen_and_batches_stay_full() -> None:
    loader = ShardLoader(_rows(25), batch_size=10, seed=0, drop_last=False)
    assert loader.batches_per_epoch == 3
    batches = [_ids(next(loader)) for _ in range(3)]
    assert all(len(b) == 10 for b in batches) and {i for b in batches for i in b} == set(range(25))


def test_bad_settings_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        ShardLoader(_rows(5), batch_size=0, seed=0, rank=3, world_size=2)
    assert "batch_size" in str(info.value) and "rank" in str(info.value)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        ShardLoader(_rows(5), batch_size=4, seed=0, world_size=2)
    loader = ShardLoader(_rows(), batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        loader.load_state_dict({"epoch": 0, "position": 0, "seed": 9})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefetch_keeps_the_consumed_state() -> None:
    rows = _rows()
    cpu = ShardLoader(rows, batch_size=10, seed=4)
    expected = [_ids(next(cpu)) for _ in range(30)]
    gpu = ShardLoader(rows, batch_size=10, seed=4, device="cuda", prefetch=3)
    got = [_ids(next(gpu)) for _ in range(12)]
    assert gpu.state_dict()["position"] == 2 and gpu.state_dict()["epoch"] == 1  # not the prefetched ones
    assert next(gpu)[0].is_cuda
    gpu.load_state_dict({"epoch": 1, "position": 2})
    got += [_ids(next(gpu)) for _ in range(18)]
    assert got == expected
    gpu.close()
