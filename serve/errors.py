"""The service's error answers: `{"error": str, "error_type": str}` with the right status, no traceback."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    """An error with an HTTP status and a stable `error_type` that clients and metrics can key on."""

    def __init__(self, status_code: int, error_type: str, message: str, **extra: Any):
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def response(self) -> JSONResponse:
        return error_response(
            self.status_code, self.error_type, self.message, headers=self.headers, **self.extra
        )


def error_response(
    status_code: int, error_type: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one error body shape; `error_type` also travels in a header so middleware can count it."""
    return JSONResponse(
        {"error": message, "error_type": error_type, **extra},
        status_code=status_code,
        headers={**(headers or {}), "x-error-type": error_type},
    )


def retry_after(seconds: float) -> dict[str, str]:
    """A 429's wait: Retry-After in whole seconds, as HTTP has them (at least 1: a 0 invites an
    immediate retry storm), and Retry-After-Ms for clients that can wait less than a second."""
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def not_ready(message: str, estimated_time: float) -> ServiceError:
    """503 in the Hugging Face Inference API's shape: clients read `estimated_time` (seconds) and retry."""
    error = ServiceError(503, "not_ready", message, estimated_time=round(estimated_time, 1))
    error.headers["retry-after"] = str(max(1, round(estimated_time)))
    return error


def install_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI or Starlette raises answers in the one error shape."""

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return exc.response()

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for problem in exc.errors()[:10]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        return error_response(422, "validation_error", "; ".join(problems) or "invalid request")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return error_response(exc.status_code, error_type, str(exc.detail), headers=dict(exc.headers or {}))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
