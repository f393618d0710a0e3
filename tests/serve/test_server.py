"""A real `microbert-serve` (uvicorn) process on 127.0.0.1: clients, reloads, shutdown, workers, load."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from bench.serve_load import run_load
from microbert.checkpoint import save_artifact, update_latest
from microbert.model import BertForMaskedLM
from microbert.predict import FillMaskPredictor
from microbert.tokenizer import train_tokenizer
from serve.workers import BALANCED
from tests.serve.conftest import add_step
from tests.serve.test_api import TEXT, TWO_MASKS, sample

pytestmark = pytest.mark.timeout(120)


def test_inference_client_works_unchanged(
    start_server: Any, run_dir: Path, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite runs offline (HF_HUB_OFFLINE=1), which blocks every huggingface_hub request, loopback too.
    # A URL model and a token mean the client makes no request but ours, to 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = start_server(run_dir, env={"MICROBERT_API_KEY": "k3y"})
    expected = FillMaskPredictor.from_pretrained(tiny_artifact)
    client = InferenceClient(model=server.url + "/fill-mask", token="k3y")
    answer = client.fill_mask(TEXT)
    assert [(c.token, c.token_str, c.sequence) for c in answer] == [
        (c["token"], c["token_str"], c["sequence"]) for c in expected.predict(TEXT)[0]
    ]
    assert answer[0].score == pytest.approx(expected.predict(TEXT)[0][0]["score"], rel=1e-6)
    with_targets = client.fill_mask(TEXT, targets=["king", "queen"], top_k=2)
    assert {c.token_str for c in with_targets} == {"king", "queen"}
    with pytest.raises(HfHubHTTPError) as error:
        client.fill_mask("no mask here")
    assert error.value.response.status_code == 400
    with pytest.raises(HfHubHTTPError) as error:
        InferenceClient(model=server.url + "/fill-mask", token="wrong").fill_mask(TEXT)
    assert error.value.response.status_code == 401
    # Plain HTTP: several masks, list inputs.
    headers = {"authorization": "Bearer k3y"}
    several = httpx.post(server.url + "/fill-mask", json={"inputs": TWO_MASKS}, headers=headers).json()
    assert len(several) == 2 and len(several[0]) == 5
    listed = httpx.post(server.url + "/fill-mask", json={"inputs": [TEXT, TWO_MASKS]}, headers=headers).json()
    # Padding in a shared batch moves scores in the last float digits only.
    assert same_result(listed, expected.predict([TEXT, TWO_MASKS]))
    assert same_result(listed[1], several)


def same_result(a: Any, b: Any) -> bool:
    """Equal structure, tokens and sequences; scores equal to 1e-5 relative."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_result, a, b))
    rest_a = {k: v for k, v in a.items() if k != "score"}
    rest_b = {k: v for k, v in b.items() if k != "score"}
    return rest_a == rest_b and a["score"] == pytest.approx(b["score"], rel=1e-5)


class Traffic:
    """Background clients sending requests until stopped; every status is recorded."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.statuses, self.steps = url, Counter[str](), set[int]()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                try:
                    status = str(http.post(self.url + "/fill-mask", json={"inputs": TEXT}).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.statuses[status] += 1

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.statuses


def wait_for_step(url: str, step: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(url + "/info").json()["step"] != step:
        assert time.monotonic() < deadline, f"step {step} was not loaded"
        time.sleep(0.1)


def test_reload_under_traffic_fails_no_request(
    start_server: Any, run_dir: Path, tiny_tokenizer: Any, tiny_config: Any
) -> None:
    server = start_server(run_dir, env={"MICROBERT_RELOAD_INTERVAL_S": "0.2"})
    traffic = Traffic(server.url)
    time.sleep(0.5)
    add_step(run_dir, tiny_tokenizer, tiny_config, step=8, seed=8)  # picked up by the export/latest watch
    wait_for_step(server.url, 8)
    add_step(run_dir, tiny_tokenizer, tiny_config, step=9, seed=9)
    wait_for_step(server.url, 9)
    time.sleep(0.3)
    statuses = traffic.stop()
    assert set(statuses) == {"200"} and statuses["200"] > 20, statuses
    metrics = httpx.get(server.url + "/metrics").text
    assert sample(metrics, "microbert_model_reloads_total", result="ok") == 2
    assert sample(metrics, "microbert_model_info", step="9") == 1
    assert sample(metrics, "microbert_model_info", step="7") == 0


def test_sighup_reloads_and_a_broken_export_is_refused(
    start_server: Any, run_dir: Path, tiny_tokenizer: Any, tiny_config: Any
) -> None:
    server = start_server(run_dir)  # no polling: only SIGHUP reloads
    traffic = Traffic(server.url, clients=2)
    add_step(run_dir, tiny_tokenizer, tiny_config, step=8, seed=8)
    time.sleep(0.3)
    assert httpx.get(server.url + "/info").json()["step"] == 7
    server.process.send_signal(signal.SIGHUP)
    wait_for_step(server.url, 8)
    broken = add_step(run_dir, tiny_tokenizer, tiny_config, step=9, seed=9)
    (broken / "model.safetensors").write_bytes(b"not the weights")  # no longer matches its manifest
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while (
        sample(httpx.get(server.url + "/metrics").text, "microbert_model_reloads_total", result="failed") < 1
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    statuses = traffic.stop()
    assert httpx.get(server.url + "/info").json()["step"] == 8  # still serving the last good model
    assert set(statuses) == {"200"}, statuses
    assert server.alive()


def test_sigterm_finishes_in_flight_requests_and_exits_0(start_server: Any, run_dir: Path) -> None:
    # A long batching wait keeps the requests in flight when SIGTERM arrives.
    server = start_server(run_dir, env={"MICROBERT_MAX_WAIT_MS": "700"})
    with httpx.Client() as http:  # a burst first: the adaptive wait holds a batch only under traffic
        for _ in range(20):
            http.post(server.url + "/fill-mask", json={"inputs": TEXT})
    results: list[int] = []
    senders = [
        threading.Thread(
            target=lambda: results.append(
                httpx.post(server.url + "/fill-mask", json={"inputs": TEXT}, timeout=30).status_code
            )
        )
        for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    for sender in senders:
        sender.join(30)
    assert results == [200] * 4
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_an_idle_connection_is_closed_after_the_keep_alive_setting(start_server: Any, run_dir: Path) -> None:
    """MICROBERT_KEEP_ALIVE_S reaches uvicorn: at 2 s an idle keep-alive connection is closed between
    1.5 and 4 s after its answer (uvicorn's own 5 s would keep it open). A 429's longest wait is half
    of it, so a polite client's retry is written into a connection the server still holds."""
    server = start_server(run_dir, env={"MICROBERT_KEEP_ALIVE_S": "2"})
    body = b'{"inputs": "the [MASK] sat."}'
    request = (
        f"POST /fill-mask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(request)
        answer = connection.makefile("rb")
        assert answer.readline().startswith(b"HTTP/1.1 200")
        headers = dict(line.rstrip(b"\r\n").split(b": ", 1) for line in iter(answer.readline, b"\r\n"))
        answer.read(int(headers[b"content-length"]))  # the whole answer (headers and body come apart)
        answered = time.monotonic()
        connection.settimeout(4.0)
        assert connection.recv(1) == b""  # closed by the server, not timed out here
        assert 1.5 <= time.monotonic() - answered < 4.0


def test_workers_share_one_metrics_view(start_server: Any, run_dir: Path) -> None:
    server = start_server(run_dir, workers=2)
    # MICROBERT_REUSE_PORT=auto: a socket each, on Linux, with or without a model process
    assert ("SO_REUSEPORT" in server.log_path.read_text()) == BALANCED
    with httpx.Client() as http:  # new connections, so both workers take some
        pids = set()
        for _ in range(30):
            response = httpx.post(server.url + "/fill-mask", json={"inputs": TEXT})
            assert response.status_code == 200
        for _ in range(6):
            assert http.post(server.url + "/fill-mask", json={"inputs": "no mask"}).status_code == 400
        del pids
    totals = [
        sample(
            httpx.get(server.url + "/metrics").text,
            "microbert_requests_total",
            route="/fill-mask",
            status="200",
        )
        for _ in range(6)
    ]
    assert totals == [30] * 6  # whichever worker answers /metrics, it counts both workers' requests
    text = httpx.get(server.url + "/metrics").text
    assert sample(text, "microbert_request_failures_total", error_type="no_mask") == 6
    assert sample(text, "microbert_queue_duration_seconds_count") == 30
    assert server.stop() == 0


@pytest.mark.slow
def test_64_clients_get_only_200_or_429_and_the_server_stays_up(start_server: Any, run_dir: Path) -> None:
    server = start_server(run_dir, env={"MICROBERT_MAX_QUEUE": "64"})  # small: some clients must get 429
    result = asyncio.run(run_load("127.0.0.1", server.port, concurrency=64, duration_s=3))
    assert set(result.statuses) <= {"200", "429"}, result.statuses
    assert result.ok > 0
    assert server.alive() and httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/fill-mask", json={"inputs": TEXT}).status_code == 200


def test_one_model_process_serves_several_http_workers(
    start_server: Any, run_dir: Path, tiny_artifact: Path, sample_texts: list[str], tiny_config: Any
) -> None:
    """The GPU layout (serve/remote.py), run on a CPU: same answers, errors, readiness and metrics;
    after a reload to an export with another tokenizer, the workers tokenize for that one."""
    server = start_server(
        run_dir, workers=2, env={"MICROBERT_MODEL_PROCESS": "on", "MICROBERT_RELOAD_INTERVAL_S": "0.2"}
    )
    log = server.log_path.read_text()
    assert "2 HTTP worker(s), one model process on cpu" in log
    expected = FillMaskPredictor.from_pretrained(tiny_artifact)
    for _ in range(6):  # new connections: both workers answer
        body = httpx.post(server.url + "/fill-mask", json={"inputs": [TEXT, TWO_MASKS]}).json()
        assert same_result(body, expected.predict([TEXT, TWO_MASKS]))
    targets = httpx.post(
        server.url + "/fill-mask", json={"inputs": TEXT, "parameters": {"targets": ["king", "queen"]}}
    ).json()
    assert {c["token_str"] for c in targets} == {"king", "queen"}
    assert httpx.post(server.url + "/fill-mask", json={"inputs": "no mask"}).json()["error_type"] == "no_mask"
    too_long = httpx.post(server.url + "/fill-mask", json={"inputs": "word " * 200 + "[MASK]"})
    assert too_long.status_code == 422 and too_long.json()["error_type"] == "input_too_long"
    info = httpx.get(server.url + "/info").json()
    assert info["step"] == 7 and info["limits"]["max_input_tokens"] == 128
    text = httpx.get(server.url + "/metrics").text
    assert sample(text, "microbert_requests_total", route="/fill-mask", status="200") == 7
    assert sample(text, "microbert_batch_size_inputs_sum") == 13  # counted in the model process
    assert sample(text, "microbert_input_tokens_count") == 13  # observe_many, in multiprocess mode
    assert sample(text, "microbert_queue_duration_seconds_count") == 13
    other = train_tokenizer(sample_texts[:800], vocab_size=600)
    torch.manual_seed(8)
    model = BertForMaskedLM(tiny_config.replace(vocab_size=other.get_vocab_size())).eval()
    step = save_artifact(model, other, run_dir / "export" / "step-8", metadata={"step": 8})
    update_latest(run_dir / "export", step)
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/ready").json().get("step") != 8:
        assert time.monotonic() < deadline, "the new export was not picked up"
        time.sleep(0.1)
    expected = FillMaskPredictor.from_pretrained(step)
    for _ in range(6):
        body = httpx.post(server.url + "/fill-mask", json={"inputs": [TEXT, TWO_MASKS]}).json()
        assert same_result(body, expected.predict([TEXT, TWO_MASKS]))
    assert server.stop() == 0
