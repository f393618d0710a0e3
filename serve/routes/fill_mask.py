"""POST /fill-mask, in the Hugging Face Inference API convention."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from fastapi import APIRouter, Body, Request
from fastapi.responses import Response

from microbert.predict import mask_count
from serve.deps import AuthorizedServiceDep
from serve.errors import ServiceError
from serve.schemas import ErrorBody, FillMaskRequest, FillMaskResponse
from serve.service import Backend, timed_out
from serve.settings import Settings

router = APIRouter(tags=["fill-mask"])

# A small answer is formatted on the event loop (tens of microseconds); a larger one in a thread.
_INLINE_PREDICTIONS = 256
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "no mask, empty input or bad targets",
        401: "API key missing or wrong (only when the server has one)",
        413: "body over max_body_bytes",
        422: "schema error, text that is not valid Unicode, too many inputs, top_k over the limit, "
        "too many predictions (inputs × masks × top_k) or too large a response, or an input longer "
        "than the model accepts",
        429: "queue full: retry shortly",
        503: "model not loaded yet (`estimated_time` seconds), or the request overran request_timeout_s",
    }.items()
}


def check_work(
    texts: list[str], top_k: int, targets: list[str] | str | None, mask_token: str, settings: Settings
) -> None:
    """Refuse a request by the work it would cause, before any of it: predictions and response bytes."""
    if targets is not None:
        top_k = min(top_k, 1 if isinstance(targets, str) else max(1, len(targets)))
    predictions, response_bytes = 0, 0
    for text in texts:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            continue  # the model side answers it with invalid_text
        candidates = mask_count(text, mask_token) * top_k
        predictions += candidates
        response_bytes += candidates * (size + _BYTES_PER_CANDIDATE)
    if predictions > settings.max_predictions:
        raise ServiceError(
            422,
            "too_many_predictions",
            f"the request asks for {predictions} predictions (inputs × masks × top_k); at most "
            f"{settings.max_predictions} per request (max_predictions): send fewer masks or a smaller top_k",
            max_predictions=settings.max_predictions,
        )
    if response_bytes > settings.max_response_bytes:
        raise ServiceError(
            422,
            "response_too_large",
            f"the answer would be about {response_bytes} bytes; at most {settings.max_response_bytes} "
            "(max_response_bytes): send fewer or shorter inputs, fewer masks or a smaller top_k",
            max_response_bytes=settings.max_response_bytes,
        )


# Keys, score, token id and token string of one candidate, beyond its `sequence` (about the text).
_BYTES_PER_CANDIDATE = 96


async def _until_disconnected(request: Request) -> None:
    # The body is already read, so the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/fill-mask",
    response_model=FillMaskResponse,
    responses=_ERRORS,
    summary="Predict the tokens at [MASK]",
)
async def fill_mask(
    request: Request,
    service: AuthorizedServiceDep,  # the API key is checked first (401), before the body (422)
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
    settings = service.settings
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
    for i, text in enumerate(texts):
        if not text.strip():
            where = f"inputs[{i}]: " if listed else ""
            raise ServiceError(400, "empty_input", f"{where}input text is empty")
    mask_token = await service.mask_token()
    check_work(texts, top_k, targets, mask_token, settings)
    work = asyncio.ensure_future(_answer(service, texts, top_k, targets, listed))
    disconnected: asyncio.Future[Any] = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([work, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not work.done():  # the client is gone: cancelling drops its queued inputs
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work  # its clean-up (dropping the queued inputs) runs before we answer
        return Response(status_code=499, headers={"x-error-type": "client_disconnected"})
    return Response(work.result(), media_type="application/json")


async def _answer(
    service: Backend, texts: list[str], top_k: int, targets: list[str] | str | None, listed: bool
) -> bytes:
    """The model's outputs, formatted in the pipeline's shape and serialized, within the request deadline."""
    timeout_s = service.settings.request_timeout_s
    deadline = time.monotonic() + timeout_s
    formatter, _, items = await service.infer(texts, top_k, targets, listed, timeout_s)
    if sum(p.num_masks * p.top_k for p, _ in items) <= _INLINE_PREDICTIONS:
        results = formatter.format(items)
    else:
        try:
            results = await asyncio.wait_for(
                asyncio.to_thread(formatter.format, items), max(0.0, deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            raise timed_out(timeout_s) from None
    return orjson.dumps(results if listed else results[0])
