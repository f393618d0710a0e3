"""Requests bounded by the work they cause (issue 14): predictions and response size checked before
any work, a deadline, text that is not Unicode, a broken export logged once, every route labelled."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from microbert.checkpoint import save_artifact
from microbert.model import BertForMaskedLM
from serve.app import create_app
from serve.cli import auto_workers
from tests.serve.conftest import add_step, make_settings
from tests.serve.test_api import TEXT, assert_error, sample


@pytest.fixture(scope="module")
def long_artifact(tmp_path_factory: Any, tiny_tokenizer: Any, tiny_config: Any) -> Path:
    """The tiny model with 512 positions, so an input of 500 masks is within the model's length."""
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config.replace(max_position_embeddings=512)).eval()
    return save_artifact(
        model, tiny_tokenizer, tmp_path_factory.mktemp("long") / "step-1", metadata={"step": 1}
    )


def test_500_masks_at_top_k_100_are_refused_at_once_and_a_small_request_is_not_held_up(
    long_artifact: Path,
) -> None:
    with TestClient(create_app(make_settings(long_artifact))) as c:
        started = time.perf_counter()
        response = c.post("/fill-mask", json={"inputs": "[MASK] " * 500, "parameters": {"top_k": 100}})
        assert time.perf_counter() - started < 1.0
        body = assert_error(response, 422, "too_many_predictions")
        assert "50000 predictions" in body["error"] and body["max_predictions"] == 8192
        assert sample(c.get("/metrics").text, "microbert_batch_size_inputs_count") == 0  # no forward pass

        # A large request within every limit (64 inputs of ~500 tokens, 1,280 predictions) runs while a
        # small one arrives: the small one is answered within a second.
        large = {"inputs": ["word " * 480 + "[MASK] ."] * 64, "parameters": {"top_k": 20}}
        statuses: list[int] = []
        sender = threading.Thread(
            target=lambda: statuses.append(c.post("/fill-mask", json=large).status_code)
        )
        sender.start()
        time.sleep(0.05)
        started = time.perf_counter()
        assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200
        small_s = time.perf_counter() - started
        sender.join(60)
        assert statuses == [200] and small_s < 1.0, (statuses, small_s)


def test_a_response_over_the_size_limit_is_refused_before_any_work(tiny_artifact: Path) -> None:
    with TestClient(create_app(make_settings(tiny_artifact, max_response_bytes=4096))) as c:
        text = "a [MASK] b [MASK] c [MASK] " + "long words " * 20
        body = assert_error(
            c.post("/fill-mask", json={"inputs": text, "parameters": {"top_k": 10}}),
            422,
            "response_too_large",
        )
        assert body["max_response_bytes"] == 4096 and "max_response_bytes" in body["error"]
        assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200


def test_a_request_past_its_deadline_is_abandoned_with_503(tiny_artifact: Path) -> None:
    app = create_app(make_settings(tiny_artifact, request_timeout_s=0.3))
    with TestClient(app) as c:
        batcher = app.state.service.batcher
        release = threading.Event()
        busy = batcher._executor.submit(release.wait, 30)  # the model thread is stuck in a long pass
        started = time.perf_counter()
        response = c.post("/fill-mask", json={"inputs": TEXT})
        elapsed = time.perf_counter() - started
        assert_error(response, 503, "timeout")
        assert 0.25 < elapsed < 2.0 and response.headers["retry-after"] == "1"
        assert batcher.depth == 0  # its input left the queue with it
        release.set()
        busy.result()
        assert c.post("/fill-mask", json={"inputs": TEXT}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": "The \\ud800 [MASK] ."}',
        b'{"inputs": ["fine [MASK] .", "\\udfff [MASK]"]}',
    ],
)
def test_a_lone_surrogate_is_a_422_not_a_500(client: TestClient, body: bytes) -> None:
    response = client.post("/fill-mask", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_text")
    assert "not valid Unicode" in error["error"]


def test_documented_routes_are_not_counted_as_unmatched(tiny_artifact: Path) -> None:
    with TestClient(create_app(make_settings(tiny_artifact))) as c:
        assert c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/nope").status_code == 404
        text = c.get("/metrics").text
    assert sample(text, "microbert_requests_total", route="/docs", status="200") == 1
    assert sample(text, "microbert_requests_total", route="/openapi.json", status="200") == 1
    assert sample(text, "microbert_requests_total", route="unmatched", status="404") == 1


def test_a_corrupt_export_is_logged_once_per_change(
    tmp_path: Path, tiny_tokenizer: Any, tiny_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    step = add_step(run_dir, tiny_tokenizer, tiny_config, step=1, seed=1)
    weights = step / "model.safetensors"

    def corrupt(data: bytes) -> None:
        """A corrupt safetensors header that the manifest vouches for: loading gets to parsing it."""
        weights.write_bytes(data)
        manifest = json.loads((step / "manifest.json").read_text())
        manifest["files"]["model.safetensors"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        (step / "manifest.json").write_text(json.dumps(manifest))

    corrupt(b"\xff" * 8 + b"{not a header")
    caplog.set_level(logging.INFO, logger="microbert.serve")
    with TestClient(create_app(make_settings(run_dir))) as c:
        time.sleep(3.5)  # with no model the export is looked at every second
        assert c.get("/ready").status_code == 503
        assert "not a readable safetensors file" in c.get("/ready").json()["error"]
        first = [r for r in caplog.records if "failed" in r.getMessage() or "waiting" in r.getMessage()]
        assert len(first) == 1, [r.getMessage() for r in first]
        assert first[0].exc_info is None  # the reason, not a traceback
        corrupt(b"\xff" * 8 + b"{still not a header!")  # a change: said again, once
        time.sleep(2.5)
        second = [r for r in caplog.records if "failed" in r.getMessage() or "waiting" in r.getMessage()]
        assert len(second) == 2, [r.getMessage() for r in second]


def test_workers_auto_counts_cores() -> None:
    assert auto_workers(2, gpu=False) == 2
    assert auto_workers(1, gpu=False) == 1
    assert auto_workers(16, gpu=True) == 8  # HTTP workers on half the cores; the model process the rest
    assert auto_workers(64, gpu=True) == 8
    assert auto_workers(1, gpu=True) == 1
