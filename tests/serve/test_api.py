"""The HTTP API through `with TestClient(app)`: answers, every error, metrics, readiness, batching."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from microbert.predict import FillMaskPredictor
from serve.app import create_app
from tests.serve.conftest import add_step, make_settings

TEXT = "the king is [MASK] of the realm ."
TWO_MASKS = "a [MASK] and a [MASK] ."


@pytest.fixture(scope="module")
def predictor(tiny_artifact: Path) -> FillMaskPredictor:
    return FillMaskPredictor.from_pretrained(tiny_artifact)


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "error_type"} and body["error_type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    return dict(body)


# --- answers ------------------------------------------------------------------------------------


def test_one_mask_matches_the_predictor(client: TestClient, predictor: FillMaskPredictor) -> None:
    response = client.post("/fill-mask", json={"inputs": TEXT})
    assert response.status_code == 200
    body = response.json()
    assert body == predictor.predict(TEXT)[0]
    assert len(body) == 5 and set(body[0]) == {"score", "token", "token_str", "sequence"}
    assert [c["score"] for c in body] == sorted((c["score"] for c in body), reverse=True)


def test_several_masks_give_one_list_per_mask(client: TestClient, predictor: FillMaskPredictor) -> None:
    body = client.post("/fill-mask", json={"inputs": TWO_MASKS, "parameters": {"top_k": 3}}).json()
    assert len(body) == 2 and all(len(per_mask) == 3 for per_mask in body)
    assert body == predictor.predict(TWO_MASKS, top_k=3)[0]


def test_list_inputs_give_one_result_per_input_in_order(
    client: TestClient, predictor: FillMaskPredictor
) -> None:
    texts = [TEXT, TWO_MASKS, "to be or not to [MASK] ."]
    body = client.post("/fill-mask", json={"inputs": texts, "parameters": {"top_k": 2}}).json()
    assert body == predictor.predict(texts, top_k=2)


def test_targets_restrict_the_candidates(client: TestClient, predictor: FillMaskPredictor) -> None:
    targets = ["king", "queen", "lord"]
    body = client.post("/fill-mask", json={"inputs": TEXT, "parameters": {"targets": targets}}).json()
    assert body == predictor.predict(TEXT, targets=targets)[0]
    assert {c["token_str"] for c in body} <= set(targets) and len(body) == 3


def test_inference_api_options_are_accepted(client: TestClient) -> None:
    response = client.post("/fill-mask", json={"inputs": TEXT, "options": {"wait_for_model": True}})
    assert response.status_code == 200


def test_health_ready_info(client: TestClient, tiny_artifact: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "step": 7}
    info = client.get("/info").json()
    assert info["step"] == 7 and info["model"] == str(tiny_artifact) and info["mask_token"] == "[MASK]"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["limits"]["max_input_tokens"] == 128 and info["limits"]["max_top_k"] == 50


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"inputs": "no mask here"}, 400, "no_mask"),
        ({"inputs": ["fine [MASK] .", "no mask"]}, 400, "no_mask"),
        ({"inputs": ""}, 400, "empty_input"),
        ({"inputs": "   "}, 400, "empty_input"),
        ({"inputs": []}, 400, "empty_input"),
        ({"inputs": TEXT, "parameters": {"targets": []}}, 400, "bad_targets"),
        ({"inputs": TEXT, "parameters": {"targets": [""]}}, 400, "bad_targets"),
        ({}, 422, "validation_error"),
        ({"inputs": 5}, 422, "validation_error"),
        ({"inputs": [1, 2]}, 422, "validation_error"),
        ({"inputs": TEXT, "parameters": {"top_k": 0}}, 422, "validation_error"),
        ({"inputs": TEXT, "parameters": {"top_k": "3"}}, 422, "validation_error"),
        ({"inputs": TEXT, "parameters": {"top_k": 51}}, 422, "top_k_too_large"),
        ({"inputs": TEXT, "parameters": {"temperature": 1}}, 422, "validation_error"),
        ({"inputs": TEXT, "unknown": 1}, 422, "validation_error"),
        ({"inputs": [TEXT] * 65}, 422, "too_many_inputs"),
    ],
)
def test_bad_requests(client: TestClient, body: dict[str, Any], status: int, error_type: str) -> None:
    assert_error(client.post("/fill-mask", json=body), status, error_type)


def test_invalid_json_is_a_422(client: TestClient) -> None:
    response = client.post("/fill-mask", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert_error(response, 422, "validation_error")


def test_too_long_input_is_a_422_that_says_the_limit(client: TestClient) -> None:
    body = assert_error(
        client.post("/fill-mask", json={"inputs": "word " * 200 + "[MASK]"}), 422, "input_too_long"
    )
    assert "at most 128" in body["error"] and body["max_tokens"] == 128
    listed = assert_error(
        client.post("/fill-mask", json={"inputs": [TEXT, "x " * 300 + "[MASK]"]}), 422, "input_too_long"
    )
    assert listed["error"].startswith("inputs[1]: ")


def test_body_limit_by_content_length_and_by_streamed_bytes(tiny_artifact: Path) -> None:
    with TestClient(create_app(make_settings(tiny_artifact, max_body_bytes=1000))) as c:
        big = {"inputs": "[MASK] " + "a" * 2000}
        assert_error(c.post("/fill-mask", json=big), 413, "body_too_large")

        def chunks() -> Any:  # no Content-Length: the body is sent chunked
            yield b'{"inputs": "[MASK] '
            for _ in range(20):
                yield b"a" * 100
            yield b'"}'

        response = c.post("/fill-mask", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "body_too_large")
        assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200


def test_the_api_key_is_checked_before_the_body(tiny_artifact: Path) -> None:
    """Without the key, a malformed body is a 401 too, not a 422: nothing is read for a stranger."""
    with TestClient(create_app(make_settings(tiny_artifact, api_key="s3cret"))) as c:
        assert_error(c.post("/fill-mask", json={"inputs": 3}), 401, "unauthorized")
        assert_error(c.post("/fill-mask", content=b"{not json"), 401, "unauthorized")


def test_api_key(tiny_artifact: Path) -> None:
    with TestClient(create_app(make_settings(tiny_artifact, api_key="s3cret"))) as c:
        assert_error(c.post("/fill-mask", json={"inputs": TEXT}), 401, "unauthorized")
        wrong = c.post("/fill-mask", json={"inputs": TEXT}, headers={"authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized")
        assert (
            c.post(
                "/fill-mask", json={"inputs": TEXT}, headers={"authorization": "Bearer s3cret"}
            ).status_code
            == 200
        )
        assert c.post("/fill-mask", json={"inputs": TEXT}, headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/fill-mask"), 405, "method_not_allowed")


def test_an_unexpected_error_is_a_500_without_details(tiny_artifact: Path) -> None:
    app = create_app(make_settings(tiny_artifact))

    @app.get("/boom")  # a route that fails the way a bug would
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with TestClient(app) as c:
        response = c.get("/boom")
        body = assert_error(response, 500, "internal_error")
        assert "secret" not in response.text and "RuntimeError" not in body["error"]
        assert c.get("/health").status_code == 200
        assert (
            sample(c.get("/metrics").text, "microbert_request_failures_total", error_type="internal_error")
            == 1
        )


def test_not_ready_until_the_first_export(tmp_path: Path, tiny_tokenizer: Any, tiny_config: Any) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with TestClient(create_app(make_settings(run_dir))) as c:
        assert c.get("/health").status_code == 200
        for path, method in (("/ready", "GET"), ("/info", "GET"), ("/fill-mask", "POST")):
            response = c.request(method, path, json={"inputs": TEXT})
            body = assert_error(response, 503, "not_ready")
            assert body["estimated_time"] > 0 and int(response.headers["retry-after"]) >= 1
        add_step(run_dir, tiny_tokenizer, tiny_config, step=3, seed=3)
        deadline = time.monotonic() + 20
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the first export was not picked up"
            time.sleep(0.1)
        assert c.get("/ready").json()["step"] == 3
        assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200


def test_queue_full_is_a_429_at_once(tiny_artifact: Path) -> None:
    app = create_app(make_settings(tiny_artifact, max_queue=2, max_inputs=2, max_batch_size=1, max_wait_ms=0))
    with TestClient(app) as c:
        batcher = app.state.service.batcher
        release = threading.Event()
        # Occupy the model thread, as a long batch would, so queued inputs stay queued.
        busy = batcher._executor.submit(release.wait, 30)
        results: list[int] = []
        senders = [
            threading.Thread(
                target=lambda: results.append(c.post("/fill-mask", json={"inputs": TEXT}).status_code)
            )
            for _ in range(3)
        ]
        deadline = time.monotonic() + 10
        senders[0].start()
        # The first input is taken into the batch that waits for the model thread...
        while batcher._idle.is_set() or batcher.depth:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for sender in senders[1:]:
            sender.start()
        while batcher.depth < 2:  # ...and the next two fill the queue.
            assert time.monotonic() < deadline, (batcher.depth, results)
            time.sleep(0.01)
        started = time.perf_counter()
        response = c.post("/fill-mask", json={"inputs": TEXT})
        assert time.perf_counter() - started < 1.0
        assert_error(response, 429, "queue_full")
        assert response.headers["retry-after"] == "1"
        release.set()
        busy.result()
        for sender in senders:
            sender.join(10)
        assert sorted(results) == [200, 200, 200]


def test_metrics_count_what_happened(tiny_artifact: Path) -> None:
    with TestClient(create_app(make_settings(tiny_artifact))) as c:
        for _ in range(3):
            assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200
        assert c.post("/fill-mask", json={"inputs": [TEXT, TWO_MASKS]}).status_code == 200
        assert c.post("/fill-mask", json={"inputs": "no mask"}).status_code == 400
        assert c.post("/fill-mask", json={"inputs": 3}).status_code == 422
        assert c.get("/nope").status_code == 404
        time.sleep(0.25)  # at least one tick of the event-loop lag watch
        text = c.get("/metrics").text
    assert sample(text, "microbert_requests_total", route="/fill-mask", status="200") == 4
    assert sample(text, "microbert_requests_total", route="/fill-mask", status="400") == 1
    assert sample(text, "microbert_requests_total", route="/fill-mask", status="422") == 1
    assert sample(text, "microbert_requests_total", route="unmatched", status="404") == 1
    assert sample(text, "microbert_request_failures_total", error_type="no_mask") == 1
    assert sample(text, "microbert_request_failures_total", error_type="validation_error") == 1
    assert sample(text, "microbert_request_duration_seconds_count", route="/fill-mask", status="200") == 4
    assert sample(text, "microbert_request_duration_seconds_count", route="/fill-mask", status="422") == 1
    assert sample(text, "microbert_input_tokens_count") == 5  # inputs that reached the queue
    assert sample(text, "microbert_queue_duration_seconds_count") == 5
    assert sample(text, "microbert_batch_size_inputs_sum") == 5
    assert 1 <= sample(text, "microbert_inference_duration_seconds_count") <= 5
    ok = {"route": "/fill-mask", "status": "200"}
    assert sample(text, "microbert_request_duration_seconds_bucket", le="0.001", **ok) <= 4
    assert sample(text, "microbert_queue_depth_inputs") == 0
    assert sample(text, "microbert_event_loop_lag_seconds_count") >= 1  # the lifespan watches its loop
    assert sample(text, "microbert_model_info", artifact=str(tiny_artifact), step="7", device="cpu") == 1


def test_concurrent_requests_share_batches(tiny_artifact: Path) -> None:
    app = create_app(make_settings(tiny_artifact, max_wait_ms=50))
    with TestClient(app) as c:
        statuses: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: statuses.append(c.post("/fill-mask", json={"inputs": TEXT}).status_code)
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        text = c.get("/metrics").text
    assert statuses == [200] * 8
    assert sample(text, "microbert_batch_size_inputs_count") < 8  # at least two inputs shared a forward pass


def test_a_disconnected_client_drops_its_work(tiny_artifact: Path) -> None:
    """Queued inputs of a gone client leave the queue without a forward pass."""
    app = create_app(make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0))
    with TestClient(app) as c:
        service = app.state.service
        batcher = service.batcher
        release = threading.Event()
        busy = batcher._executor.submit(release.wait, 30)

        async def disconnecting_client() -> int:
            # Drive the ASGI app directly: send the body, then a disconnect while the input waits.
            body = b'{"inputs": "' + TEXT.encode() + b'"}'
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            statuses: list[int] = []

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                while batcher.depth < 1:  # wait until this request's input is queued behind the first
                    await asyncio.sleep(0.005)
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/fill-mask",
                "raw_path": b"/fill-mask",
                "root_path": "",
                "scheme": "http",
                "query_string": b"",
                "http_version": "1.1",
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "app": app,
                "state": {},
            }
            await app(scope, receive, send)
            return statuses[0]

        first = threading.Thread(target=lambda: c.post("/fill-mask", json={"inputs": TEXT}))
        first.start()
        deadline = time.monotonic() + 10
        # The first input is taken into a batch, which waits for the busy model thread.
        while sample(c.get("/metrics").text, "microbert_batch_size_inputs_count") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        status = c.portal.call(disconnecting_client)
        assert status == 499 and batcher.depth == 0
        release.set()
        busy.result()
        first.join(10)
        text = c.get("/metrics").text
    assert sample(text, "microbert_request_failures_total", error_type="client_disconnected") == 1
    assert sample(text, "microbert_batch_size_inputs_sum") == 1  # only the connected client's input ran
