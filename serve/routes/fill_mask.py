"""POST /fill-mask, in the Hugging Face Inference API convention."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response

from microbert.errors import InputError, InputTooLongError
from microbert.predict import FillMaskPredictor, FillMaskResult, PreparedInput
from serve.batcher import QueueFullError
from serve.deps import ServiceDep, require_api_key
from serve.errors import ServiceError, not_ready
from serve.schemas import ErrorBody, FillMaskRequest, FillMaskResponse

router = APIRouter(tags=["fill-mask"])

# Tokenizing is fast for sentences; a request this long is tokenized off the event loop instead.
_INLINE_CHARS = 4096
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "no mask, empty input or bad targets",
        401: "API key missing or wrong (only when the server has one)",
        413: "body over max_body_bytes",
        422: "schema error, too many inputs, top_k over the limit, or an input longer than the model accepts",
        429: "queue full: retry shortly",
        503: "model not loaded yet (`estimated_time` seconds)",
    }.items()
}


def _prepare(
    predictor: FillMaskPredictor, texts: list[str], top_k: int, targets: list[str] | str | None, listed: bool
) -> list[PreparedInput]:
    """Validate and tokenize every input; the first problem becomes the request's error."""
    target_ids = None
    if targets is not None:
        try:
            target_ids = predictor.target_ids(targets)
        except InputError as exc:
            raise ServiceError(400, "bad_targets", str(exc)) from None
    prepared = []
    for i, text in enumerate(texts):
        where = f"inputs[{i}]: " if listed else ""
        if not text.strip():
            raise ServiceError(400, "empty_input", f"{where}input text is empty")
        try:
            prepared.append(predictor.prepare(text, top_k=top_k, target_ids=target_ids))
        except InputTooLongError as exc:
            raise ServiceError(422, "input_too_long", f"{where}{exc}", max_tokens=exc.max_tokens) from None
        except InputError as exc:
            raise ServiceError(400, "no_mask", f"{where}{exc}") from None
    return prepared


async def _until_disconnected(request: Request) -> None:
    # The body is already read, so the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/fill-mask",
    response_model=FillMaskResponse,
    responses=_ERRORS,
    dependencies=[Depends(require_api_key)],
    summary="Predict the tokens at [MASK]",
)
async def fill_mask(
    request: Request,
    service: ServiceDep,
    body: FillMaskRequest = Body(  # noqa: B008 - FastAPI's way of giving OpenAPI examples
        openapi_examples={
            "one mask": {"value": {"inputs": "The [MASK] of the ship."}},
            "several inputs": {"value": {"inputs": ["To be or not to [MASK].", "A [MASK] and a [MASK]."]}},
            "targets": {
                "value": {"inputs": "The [MASK] was calm.", "parameters": {"targets": ["sea", "land"]}}
            },
        }
    ),
) -> Response:
    """One input: its result. A list of inputs: one result per input, in order (see the response schema)."""
    settings, loaded, batcher = service.settings, service.current, service.batcher
    if loaded is None or batcher is None:
        raise not_ready(
            f"the model is not loaded yet ({service.last_error or 'loading'})", service.estimated_time()
        )
    listed = isinstance(body.inputs, list)
    texts = body.inputs if isinstance(body.inputs, list) else [body.inputs]
    if not texts:
        raise ServiceError(400, "empty_input", "inputs is an empty list: give at least one text")
    if len(texts) > settings.max_inputs:
        raise ServiceError(
            422, "too_many_inputs", f"{len(texts)} inputs; at most {settings.max_inputs} per request"
        )
    parameters = body.parameters
    top_k = (parameters.top_k if parameters else None) or 5
    if top_k > settings.max_top_k:
        raise ServiceError(422, "top_k_too_large", f"top_k is {top_k}; at most {settings.max_top_k}")
    targets = parameters.targets if parameters else None
    args = (loaded.predictor, texts, top_k, targets, listed)
    if sum(map(len, texts)) <= _INLINE_CHARS:
        prepared = _prepare(*args)
    else:
        prepared = await asyncio.to_thread(_prepare, *args)
    try:
        futures = batcher.submit(loaded.predictor, prepared)
    except QueueFullError as exc:
        error = ServiceError(429, "queue_full", str(exc))
        error.headers["retry-after"] = "1"
        raise error from None
    results_future: asyncio.Future[Any] = asyncio.gather(*futures)
    disconnected: asyncio.Future[Any] = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([results_future, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not results_future.done():
        batcher.discard(futures)  # the client is gone: drop its work
        results_future.cancel()
        return Response(status_code=499, headers={"x-error-type": "client_disconnected"})
    results: list[FillMaskResult] = results_future.result()
    return JSONResponse(results if listed else results[0])
