"""Property-based fuzzing from the service's own OpenAPI schema (schemathesis): no 5xx, no crash.

Cases are generated from the schema, valid ones and deliberately invalid ones, and sent through the
same `TestClient` whose lifespan loaded the model, so every answer comes from the real service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serve.app import create_app
from tests.serve.conftest import make_settings

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (path, method, mode, examples): GET routes take no input, so they have no invalid cases to generate.
CASES = [
    ("/fill-mask", "POST", POSITIVE, 30),
    ("/fill-mask", "POST", NEGATIVE, 30),
    ("/health", "GET", POSITIVE, 3),
    ("/ready", "GET", POSITIVE, 3),
    ("/info", "GET", POSITIVE, 3),
]


@pytest.fixture(scope="module")
def fuzz_client(tiny_artifact: Path) -> Any:
    with TestClient(create_app(make_settings(tiny_artifact)), raise_server_exceptions=True) as client:
        yield client


@pytest.mark.parametrize(("path", "method", "mode", "examples"), CASES)
def test_no_server_error_for_any_request(
    fuzz_client: TestClient, path: str, method: str, mode: Any, examples: int
) -> None:
    schema = schemathesis.openapi.from_dict(fuzz_client.app.openapi())  # type: ignore[attr-defined]
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        response = fuzz_client.request(**kwargs)
        assert response.status_code < 500, (kwargs, response.text)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) >= {"error", "error_type"} and "Traceback" not in response.text
        case.validate_response(response, checks=[not_a_server_error])

    check()
    assert fuzz_client.get("/health").status_code == 200
