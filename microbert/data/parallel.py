"""Encoding on several cores: worker processes, each with its own `Encoder`, results in order.

Most of the encoder's time is Python (splitting text, dictionary look-ups), which one process runs
on one core; `tokenizers`' own threads only help with the rare unseen words. So large sources are
encoded by a pool of processes. Small ones are not: starting a worker costs about a second.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from microbert.data.encode import Encoder

_worker_encoder: Encoder | None = None


def default_workers() -> int:
    """One encoder process per core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _init(tokenizer_json: str, dtype: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; see EncoderPool
    # Ctrl-C reaches the whole process group: the parent stops the pool and reports it, once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _worker_encoder is None:  # spawned; a forked worker inherits the parent's warm encoder
        _worker_encoder = Encoder(Tokenizer.from_str(tokenizer_json), dtype=np.dtype(dtype))


def _encode_parts(parts: list[list[str]]) -> list[np.ndarray]:
    assert _worker_encoder is not None
    return [_worker_encoder.encode(docs) for docs in parts]


class EncoderPool:
    """Encode batches in worker processes; `results()` yields them in submission order."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, workers: int, encoder: Encoder | None = None):
        global _worker_encoder
        # fork where there is one: spawn would re-import the caller's main module (a trainer imports
        # torch and deepspeed) in every worker. The workers touch only numpy and tokenizers, like
        # PyTorch's DataLoader workers. `tokenizers` must not use its thread pool in a forked child:
        # saying so in the environment across the fork also silences its fork warning.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(method),
            initializer=_init,
            initargs=(tokenizer.to_str(), np.dtype(dtype).str),
        )
        self._in_flight: deque[tuple[Future[list[np.ndarray]], Any]] = deque()
        self.max_in_flight = 2 * workers
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # forked workers start with a copy of the caller's encoder: its chunk cache is already warm
        _worker_encoder = encoder
        try:  # start every worker now, while the variable is set
            for future in [self._executor.submit(os.getpid) for _ in range(workers)]:
                future.result()
        finally:
            _worker_encoder = None
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def submit(self, parts: list[list[str]], tag: Any) -> Iterator[tuple[list[np.ndarray], Any]]:
        """Queue a batch; yields the finished batches that must be taken to stay within bounds."""
        self._in_flight.append((self._executor.submit(_encode_parts, parts), tag))
        while len(self._in_flight) > self.max_in_flight:
            future, done_tag = self._in_flight.popleft()
            yield future.result(), done_tag

    def drain(self) -> Iterator[tuple[list[np.ndarray], Any]]:
        while self._in_flight:
            future, tag = self._in_flight.popleft()
            yield future.result(), tag

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
