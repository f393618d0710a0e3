"""`ShardLoader`: endless, deterministic, resumable batches of packed rows for one rank.

Epoch e visits the rows in the order of a permutation drawn from (seed, e). Global batch g of the
epoch is the permutation's slice [g*B*W, (g+1)*B*W); rank r takes its r-th B rows. So ranks read
disjoint rows, and the global batches depend only on (seed, epoch, B*W): a run resumed on a
different number of GPUs with the same global batch size sees the same data.

The state is (epoch, position) of the next batch to *hand out*; batches prefetched but not yet
consumed are not counted, so a checkpoint taken between steps resumes at exactly the next batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import numpy as np
import torch

from microbert.errors import ConfigError
from microbert.plan import batches_per_epoch


class ShardLoader:
    """An infinite iterator of (input_ids, attention_mask), both (B, T) long tensors on `device`."""

    def __init__(
        self,
        sequences: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        drop_last: bool = True,
        prefetch: int = 2,
        pad_token_id: int = 0,
    ):
        problems = []
        if sequences.ndim != 2 or len(sequences) == 0:
            problems.append(f"sequences must be a non-empty (N, seq_len) array, got shape {sequences.shape}")
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if not problems and drop_last and len(sequences) < batch_size * world_size:
            problems.append(
                f"the dataset has {len(sequences)} sequences, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower the batch size or prepare more data"
            )
        if problems:
            raise ConfigError(problems)
        self.sequences = sequences
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.pad_token_id = pad_token_id
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = batches_per_epoch(
            len(sequences), batch_size, world_size, drop_last=drop_last
        )
        self.prefetch = prefetch if self.device.type == "cuda" else 0
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()

    # -- order ---------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self.sequences))
            self._order_epoch = epoch
        return self._order

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """Row indices of this rank's batch `position` of `epoch` (wrapping round when not drop_last)."""
        order = self._permutation(epoch)
        start = (position * self.world_size + self.rank) * self.batch_size
        index = np.arange(start, start + self.batch_size) % len(order)
        return order[index]

    def _host_batch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.sequences[np.sort(self.batch_indices(epoch, position))]  # sorted: sequential reads
        input_ids = torch.from_numpy(rows.astype(np.int64))  # (B, T)
        attention_mask = (input_ids != self.pad_token_id).long()  # (B, T)
        return input_ids, attention_mask

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch > 0:
            batch = self._next_prefetched()
        else:
            batch = self._host_batch(self.epoch, self.position)
            if self.device.type != "cpu":
                batch = (batch[0].to(self.device), batch[1].to(self.device))
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def _next_prefetched(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start(self.epoch, self.position)
        assert self._queue is not None
        epoch, position, host = self._queue.get()
        if isinstance(host, BaseException):
            raise host
        assert (epoch, position) == (self.epoch, self.position)
        return host[0].to(self.device, non_blocking=True), host[1].to(self.device, non_blocking=True)

    def _start(self, epoch: int, position: int) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(epoch, position), daemon=True)
        self._thread.start()

    def _produce(self, epoch: int, position: int) -> None:
        """Background thread: read rows into pinned memory ahead of the consumer."""
        assert self._queue is not None
        try:
            while not self._stop.is_set():
                input_ids, attention_mask = self._host_batch(epoch, position)
                item = (epoch, position, (input_ids.pin_memory(), attention_mask.pin_memory()))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                position += 1
                if position >= self.batches_per_epoch:
                    epoch, position = epoch + 1, 0
        except BaseException as exc:  # hand the failure to the consumer instead of dying silently
            self._queue.put((epoch, position, exc))

    def close(self) -> None:
        """Stop the prefetch thread (also done by load_state_dict)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; save it with every checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_sequences": len(self.sequences),
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next batch the one an uninterrupted run would have produced."""
        problems = []
        for key in ("seed", "num_sequences"):
            mine = self.seed if key == "seed" else len(self.sequences)
            if key in state and state[key] != mine:
                problems.append(f"loader state has {key}={state[key]}, this loader has {mine}")
        if problems:
            raise ConfigError([*problems, "the checkpoint was written for other data or another seed"])
        epoch, position = int(state["epoch"]), int(state["position"])
        saved_global = int(state.get("batch_size", self.batch_size)) * int(
            state.get("world_size", self.world_size)
        )
        if saved_global != self.global_batch:  # same samples consumed, counted in the new batch size
            position = position * saved_global // self.global_batch
        self.close()
        self.epoch, self.position = (
            epoch + position // self.batches_per_epoch,
            position % self.batches_per_epoch,
        )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
