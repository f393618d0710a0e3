"""GET /health (the process answers), /ready (a model is loaded), /info (what is served, and its limits)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from serve.deps import ServiceDep
from serve.errors import not_ready
from serve.schemas import ErrorBody, Health, Info, Limits, Ready

router = APIRouter(tags=["health"])

try:
    VERSION = version("microbert")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0+local"


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Liveness: answers while the event loop runs, whatever the model is doing."""
    return Health(status="ok")


@router.get("/ready", response_model=Ready, responses={503: {"model": ErrorBody}})
async def ready(service: ServiceDep) -> Ready:
    """Readiness: 200 once a model is loaded; 503 with `estimated_time` before."""
    status = await service.status()
    if not status.ready:
        raise not_ready(
            f"the model is not loaded yet ({status.last_error or 'loading'})", status.estimated_time
        )
    return Ready(status="ready", step=status.step)


@router.get("/info", response_model=Info, responses={503: {"model": ErrorBody}})
async def info(service: ServiceDep) -> Info:
    status = await service.status()
    if not status.ready or status.info is None:
        raise not_ready("the model is not loaded yet", status.estimated_time)
    s, model = service.settings, dict(status.info)
    max_input_tokens = model.pop("max_input_tokens")
    return Info(
        **model,
        limits=Limits(
            max_input_tokens=max_input_tokens,
            max_inputs=s.max_inputs,
            max_top_k=s.max_top_k,
            max_predictions=s.max_predictions,
            max_response_bytes=s.max_response_bytes,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_queue_tokens=s.queue_tokens,
            max_queue=s.max_queue,
            max_concurrent_requests=s.concurrent_requests,
            max_concurrent_requests_per_worker=s.concurrent_requests_per_worker,
            max_body_bytes=s.max_body_bytes,
            request_timeout_s=s.request_timeout_s,
        ),
        version=VERSION,
    )
