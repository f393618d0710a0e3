"""FastAPI dependencies shared by the routers (`Annotated`, as full-stack-fastapi-template does).

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
dependency per request, which cost more than the rest of a small request's handling.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from serve.errors import ServiceError
from serve.metrics import Metrics
from serve.service import Backend
from serve.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_service(request: Request) -> Backend:
    service: Backend | None = getattr(request.app.state, "service", None)
    if service is None:  # the lifespan has not run (an app used without `with TestClient(app)`)
        raise ServiceError(503, "not_ready", "the service is starting", estimated_time=1.0)
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServiceDep = Annotated[Backend, Depends(get_service)]


async def authorized_service(request: Request) -> Backend:
    """The API key checked (`require_api_key`), then the service (`get_service`): one dependency for
    the hot route, in that order, where three (the key, the settings it reads, the service) cost
    FastAPI's dependency solving more than the rest of a small request's routing (cProfile)."""
    await require_api_key(request, request.app.state.settings)
    return await get_service(request)


AuthorizedServiceDep = Annotated[Backend, Depends(authorized_service)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With an API key set: `Authorization: Bearer KEY` (InferenceClient(token=) sends it) or `X-API-Key`."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = request.headers.get("x-api-key", "")
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    if not given or not secrets.compare_digest(given.encode(), expected):
        error = ServiceError(
            401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'"
        )
        error.headers["www-authenticate"] = "Bearer"
        raise error
