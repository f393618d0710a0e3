"""GET /metrics: the Prometheus exposition (summed over workers in multiprocess mode)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from serve.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
