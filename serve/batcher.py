"""Dynamic batching: inputs from concurrent requests share one forward pass.

Requests put their prepared inputs in a queue bounded in padded tokens (the unit of the model's
work) and await futures: a request's inputs are one entry (an `InputGroup`, flat arrays) with one
future, however many they are, so the model process's Python per sentence is gone (with 32-input
requests it was GIL-bound at ~32 µs a sentence; bench/NOTES.md, session 8); a request larger than
one pass goes in parts. One asyncio task forms batches (up to `max_batch_size` inputs and a budget
of `max_batch_tokens` padded tokens per forward pass, as text-embeddings-inference's
`--max-batch-tokens`) and runs each in a single worker thread, so the event loop keeps answering
`/health`, `/ready` and new requests while the model computes. Under load the queue fills while a
pass runs, so batches form with no waiting at all; when the batcher wakes from idle it waits for
company only as long as the recent arrival rate says another input is due within `max_wait_s` (an
adaptive wait: a lone client pays no delay). A full queue is refused at once (429, saying how long
the model needs to drain the excess at the rate it has been draining the queue) rather than letting
latency grow without bound. Each entry remembers the predictor that tokenized it, so during a model
reload a batch never mixes two tokenizers. The futures resolve to the model's raw output;
formatting is the caller's (off the model thread, in parallel with the next pass).

On a GPU the passes are pipelined: each batch is launched (`FillMaskPredictor.launch` queues its
whole step on the device and returns) before the previous one is collected, so the next batch is
formed and its inputs built while the card still computes, and the card goes from one pass to
the next without waiting for the host. On a CPU a launch computes the batch itself, and its
answers are handed out at once, as before.
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

from microbert.predict import (
    FillMaskPredictor,
    GroupOutput,
    InputGroup,
    PendingOutputs,
    bucket_length,
    bucket_lengths,
)
from serve.metrics import Metrics, observe_many

log = logging.getLogger("microbert.serve")


class QueueFullError(Exception):
    """The queue cannot take the request's inputs; the client should retry in `retry_after_s` (429)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    """A request's inputs (or a part of them, when they exceed one pass) in the queue: one entry,
    one future, whatever their number."""

    predictor: FillMaskPredictor
    group: InputGroup
    future: asyncio.Future[GroupOutput]
    enqueued: float
    tokens: int  # what it counts against the queue's token limit: its inputs' padded lengths
    longest: int  # its longest input, padded: the pass's length if it joins one


def _launch(predictor: FillMaskPredictor, groups: list[InputGroup]) -> PendingOutputs:
    """Runs in the worker thread: queues the batch's forward pass and top-k (on a CPU, runs them)."""
    return predictor.launch_groups(groups)


def _collect(predictor: FillMaskPredictor, pending: PendingOutputs) -> list[GroupOutput]:
    """Runs in the worker thread: waits for a launched batch's results."""
    return predictor.collect_groups(pending)


@dataclass
class _Pass:
    """A batch whose work is on the device: its items, what was launched, and when."""

    items: list[_Item]
    pending: PendingOutputs
    started: float


class _ArrivalRate:
    """Inputs per second, as an exponential moving average over ~1 s: what the adaptive wait reads."""

    def __init__(self, horizon_s: float = 1.0):
        self.horizon_s = horizon_s
        self.rate = 0.0
        self._last = time.perf_counter()

    def add(self, count: int) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-6)
        decay = min(1.0, elapsed / self.horizon_s)
        self.rate = (1 - decay) * self.rate + decay * (count / elapsed)
        self._last = now


class _DrainRate:
    """Queue tokens the model takes per second, averaged over the last passes, and when each refused
    client should come back.

    Telling every refused client "in the time it takes to make room for you" brings them all back
    at once, to room for one: a retry storm with a delay. So each refusal also books the client's
    tokens behind those already told to come back (a virtual queue that drains at the model's
    rate), and the next refused client is told to come after them: retries arrive spread out, as
    room appears.
    """

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.tokens_per_second: float | None = None  # None until a pass has run
        self.booked = 0.0  # tokens of refused clients told to come back, not yet drained
        self._booked_at = time.perf_counter()

    def add(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        old = self.tokens_per_second
        self.tokens_per_second = rate if old is None else (1 - self.weight) * old + self.weight * rate

    def retry_after_s(self, excess: int, need: int) -> float:
        """Seconds until `excess` queued tokens and the clients refused before are drained (1 s
        before any pass has run); books `need` tokens for this client's retry."""
        rate = self.tokens_per_second
        if rate is None:
            return 1.0
        now = time.perf_counter()
        self.booked = max(0.0, self.booked - (now - self._booked_at) * rate)
        self._booked_at = now
        wait = (excess + self.booked) / rate
        self.booked += need
        return wait


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_tokens: int,
        metrics: Metrics,
        max_queue: int | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._queued_inputs = 0
        self.drain = _DrainRate()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # One thread: batches run one after another, and torch uses all cores within each.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="microbert-model")
        self._task: asyncio.Task[None] | None = None
        self.arrivals = _ArrivalRate()
        self._in_flight: _Pass | None = None  # launched, not yet collected (a GPU's pipeline)
        self._last_done = time.perf_counter()  # when the last pass's results came back

    @property
    def depth(self) -> int:
        """Inputs queued (a request's inputs are one entry of the queue, but count as many)."""
        return self._queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(self._queued_inputs)
        self.metrics.queue_tokens.set(self._queued_tokens)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="microbert-batcher")

    async def stop(self, timeout_s: float = 10.0) -> bool:
        """Finish what is queued (uvicorn has already stopped accepting), then stop the worker.

        Returns False when the model thread was still busy after `timeout_s`: the caller must then
        not wait for it (the process exits without joining it).
        """
        deadline = time.monotonic() + timeout_s
        while (self._queue or not self._idle.is_set()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        finished = not self._queue and self._idle.is_set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        in_flight = [] if self._in_flight is None else self._in_flight.items
        for item in [*self._queue, *in_flight]:
            item.future.cancel()
        self._in_flight = None
        self._queue.clear()
        self._queued_tokens = 0
        self._queued_inputs = 0
        self._executor.shutdown(wait=finished, cancel_futures=True)
        return finished

    def submit(self, predictor: FillMaskPredictor, group: InputGroup) -> list[asyncio.Future[GroupOutput]]:
        """Queue a request's inputs together, or none of them (QueueFullError): one future per part
        (a group larger than one pass is cut into parts that fit one; most requests are one part).

        Admission counts padded tokens, the unit of the model's work (each input's length rounded up
        to its bucket): a request fits when its tokens and those queued stay within
        `max_queue_tokens` (and, when set, its inputs within `max_queue`). An empty queue takes any
        request, so none is too large to be served ever. The refusal says when to retry: the time
        the model needs to drain the excess and the clients refused before this one, at the rate it
        has drained the queue over its last passes.
        """
        count = len(group)
        if not count:
            return []
        if count == 1:  # a single sentence (most requests): Python ints, not a handful of numpy calls
            longest = need = bucket_length(int(group.lengths[0]))
        else:
            costs = bucket_lengths(group.lengths)
            need, longest = int(costs.sum()), int(costs.max())
        queued = self._queued_tokens
        excess = queued + need - self.max_queue_tokens
        excess_inputs = 0 if self.max_queue is None else self._queued_inputs + count - self.max_queue
        if self._queue and (excess > 0 or excess_inputs > 0):
            excess = max(excess, excess_inputs * need // count, 1)
            raise QueueFullError(
                f"the server is busy ({queued} tokens in {self._queued_inputs} inputs queued, limit "
                f"{self.max_queue_tokens} tokens"
                + (f" and {self.max_queue} inputs" if self.max_queue is not None else "")
                + "); retry after the Retry-After header's seconds",
                retry_after_s=self.drain.retry_after_s(excess, need),
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        # A part fits a pass: at most max_batch_size inputs, and longest × inputs within the budget.
        per_pass = max(1, min(self.max_batch_size, self.max_batch_tokens // max(1, longest)))
        futures: list[asyncio.Future[GroupOutput]] = []
        if count <= per_pass:  # one part: the whole request
            futures.append(loop.create_future())
            self._queue.append(_Item(predictor, group, futures[0], now, need, longest))
        else:
            for part in group.split(per_pass):
                futures.append(loop.create_future())
                part_costs = bucket_lengths(part.lengths)
                item = _Item(predictor, part, futures[-1], now, int(part_costs.sum()), int(part_costs.max()))
                self._queue.append(item)
        observe_many(self.metrics.input_tokens, group.lengths.tolist())
        self._queued_tokens += need
        self._queued_inputs += count
        self._set_depth()
        self.arrivals.add(count)
        self._wakeup.set()
        return futures

    def discard(self, futures: Sequence[asyncio.Future[GroupOutput]]) -> None:
        """Drop a gone client's inputs so they neither take queue room nor model time."""
        dropped = set(map(id, futures))
        for future in futures:
            future.cancel()
        self._queue = deque(item for item in self._queue if id(item.future) not in dropped)
        self._queued_tokens = sum(item.tokens for item in self._queue)
        self._queued_inputs = sum(len(item.group) for item in self._queue)
        self._set_depth()

    def _take(self) -> list[_Item]:
        """The next batch: FIFO, one predictor, within the size and padded-token limits."""
        batch: list[_Item] = []
        longest, inputs = 0, 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled while queued
                self._dequeued(self._queue.popleft())
                continue
            if batch and item.predictor is not batch[0].predictor:
                break
            new_longest, new_inputs = max(longest, item.longest), inputs + len(item.group)
            if batch and (
                new_inputs > self.max_batch_size or new_longest * new_inputs > self.max_batch_tokens
            ):
                break
            batch.append(self._dequeued(self._queue.popleft()))
            longest, inputs = new_longest, new_inputs
        self._set_depth()
        return batch

    def _dequeued(self, item: _Item) -> _Item:
        self._queued_tokens -= item.tokens
        self._queued_inputs -= len(item.group)
        return item

    async def _wait_for_company(self) -> None:
        """Just woke from idle: wait for more inputs only while the arrival rate says they are due."""
        if self.max_wait_s <= 0:
            return
        missing = self.max_batch_size - self._queued_inputs
        rate = self.arrivals.rate
        if missing <= 0 or rate * self.max_wait_s < 1:  # nothing else expected in time: go now
            return
        await asyncio.sleep(min(self.max_wait_s, missing / rate))

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._in_flight is not None:  # nothing to launch behind it: hand its answers out
                    await self._finish()
                    continue
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                await self._wait_for_company()
            self._idle.clear()
            batch = self._take()
            if not batch:
                continue
            launched = await self._launch(batch)
            if self._in_flight is not None:  # the previous pass, still on the device as this one was queued
                await self._finish()
            self._in_flight = launched
            if launched is not None and launched.pending.done is None:  # a CPU: already computed
                await self._finish()

    async def _launch(self, batch: list[_Item]) -> _Pass | None:
        """Queue a batch's pass in the model thread; None (its futures failed) if that raised."""
        started = time.perf_counter()
        # Per input, as the histogram has always counted: each item's wait once per input it holds.
        waits = [started - item.enqueued for item in batch for _ in range(len(item.group))]
        observe_many(self.metrics.queue_duration, waits)
        self.metrics.batch_size.observe(len(waits))
        predictor = batch[0].predictor
        try:
            pending = await asyncio.get_running_loop().run_in_executor(
                self._executor, _launch, predictor, [item.group for item in batch]
            )
        except Exception as exc:  # a bug or a device error: fail this batch, keep serving
            self._fail(batch, exc)
            return None
        return _Pass(batch, pending, started)

    async def _finish(self) -> None:
        """Wait for the pass in flight and resolve its futures."""
        done, self._in_flight = self._in_flight, None
        if done is None:
            return
        batch = done.items
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, _collect, batch[0].predictor, done.pending
            )
        except Exception as exc:
            self._fail(batch, exc)
            return
        finally:
            now = time.perf_counter()
            self.metrics.inference_duration.observe(now - done.started)
            # The drain rate counts the time this pass added: from its launch, or from the end of
            # the pass it was queued behind on the device, whichever came later.
            added = now - max(done.started, self._last_done)
            self._last_done = now
        self.drain.add(sum(item.tokens for item in batch), added)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Item], exc: Exception) -> None:
        log.error("batch of %d inputs failed", len(batch), exc_info=exc)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)
