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
    if service.current is None:
        raise not_ready(
            f"the model is not loaded yet ({service.last_error or 'loading'})", service.estimated_time()
        )
    return Ready(status="ready", step=service.current.step)


@router.get("/info", response_model=Info, responses={503: {"model": ErrorBody}})
async def info(service: ServiceDep) -> Info:
    loaded = service.current
    if loaded is None:
        raise not_ready("the model is not loaded yet", service.estimated_time())
    s, predictor = service.settings, loaded.predictor
    config = predictor.model.config
    return Info(
        model=str(loaded.path),
        model_dir=str(service.model_dir),
        step=loaded.step,
        dtype=service.dtype,
        device=service.device,
        mask_token=predictor.mask_token,
        vocab_size=config.vocab_size,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        max_position_embeddings=config.max_position_embeddings,
        limits=Limits(
            max_input_tokens=predictor.max_length,
            max_inputs=s.max_inputs,
            max_top_k=s.max_top_k,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_queue=s.max_queue,
            max_body_bytes=s.max_body_bytes,
        ),
        version=VERSION,
        loaded_at=loaded.loaded_at,
    )
