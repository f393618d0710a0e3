"""`observe_many`: the same series as one `observe` per value, whichever bucket each lands in;
`watch_event_loop`: a stalled loop shows as a late timer."""

from __future__ import annotations

import asyncio
import re
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serve.metrics import DURATION_BUCKETS, TOKEN_BUCKETS, observe_many, watch_event_loop


def _pair(buckets: tuple[float, ...]) -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    one, many = CollectorRegistry(), CollectorRegistry()
    return (
        one,
        Histogram("h", "help", buckets=buckets, registry=one),
        many,
        Histogram("h", "help", buckets=buckets, registry=many),
    )


def test_observe_many_writes_what_one_observe_per_value_writes() -> None:
    for buckets, values in (
        (TOKEN_BUCKETS, [3, 4, 5, 8, 9, 2048, 2049, 10_000, 4, 4]),  # on, between and past the bounds
        (DURATION_BUCKETS, [0.0, 0.0004, 0.001, 0.0011, 0.3, 31.0]),
        (DURATION_BUCKETS, [0.004]),  # few values: the plain loop
    ):
        one, h_one, many, h_many = _pair(buckets)
        for value in values:
            h_one.observe(value)
        observe_many(h_many, values)
        observe_many(h_many, [])  # nothing: no change
        assert generate_latest(many) == generate_latest(one)
        assert f"h_count {float(len(values))}".encode() in generate_latest(one)  # all counted


def test_event_loop_lag_is_the_time_the_loop_was_kept_from_a_timer() -> None:
    """A loop blocked for 0.3 s (as by a flood of refusals) shows as one late timer of about 0.3 s;
    the other ticks are on time."""
    registry = CollectorRegistry()
    lag = Histogram("lag", "help", buckets=DURATION_BUCKETS, registry=registry)

    async def run() -> None:
        watch = asyncio.create_task(watch_event_loop(lag, every_s=0.02))
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # the loop is kept busy: the watcher's timer cannot fire
        await asyncio.sleep(0.1)
        watch.cancel()

    asyncio.run(run())
    text = generate_latest(registry).decode()
    count = float(re.search(r"^lag_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    under_quarter = float(re.search(r'^lag_bucket\{le="0.25"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
    assert count >= 5  # it kept watching after the stall
    assert count - under_quarter == 1  # exactly the one tick the stall delayed was late by > 0.25 s
    assert float(re.search(r"^lag_sum (\S+)$", text, re.M).group(1)) < 0.5  # type: ignore[union-attr]
