"""Prometheus metrics, prefix `microbert_`, units in the names, duration buckets from 1 ms.

Each app owns a `CollectorRegistry`, so tests see exact counts. With `--workers N` the CLI sets
`PROMETHEUS_MULTIPROC_DIR` before any worker imports `prometheus_client`; every worker then writes
its values to files there and `/metrics` (answered by any one worker) sums them across workers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# The `_created` series double the output and no dashboard reads them.
disable_created_metrics()

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


# Up to this many values, one `observe` each is cheaper than counting them per bucket first.
_FEW_OBSERVATIONS = 4


def observe_many(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """`histogram.observe(v)` for every value, in one write per bucket touched.

    With `--workers N` every observation is a locked write into a shared file, twice (its bucket
    and the sum); the model process observes each input's tokens and queue wait, so per input that
    was an eighth of its time under batch requests (py-spy, one H200). Counting the values per bucket
    first gives the same series with a few writes per batch. A client without the internals this
    reads (they are not public API) gets the plain loop.
    """
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    few = len(values) <= _FEW_OBSERVATIONS  # a single-sentence request: the numpy calls cost more
    if few or buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for value in values:
            histogram.observe(float(value))
        return
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        return
    # A value goes to the first bucket whose upper bound is >= it, as `observe` places it.
    counts = np.bincount(np.searchsorted(np.asarray(bounds), array, side="left"), minlength=len(bounds))
    total.inc(float(array.sum()))
    for i in np.flatnonzero(counts[: len(bounds)]).tolist():
        buckets[i].inc(int(counts[i]))


# How often each HTTP worker checks its event loop's lag: often enough to see a stall of a tenth of
# a second, rarely enough to cost nothing (one timer and one histogram write).
LOOP_LAG_EVERY_S = 0.1


async def watch_event_loop(histogram: Histogram, every_s: float = LOOP_LAG_EVERY_S) -> None:
    """Observe, every `every_s`, how much later than asked a sleep of this event loop ended.

    A request whose bytes have arrived waits in its socket until the worker's event loop gets to it,
    and that wait is in no request timer: the request-duration histogram starts when the app is
    called. Under a flood the loop is busy refusing and the wait grows with the connections a worker
    holds (issue 13: the clients' p99 was 1.3-2.3x the in-server one on a GPU host); a timer's lateness
    is the same wait, measured from inside. Runs until cancelled."""
    while True:
        asked = time.perf_counter() + every_s
        await asyncio.sleep(every_s)
        histogram.observe(max(0.0, time.perf_counter() - asked))


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class Metrics:
    """The service's metrics; see the metrics table in README.md ("## Serving")."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "microbert_requests_total",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.failures = Counter(
            "microbert_request_failures_total",
            "Requests answered with an error, by error_type (the error body's).",
            ["error_type"],
            registry=r,
        )
        self.requests_held = Counter(
            "microbert_requests_held_total",
            "Fill-mask requests sent on a connection before the Retry-After of its last 429 was "
            "over, held until it was.",
            registry=r,
        )
        self.request_duration = Histogram(
            "microbert_request_duration_seconds",
            "Time from request received to response sent, by route and status (a 200's time "
            "apart from the refusals').",
            ["route", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "microbert_event_loop_lag_seconds",
            "How late a timer set every 100 ms fires in an HTTP worker's event loop: how long a request "
            "that has arrived can wait before its worker reads it.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "microbert_queue_duration_seconds",
            "Time an input waits in the batch queue before its forward pass starts.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "microbert_inference_duration_seconds",
            "Time of one batched forward pass, top-k and formatting.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "microbert_batch_size_inputs", "Inputs per forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.input_tokens = Histogram(
            "microbert_input_tokens",
            "Tokens per input, [CLS] and [SEP] included.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "microbert_queue_depth_inputs",
            "Inputs waiting for the model now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_tokens = Gauge(
            "microbert_queue_depth_tokens",
            "Padded tokens waiting for the model now (what admission counts).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "microbert_model_info",
            "1 for the model being served (labels describe it), 0 for one replaced by a reload.",
            ["artifact", "step", "device", "dtype"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "microbert_model_reloads_total", "Model loads after the first, by result.", ["result"], registry=r
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text; in multiprocess mode the sum over all workers' files."""
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exited(pid: int) -> None:
        """Drop a finished worker's live gauges (queue depth, model info) from the multiprocess sum."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(pid)
