"""Admission over real HTTP (issue 13): the queue counts padded tokens, not inputs, and a 429 says
when to retry from the rate the model has been draining the queue, one refused client after another;
requests beyond a worker's share of max_concurrent_requests are refused before anything is done."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from serve.app import create_app
from serve.middleware import ConcurrencyLimitMiddleware
from serve.settings import CONCURRENT_PER_WORKER, QUEUE_PASSES
from tests.serve.conftest import make_settings, serve_in_thread
from tests.serve.test_api import TEXT, assert_error, sample

# TEXT is 12 tokens with [CLS] and [SEP]: 16 in the queue. LONG is 62: 64 in the queue.
LONG = "the king is [MASK] of the realm , " + "and long may he reign over us all " * 5


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_the_queue_admits_by_tokens_and_the_429_says_when_to_retry(tiny_artifact: Path) -> None:
    app = create_app(
        make_settings(tiny_artifact, max_queue_tokens=96, max_inputs=4, max_batch_size=1, max_wait_ms=0)
    )
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/info").json()["limits"]["max_queue_tokens"] == 96
        assert http.post("/fill-mask", json={"inputs": [TEXT] * 4}).status_code == 200  # 4 passes: a rate
        batcher = app.state.service.batcher
        rate = batcher.drain.tokens_per_second
        assert rate is not None and rate > 0
        statuses: list[int] = []

        def send(inputs: list[str]) -> threading.Thread:
            def post() -> None:
                with httpx.Client(base_url=url, timeout=30) as own:
                    statuses.append(own.post("/fill-mask", json={"inputs": inputs}).status_code)

            thread = threading.Thread(target=post)
            thread.start()
            return thread

        release = threading.Event()
        busy = batcher._executor.submit(release.wait, 30)  # the model thread is busy, as in a long pass
        senders = [send([TEXT])]
        _wait(lambda: not batcher._idle.is_set() and batcher.depth == 0, "the first input was not taken")
        senders.append(send([TEXT] * 3))  # 48 tokens queued
        _wait(lambda: batcher.queued_tokens == 48, "three inputs were not queued")
        # One long input (64 tokens) does not fit beside the 48; three short ones (48) do.
        batcher.drain.tokens_per_second = 64.0  # a known drain rate from here on: the model is held
        refused = http.post("/fill-mask", json={"inputs": [LONG]})
        assert_error(refused, 429, "queue_full")
        # Room for it in (48 + 64 - 96) / 64 s...
        assert int(refused.headers["retry-after-ms"]) == 250 and refused.headers["retry-after"] == "1"
        # ...and the next refused client (another connection: this one would be held for those
        # 250 ms first) is told to come after it, not at the same moment.
        again = httpx.post(url + "/fill-mask", json={"inputs": [LONG]}, timeout=30)
        assert_error(again, 429, "queue_full")
        assert 1150 < int(again.headers["retry-after-ms"]) <= 1250 and again.headers["retry-after"] == "2"
        senders.append(send([TEXT] * 3))
        _wait(lambda: batcher.queued_tokens == 96, "the second three inputs were not queued")
        assert sample(http.get("/metrics").text, "microbert_queue_depth_tokens") == 96
        release.set()
        busy.result()
        for sender in senders:
            sender.join(30)
        assert statuses == [200, 200, 200]
        assert http.post("/fill-mask", json={"inputs": [LONG]}).status_code == 200  # room again


def test_the_default_queue_holds_passes_of_the_token_budget_and_any_request_fits_an_empty_one(
    tiny_artifact: Path,
) -> None:
    """No input cap by default: 64 inputs of 32 tokens fit (they did not under the old 1,024-input
    default at 32 per request on 64 connections); a request over the whole limit is served alone."""
    app = create_app(make_settings(tiny_artifact, max_batch_tokens=64, max_inputs=64))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        limits = http.get("/info").json()["limits"]
        assert limits["max_queue_tokens"] == QUEUE_PASSES * 64 and limits["max_queue"] is None
        answer = http.post("/fill-mask", json={"inputs": [LONG] * 8})  # 512 tokens > 256, queue empty
        assert answer.status_code == 200 and len(answer.json()) == 8


def _limiter(app: Any) -> ConcurrencyLimitMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, ConcurrencyLimitMiddleware):
        layer = layer.app
    return layer


def test_requests_beyond_the_concurrency_limit_get_an_overloaded_429_at_once(tiny_artifact: Path) -> None:
    """Two fill-mask requests at once (max_concurrent_requests=2): the third is refused before its
    body is read (a body over max_body_bytes gets the 429, not a 413), with Retry-After; health and
    metrics still answer, and once the two are done the next request is served."""
    app = create_app(
        make_settings(
            tiny_artifact,
            max_concurrent_requests=2,
            max_batch_size=1,
            max_wait_ms=0,
            max_body_bytes=4096,
            keep_alive_s=4,
        )
    )
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        limits = http.get("/info").json()["limits"]
        assert limits["max_concurrent_requests"] == 2 and limits["max_concurrent_requests_per_worker"] == 2
        batcher = app.state.service.batcher
        release = threading.Event()
        busy = batcher._executor.submit(release.wait, 30)  # the model thread is busy, as in a long pass
        statuses: list[int] = []

        def post() -> None:
            with httpx.Client(base_url=url, timeout=30) as own:
                statuses.append(own.post("/fill-mask", json={"inputs": TEXT}).status_code)

        senders = [threading.Thread(target=post) for _ in range(2)]
        for sender in senders:
            sender.start()
        limiter = _limiter(app)
        assert limiter.max_retry_s == 2.0  # half the keep-alive: a polite client's connection is still open
        _wait(lambda: limiter.in_flight == 2, "two requests were not admitted")
        refused = http.post("/fill-mask", json={"inputs": TEXT})
        assert_error(refused, 429, "overloaded")
        assert "max_concurrent_requests = 2" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) >= 1
        too_large = http.post("/fill-mask", content=b'{"inputs": "' + b"a" * 8192 + b'"}')
        assert_error(too_large, 429, "overloaded")  # refused before its body was read
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
        assert 'error_type="overloaded"' in metrics
        # Refused before routing, yet counted under their route (not "unmatched"), apart from the 200s.
        assert sample(metrics, "microbert_requests_total", route="/fill-mask", status="429") == 2
        timed = sample(metrics, "microbert_request_duration_seconds_count", route="/fill-mask", status="429")
        assert timed == 2
        # Sent on the same connection at once, not after the first refusal's Retry-After: held first.
        assert sample(metrics, "microbert_requests_held_total") == 1
        release.set()
        busy.result()
        for sender in senders:
            sender.join(30)
        assert statuses == [200, 200] and limiter.in_flight == 0
        assert http.post("/fill-mask", json={"inputs": TEXT}).status_code == 200


def test_the_concurrency_limit_is_shared_over_the_http_workers(tiny_artifact: Path) -> None:
    """The default is CONCURRENT_PER_WORKER for each worker; an explicit total is shared out, rounded up."""
    default = make_settings(tiny_artifact, workers=8)
    assert default.concurrent_requests == 8 * CONCURRENT_PER_WORKER
    assert default.concurrent_requests_per_worker == CONCURRENT_PER_WORKER
    shared = make_settings(tiny_artifact, workers=8, max_concurrent_requests=100)
    assert shared.concurrent_requests == 100 and shared.concurrent_requests_per_worker == 13
    assert (
        make_settings(tiny_artifact, workers="auto").concurrent_requests_per_worker == CONCURRENT_PER_WORKER
    )
