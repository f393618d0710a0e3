"""The FastAPI app: `create_app(settings)`; the model is loaded once, in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serve.errors import install_error_handlers
from serve.metrics import Metrics, watch_event_loop
from serve.middleware import (
    BodyLimitMiddleware,
    CatchAllMiddleware,
    ConcurrencyLimitMiddleware,
    MetricsMiddleware,
)
from serve.remote import RemoteModel
from serve.routes import fill_mask, health, metrics, page
from serve.service import Backend, ModelService, settle_heap
from serve.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # With a model process (microbert-serve --workers N on a GPU), this worker only does HTTP.
        service: Backend = (
            RemoteModel(settings) if settings.model_socket else ModelService(settings, app_metrics)
        )
        await service.start()
        settle_heap()
        app.state.service = service
        lag = asyncio.create_task(watch_event_loop(app_metrics.event_loop_lag), name="microbert-loop-lag")
        try:
            yield
        finally:  # uvicorn has stopped accepting and finished in-flight requests by now
            lag.cancel()
            await service.stop()

    app = FastAPI(title="MicroBERT fill-mask", version=health.VERSION, lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, app_metrics
    install_error_handlers(app)
    for module in (fill_mask, health, metrics, page):
        app.include_router(module.router)
    if settings.fast_path:
        app.add_middleware(fill_mask.FillMaskFastPath, fastapi_app=app)  # innermost of ours
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        limit=settings.concurrent_requests_per_worker,
        total=settings.concurrent_requests,
        max_retry_s=settings.max_retry_s,
        metrics=app_metrics,
    )
    # The routers' own routes too: FastAPI's app.routes holds an included router as one entry with
    # no path, and a request refused before routing (429, 413) has no route in its scope to read.
    own_routes = [route for module in (fill_mask, health, metrics, page) for route in module.router.routes]
    app.add_middleware(MetricsMiddleware, metrics=app_metrics, routes=lambda: [*own_routes, *app.routes])
    return app


def app_from_env() -> FastAPI:
    """The factory uvicorn workers call (`--workers N`): settings from MICROBERT_* variables."""
    return create_app(Settings())
