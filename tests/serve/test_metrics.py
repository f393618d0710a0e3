"""`observe_many`: the same series as one `observe` per value, whichever bucket each lands in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serve.metrics import DURATION_BUCKETS, TOKEN_BUCKETS, observe_many


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
