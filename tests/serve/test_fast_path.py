"""`FillMaskFastPath` answers exactly as FastAPI's route does, and hands it what it does not take."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.routes.fill_mask import FillMaskFastPath
from tests.serve.conftest import make_settings

TEXT = "the king is [MASK] of the realm ."
JSON = {"content-type": "application/json"}

# (body bytes, headers): valid requests of every shape, and every way a body can be wrong.
CASES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"inputs": "' + TEXT.encode() + b'"}', JSON),
    (b'{"inputs": ["' + TEXT.encode() + b'", "a [MASK] and a [MASK] ."]}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": 3}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"targets": ["king", "the"]}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"targets": "king", "top_k": null}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "options": {"wait_for_model": true}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'"}', {"content-type": "application/json; charset=utf-8"}),
    (b'{"inputs": "' + TEXT.encode() + b'"}', {"content-type": "text/plain"}),
    (b'{"inputs": "' + TEXT.encode() + b'"}', {}),
    (b'{"inputs": "no mask here"}', JSON),
    (b'{"inputs": "   "}', JSON),
    (b'{"inputs": []}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": 51}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": "3"}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": 1e400}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": 123456789012345678901234567890}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "parameters": {"top_k": NaN}}', JSON),
    (b'{"inputs": "' + TEXT.encode() + b'", "unknown": 1}', JSON),
    (b'{"inputs": "[MASK] \\ud800"}', JSON),  # a lone surrogate: valid JSON, not valid text
    (b'{"inputs": "a", "inputs": "' + TEXT.encode() + b'"}', JSON),  # the last of duplicate keys
    (b'{"inputs": 5}', JSON),
    (b'{"inputs": ', JSON),
    (b"\xff\xfe not utf-8", JSON),
    (b"", JSON),
    (b'["' + TEXT.encode() + b'"]', JSON),
]


@pytest.fixture(scope="module")
def clients(tiny_artifact: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """The same settings with and without the fast path."""
    fast = create_app(make_settings(tiny_artifact, max_top_k=50))
    plain = create_app(make_settings(tiny_artifact, max_top_k=50, fast_path=False))
    with TestClient(fast) as f, TestClient(plain) as p:
        yield f, p


def _answer(client: TestClient, body: bytes, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
    response = client.post("/fill-mask", content=body, headers=headers)
    shown = {
        k: v for k, v in response.headers.items() if k in ("content-type", "x-error-type", "www-authenticate")
    }
    try:
        content: Any = response.json()
    except ValueError:
        content = response.text
    return response.status_code, content, shown


@pytest.mark.parametrize(("body", "headers"), CASES)
def test_the_same_answer_with_and_without_the_fast_path(
    clients: tuple[TestClient, TestClient], body: bytes, headers: dict[str, str]
) -> None:
    fast, plain = clients
    assert _answer(fast, body, headers) == _answer(plain, body, headers)


def test_the_cases_cover_answers_and_errors(clients: tuple[TestClient, TestClient]) -> None:
    """The comparison above means something only if both paths are taken: answers and errors alike."""
    statuses = {_answer(clients[0], body, headers)[0] for body, headers in CASES}
    assert {200, 400, 422} <= statuses


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer nope"}, {"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}],
)
@pytest.mark.parametrize("body", [b'{"inputs": "' + TEXT.encode() + b'"}', b'{"inputs": 3}', b"{not json"])
def test_the_api_key_the_same_way(tiny_artifact: Path, headers: dict[str, str], body: bytes) -> None:
    fast = create_app(make_settings(tiny_artifact, api_key="s3cret"))
    plain = create_app(make_settings(tiny_artifact, api_key="s3cret", fast_path=False))
    with TestClient(fast) as f, TestClient(plain) as p:
        both = {**JSON, **headers}
        assert _answer(f, body, both) == _answer(p, body, both)


class _Downstream:
    """The app behind the fast path (FastAPI's, in the server): records what reaches it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _drive(
    app: Any, method: str, body_parts: list[bytes], headers: list[tuple[bytes, bytes]]
) -> list[int]:
    """One request through an ASGI app, the body in `body_parts` (chunked): the statuses sent. Run
    in the test client's event loop, where the service's batcher runs."""
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
        for i, part in enumerate(body_parts)
    ]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays: no disconnect
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "method": method, "path": "/fill-mask", "root_path": "", "headers": headers,
             "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "scheme": "http", "http_version": "1.1"}  # fmt: skip
    await app(scope, receive, send)
    return statuses


def test_valid_bodies_are_answered_here_and_the_rest_reach_fastapi_with_their_bytes(
    tiny_artifact: Path,
) -> None:
    app = create_app(make_settings(tiny_artifact))
    with TestClient(app) as client:
        downstream = _Downstream()
        fast = FillMaskFastPath(downstream, fastapi_app=app)
        json = [(b"content-type", b"application/json")]
        valid = b'{"inputs": "' + TEXT.encode() + b'"}'
        # A chunked valid body: answered here, FastAPI never sees it.
        assert client.portal.call(_drive, fast, "POST", [valid[:10], valid[10:]], json) == [200]
        assert downstream.bodies == []
        # Not the schema, not JSON, not JSON's type, not POST: FastAPI's, with the body as sent.
        for method, body, headers in [
            ("POST", b'{"inputs": 3}', json),
            ("POST", b"{oops", json),
            ("POST", valid, [(b"content-type", b"text/plain")]),
            ("PUT", valid, json),
        ]:
            assert client.portal.call(_drive, fast, method, [body[:4], body[4:]], headers) == [299]
            assert downstream.bodies[-1] == (body if method == "POST" and headers == json else body[:4])
