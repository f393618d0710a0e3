"""Dynamic batching: inputs from concurrent requests share one forward pass.

Requests put their prepared inputs in a bounded queue and await futures. One asyncio task forms
batches (up to `max_batch_size` inputs and `max_batch_tokens` padded tokens, after at most
`max_wait_s` of waiting when it was idle) and runs each in a single worker thread, so the event loop
keeps answering `/health`, `/ready` and new requests while the model computes. A full queue is
refused at once (429) rather than letting latency grow without bound. Each input remembers the
predictor that tokenized it, so during a model reload a batch never mixes two tokenizers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from microbert.predict import FillMaskPredictor, FillMaskResult, PreparedInput
from serve.metrics import Metrics

log = logging.getLogger("microbert.serve")


class QueueFullError(Exception):
    """The queue cannot take the request's inputs; the client should retry later (429)."""


@dataclass
class _Item:
    predictor: FillMaskPredictor
    prepared: PreparedInput
    future: asyncio.Future[FillMaskResult]
    enqueued: float


def _infer(predictor: FillMaskPredictor, batch: list[PreparedInput]) -> list[FillMaskResult]:
    """Runs in the worker thread: the forward pass and the formatting (tokenizer decodes) of a batch."""
    outputs = predictor.run(batch)
    return [predictor.format(p, values, ids) for p, (values, ids) in zip(batch, outputs, strict=True)]


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
    ):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # One thread: batches run one after another, and torch uses all cores within each.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="microbert-model")
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="microbert-batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued (uvicorn has already stopped accepting), then stop the worker."""
        deadline = time.monotonic() + timeout_s
        while (self._queue or not self._idle.is_set()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def submit(
        self, predictor: FillMaskPredictor, prepared: Sequence[PreparedInput]
    ) -> list[asyncio.Future[FillMaskResult]]:
        """Queue a request's inputs together, or none of them (QueueFullError)."""
        if len(self._queue) + len(prepared) > self.max_queue:
            raise QueueFullError(
                f"the server is busy ({len(self._queue)} inputs queued, limit {self.max_queue}); retry soon"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for p in prepared:
            future: asyncio.Future[FillMaskResult] = loop.create_future()
            self._queue.append(_Item(predictor, p, future, now))
            futures.append(future)
            self.metrics.input_tokens.observe(p.num_tokens)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return futures

    def discard(self, futures: Sequence[asyncio.Future[FillMaskResult]]) -> None:
        """Drop a gone client's inputs so they neither take queue room nor model time."""
        dropped = set(map(id, futures))
        for future in futures:
            future.cancel()
        self._queue = deque(item for item in self._queue if id(item.future) not in dropped)
        self.metrics.queue_depth.set(len(self._queue))

    def _take(self) -> list[_Item]:
        """The next batch: FIFO, one predictor, within the size and padded-token limits."""
        batch: list[_Item] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue[0]
            if item.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if batch and item.predictor is not batch[0].predictor:
                break
            new_longest = max(longest, item.prepared.num_tokens)
            if batch and new_longest * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            longest = new_longest
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                # Just woke from idle: give requests arriving together a moment to share the pass.
                if self.max_wait_s > 0 and len(self._queue) < self.max_batch_size:
                    await asyncio.sleep(self.max_wait_s)
            self._idle.clear()
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                self.metrics.queue_duration.observe(started - item.enqueued)
            self.metrics.batch_size.observe(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._executor, _infer, batch[0].predictor, [item.prepared for item in batch]
                )
            except Exception as exc:  # a bug or a device error: fail this batch, keep serving
                log.exception("batch of %d inputs failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.metrics.inference_duration.observe(time.perf_counter() - started)
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
