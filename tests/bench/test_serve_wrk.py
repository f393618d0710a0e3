"""`bench/serve_wrk.py` reads what the model did during a run from the server's own /metrics text."""

from __future__ import annotations

import pytest

from bench.serve_wrk import parse_pass_series, pass_figures
from serve.metrics import Metrics


def _exposition(batches: list[int], pass_s: float, queue_s: float) -> str:
    metrics = Metrics()
    for size in batches:
        metrics.batch_size.observe(size)
        metrics.inference_duration.observe(pass_s)
        for _ in range(size):
            metrics.queue_duration.observe(queue_s)
    return metrics.render()[0].decode()


def test_pass_figures_come_from_the_difference_of_two_readings() -> None:
    before = parse_pass_series(_exposition([8, 8], 0.004, 0.001))
    after = parse_pass_series(_exposition([8, 8, 32, 32, 32, 32], 0.004, 0.001))
    assert before == pytest.approx({"passes": 2, "inputs": 16, "pass_seconds": 0.008, "queue_seconds": 0.016})
    figures = pass_figures(before, after, seconds=2.0)
    assert figures == {
        "passes_per_second": 2.0,
        "inputs_per_pass": 32.0,
        "pass_ms": 4.0,
        "pass_share": 0.008,
        "queue_ms_per_input": 1.0,
    }


def test_no_figures_without_two_readings_or_without_passes() -> None:
    reading = parse_pass_series(_exposition([4], 0.01, 0.0))
    assert pass_figures(None, reading, 1.0) == {}
    assert pass_figures(reading, reading, 1.0) == {}  # nothing ran in between
    assert parse_pass_series("# HELP other\nother_total 3\n") == {}
