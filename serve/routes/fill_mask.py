"""POST /fill-mask, in the Hugging Face Inference API convention.

The route is FastAPI's (its schema, OpenAPI examples and error answers); `FillMaskFastPath` answers
the same requests without FastAPI's routing, dependency solving and request objects when the body
is valid JSON of the request schema, and hands everything else to the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microbert.predict import mask_count
from serve.deps import AuthorizedServiceDep, require_api_key
from serve.errors import ServiceError
from serve.middleware import replaying
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


async def _until_disconnected(receive: Receive) -> None:
    # The body is already read, so the next message the server gives is the disconnect.
    while (await receive())["type"] != "http.disconnect":
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
    return await respond(service, body, request.receive)


async def respond(service: Backend, body: FillMaskRequest, receive: Receive) -> Response:
    """The answer to a valid body, from an authorized client (the route's and `FillMaskFastPath`'s):
    the request's own limits, then the model, abandoned with a 499 if the client goes meanwhile."""
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
    disconnected: asyncio.Future[Any] = asyncio.ensure_future(_until_disconnected(receive))
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
        except TimeoutError:
            raise timed_out(timeout_s) from None
    return orjson.dumps(results if listed else results[0])


class FillMaskFastPath:
    """ASGI middleware, innermost of the app's own: `POST /fill-mask` with a valid JSON body is
    answered here, by `respond` as the route would, without the rest of FastAPI.

    On a 2-core CPU the event loops' share of a single-sentence request was about 0.7 ms, most of it
    Python in FastAPI's routing, dependency solving and request handling, not in parsing or
    tokenizing; this path takes about half of that (bench/NOTES.md, session 19). It is the route's
    semantics exactly, because it is the route's code for everything but the dispatch: the body is
    validated by the same model in the same mode (`FillMaskRequest.model_validate` of the parsed
    JSON, as FastAPI validates a JSON body), the API key by the same check, the answer and its errors
    by `respond` and `ServiceError.response`. Anything else (another content type, a body that is not
    JSON or not the schema, no model yet) goes to FastAPI with the body replayed, and FastAPI answers
    it with the errors and in the order it always has (a wrong key before a bad body: the key
    is checked here only for a valid body). The middlewares outside (metrics, limits, the body's
    size) see both paths alike; `scope["route"]` is set as FastAPI's router sets it.
    """

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app
        self.route = next(r for r in router.routes if getattr(r, "path", None) == "/fill-mask")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != "/fill-mask"
            or scope.get("root_path")
            or not _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body, receive = await _read_body(receive)
        service: Backend | None = getattr(self.fastapi_app.state, "service", None)
        if body is None or service is None or (request := _valid(body)) is None:
            await self.app(scope, receive, send)  # FastAPI answers, with its own errors
            return
        scope["route"] = self.route
        try:
            await require_api_key(Request(scope), self.fastapi_app.state.settings)
            response = await respond(service, request, receive)
        except ServiceError as exc:
            response = exc.response()
        await response(scope, receive, send)


def _valid(body: bytes) -> FillMaskRequest | None:
    """The body as the route's model, validated as FastAPI validates a JSON body; None if it is not."""
    try:
        return FillMaskRequest.model_validate(orjson.loads(body))
    except (orjson.JSONDecodeError, ValidationError):
        return None


def _is_json(scope: Scope) -> bool:
    """Content-Type application/json, with or without parameters (charset), as clients send it."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole body (None when the client went before sending it), and a `receive` that gives it
    again as one message, then whatever the server gives next (the disconnect)."""
    chunks: list[bytes] = []
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    if messages[-1]["type"] != "http.request":
        return None, replaying(messages, receive)
    body = b"".join(chunks)
    return body, replaying([{"type": "http.request", "body": body, "more_body": False}], receive)
