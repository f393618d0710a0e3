"""The model being served, its loading and its reloading without downtime.

A reload loads the new export beside the running one (in a thread, so requests keep flowing),
verifies it (manifest checksums, then one real prediction) and swaps a single reference. Requests
already tokenized keep the predictor they were tokenized with until their batch runs, so nothing
fails during the swap; the old model is freed when its last batch is done. A run folder's
`export/latest` is polled every `reload_interval_s`; SIGHUP reloads at once. A folder that fails to
load is logged once (with the reason, no traceback) and retried only when its files change.

`infer` is the whole model side of a request (targets, tokenizing, the batch queue, a deadline), as
the HTTP route calls it in a one-process server. With a model process (`serve/remote.py`) the HTTP
workers tokenize (`encode_request`, the same checks and errors) and the model process only queues
and runs their inputs (`submit_prepared`), refusing inputs tokenized for an artifact it no longer serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from microbert.checkpoint import MANIFEST, resolve_artifact_dir
from microbert.errors import ArtifactError, ConfigError, InputError, InputTooLongError
from microbert.predict import (
    EmptyInputError,
    FillMaskEncoder,
    FillMaskFormatter,
    FillMaskPredictor,
    GroupOutput,
    InputGroup,
    InvalidTextError,
    ModelOutput,
    PreparedInput,
)
from serve.batcher import Batcher, QueueFullError
from serve.errors import ServiceError, not_ready, retry_after
from serve.metrics import Metrics
from serve.settings import Settings

log = logging.getLogger("microbert.serve")

# Set when shutdown left a forward pass running: the CLI then exits without joining its thread.
abandoned_model_thread = False

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """`auto` → cuda when there is one; dtype `auto` → bfloat16 on a GPU that supports it, else float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is visible: set MICROBERT_DEVICE=cpu or auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


@dataclass(frozen=True)
class Loaded:
    """One loaded model; replaced as a whole on reload so readers never see half of two."""

    predictor: FillMaskPredictor
    path: Path
    step: int | None
    loaded_at: float


@dataclass(frozen=True)
class Status:
    """What /ready and /info say; the same shape whether the model is in this process or another."""

    ready: bool
    step: int | None = None
    last_error: str | None = None
    estimated_time: float = 1.0
    info: dict[str, Any] | None = None  # the model's part of /info, when ready


Items = list[tuple[PreparedInput, ModelOutput]]

# Tokenizing is fast for sentences; a request this long is tokenized off the event loop instead.
_INLINE_CHARS = 4096


class Backend(Protocol):
    """What the routes need from the model: in this process (`ModelService`) or another (`RemoteModel`)."""

    settings: Settings

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def status(self) -> Status: ...

    async def mask_token(self) -> str: ...

    async def infer(
        self,
        texts: Sequence[str],
        top_k: int,
        targets: list[str] | str | None,
        listed: bool,
        timeout_s: float,
    ) -> tuple[FillMaskFormatter, Path, Items]: ...


_heap_settled = False


def settle_heap() -> None:
    """Once per process, when serving starts: keep the garbage collector off the hot path.

    What exists by then (the imported libraries, the model: ~200k objects) lives as long as the
    process; frozen, no collection walks it again. And requests in flight keep a few thousand
    objects alive, which crossed the default gen-0 threshold (700) hundreds of times a second.
    Measured on bert-tiny, 2 cores, under wrk: collections took 16% of the event loop's time, with
    full ones of up to 175 ms; after this, 0.03%. Collecting first frees what is already garbage.
    """
    global _heap_settled
    if _heap_settled:
        return
    _heap_settled = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _folder_state(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of a folder's files: a failed load is retried when they change."""
    try:
        return tuple(
            sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
        )
    except OSError:
        return ()


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics):
        if settings.model_dir is None:
            raise ConfigError("no model to serve: pass --model-dir or set MICROBERT_MODEL_DIR")
        self.settings = settings
        self.model_dir: Path = settings.model_dir
        self.metrics = metrics
        self.device, self.dtype = resolve_device(settings.device, settings.dtype)
        if settings.torch_threads:  # several model-owning workers on one CPU share its cores
            torch.set_num_threads(settings.torch_threads)
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.started = time.monotonic()
        self.batcher: Batcher | None = None
        self._lock: asyncio.Lock | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reload_tasks: set[asyncio.Task[bool]] = set()
        self._failed: tuple[Path, tuple[tuple[str, int, int], ...]] | None = None
        self._waiting_logged: str | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model if there is an export (before serving), start batching and the reload watch."""
        self._lock = asyncio.Lock()
        s = self.settings
        self.batcher = Batcher(
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_tokens=s.queue_tokens,
            max_queue=s.max_queue,
            metrics=self.metrics,
        )
        self.batcher.start()
        await self.reload(reason="start")
        if s.reload_interval_s > 0 or self.current is None:
            self._watch_task = asyncio.create_task(self._watch(), name="microbert-reload-watch")
        loop = asyncio.get_running_loop()
        # Signal handlers can only be set from the main thread (not so under TestClient): no SIGHUP there.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        # uvicorn has already given in-flight requests shutdown_timeout_s; what is still queued is orphaned.
        if self.batcher is not None and not await self.batcher.stop(
            min(1.0, self.settings.shutdown_timeout_s)
        ):
            # A forward pass outlived the shutdown bound: do not let interpreter exit join its thread.
            log.warning("a batch was still running at shutdown; exiting without waiting for it")
            global abandoned_model_thread
            abandoned_model_thread = True
        Metrics.process_exited(os.getpid())

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.model_dir)
        task = asyncio.create_task(self.reload(reason="sighup", force=True))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _watch(self) -> None:
        # Until a model is loaded, look often: a trainer may export its first step any moment.
        while True:
            interval = self.settings.reload_interval_s
            if self.current is None:
                interval = min(interval or 1.0, 1.0)
            elif interval <= 0:
                return
            await asyncio.sleep(interval)
            await self.reload(reason="watch")

    # --- loading ---------------------------------------------------------------------------------
    def _load(self, path: Path) -> Loaded:
        """In a worker thread: load, verify, and run one prediction before taking traffic."""
        predictor = FillMaskPredictor.from_pretrained(
            path, device=self.device, dtype=DTYPES[self.dtype], cuda_graphs=self.settings.cuda_graphs
        )
        if self.settings.max_input_tokens is not None:
            predictor.max_length = min(predictor.max_length, self.settings.max_input_tokens)
        predictor.predict(f"the {predictor.mask_token} .", top_k=1)
        step = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            step = json.loads((path / MANIFEST).read_text()).get("step")
        return Loaded(predictor, path, step if isinstance(step, int) else None, time.time())

    async def reload(self, *, reason: str, force: bool = False) -> bool:
        """Load the newest export if it differs from the one served (always when `force`); True if swapped."""
        assert self._lock is not None, "start() first"
        async with self._lock:
            try:
                path = resolve_artifact_dir(self.model_dir)
            except ArtifactError as exc:
                if str(exc) != self._waiting_logged or force:  # once per change, not every poll
                    self._waiting_logged = str(exc)
                    if self.current is None:
                        log.info("waiting for a model: %s", exc)
                    else:
                        log.warning("reload (%s) skipped: %s", reason, exc)
                if self.current is None:
                    self.last_error = str(exc)
                return False
            self._waiting_logged = None
            if self.current is not None and not force and path == self.current.path:
                return False
            state = (path, _folder_state(path))
            if not force and self._failed == state:  # the same broken files: already said so
                return False
            try:
                loaded = await asyncio.to_thread(self._load, path)
            except Exception as exc:
                self.last_error = f"loading {path} failed: {exc}"
                self._failed = state
                if isinstance(exc, ArtifactError):  # a broken folder, not a bug: the reason is enough
                    log.error(
                        "loading %s failed (%s): %s; still serving %s; retried when its files change",
                        path,
                        reason,
                        exc,
                        self._describe(),
                    )
                else:
                    log.exception("loading %s failed (%s); still serving %s", path, reason, self._describe())
                if self.current is not None:
                    self.metrics.reloads.labels("failed").inc()
                return False
            self._failed = None
            old, self.current = self.current, loaded  # the swap: one reference, atomic for readers
            self.last_error = None
            if old is not None:
                self.metrics.reloads.labels("ok").inc()
                self.metrics.model_info.labels(*self._labels(old)).set(0)
            self.metrics.model_info.labels(*self._labels(loaded)).set(1)
            log.info("serving %s (step %s) on %s/%s [%s]", path, loaded.step, self.device, self.dtype, reason)
            return True

    def _labels(self, loaded: Loaded) -> tuple[str, str, str, str]:
        return str(loaded.path), str(loaded.step), self.device, self.dtype

    def _describe(self) -> str:
        return "nothing" if self.current is None else str(self.current.path)

    def estimated_time(self) -> float:
        """Seconds until a model is expected: a guess from the weights' size, for clients that wait."""
        try:
            path = resolve_artifact_dir(self.model_dir)
            size = (path / "model.safetensors").stat().st_size
        except (ArtifactError, OSError):
            return max(1.0, self.settings.reload_interval_s)
        expected = 2.0 + size / 200e6  # load + verify at ~200 MB/s, plus a warm-up prediction
        return max(1.0, expected - (time.monotonic() - self.started))

    # --- requests --------------------------------------------------------------------------------
    async def status(self) -> Status:
        loaded = self.current
        if loaded is None:
            return Status(False, last_error=self.last_error, estimated_time=self.estimated_time())
        predictor = loaded.predictor
        config = predictor.model.config
        info = {
            "model": str(loaded.path),
            "model_dir": str(self.model_dir),
            "step": loaded.step,
            "dtype": self.dtype,
            "device": self.device,
            "mask_token": predictor.mask_token,
            "vocab_size": config.vocab_size,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "max_position_embeddings": config.max_position_embeddings,
            "max_input_tokens": predictor.max_length,
            "loaded_at": loaded.loaded_at,
        }
        return Status(True, step=loaded.step, info=info)

    async def mask_token(self) -> str:
        if self.current is None:
            raise not_ready(
                f"the model is not loaded yet ({self.last_error or 'loading'})", self.estimated_time()
            )
        return self.current.predictor.mask_token

    def _serving(self) -> tuple[Loaded, Batcher]:
        loaded, batcher = self.current, self.batcher
        if loaded is None or batcher is None:
            raise not_ready(
                f"the model is not loaded yet ({self.last_error or 'loading'})", self.estimated_time()
            )
        return loaded, batcher

    async def infer(
        self,
        texts: Sequence[str],
        top_k: int,
        targets: list[str] | str | None,
        listed: bool,
        timeout_s: float,
    ) -> tuple[FillMaskFormatter, Path, Items]:
        """Tokenize, queue and run a request's inputs; the model's outputs, or a ServiceError."""
        loaded, batcher = self._serving()
        deadline = time.monotonic() + timeout_s
        group = await encode_request(loaded.predictor.encoder, texts, top_k, targets, listed)
        output = await self._run(loaded, batcher, group, deadline, timeout_s)
        items = list(zip(group.inputs(), output.outputs(), strict=True))
        return loaded.predictor.formatter, loaded.path, items

    def encoding(self) -> tuple[str, int, str]:
        """What a worker needs to tokenize for the served model: its folder, longest input, mask token."""
        loaded, _ = self._serving()
        return str(loaded.path), loaded.predictor.max_length, loaded.predictor.mask_token

    def submit_prepared(
        self, path: str, group: InputGroup
    ) -> tuple[Batcher, list[asyncio.Future[GroupOutput]]] | None:
        """Queue inputs an HTTP worker tokenized for the artifact at `path`: the batcher and the
        futures of their parts (`Batcher.submit`), or None when another artifact is served now (a
        reload swapped it; the worker then tokenizes again, for `encoding()`). A full queue or no
        model raises ServiceError. The caller waits, and on giving up calls
        `batcher.discard(futures)` (the model process answers without a task per request:
        `serve/remote.py`)."""
        loaded, batcher = self._serving()
        if str(loaded.path) != path:
            return None
        return batcher, _submit(loaded, batcher, group)

    async def _run(
        self,
        loaded: Loaded,
        batcher: Batcher,
        group: InputGroup,
        deadline: float,
        timeout_s: float,
    ) -> GroupOutput:
        """Queue the inputs and wait for their outputs until `deadline`; dropped if it passes."""
        futures = _submit(loaded, batcher, group)
        gathered = asyncio.gather(*futures)
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        answered = False
        try:
            outputs = await asyncio.wait_for(gathered, max(0.0, deadline - time.monotonic()))
            answered = True
        except TimeoutError:
            raise timed_out(timeout_s) from None
        finally:
            if not answered:  # timed out, or the client went away: drop the queued inputs
                batcher.discard(futures)
        return GroupOutput.joined(outputs)


def _submit(loaded: Loaded, batcher: Batcher, group: InputGroup) -> list[asyncio.Future[GroupOutput]]:
    """Queue a request's inputs; a full queue is a 429 that says when to come back."""
    try:
        return batcher.submit(loaded.predictor, group)
    except QueueFullError as exc:
        error = ServiceError(429, "queue_full", str(exc))
        error.headers.update(retry_after(exc.retry_after_s))
        raise error from None


def timed_out(timeout_s: float) -> ServiceError:
    error = ServiceError(
        503,
        "timeout",
        f"the request did not finish within {timeout_s:g} s (request_timeout_s) and was abandoned; "
        "send fewer inputs or masks, or retry",
    )
    error.headers["retry-after"] = "1"
    return error


async def encode_request(
    encoder: FillMaskEncoder,
    texts: Sequence[str],
    top_k: int,
    targets: list[str] | str | None,
    listed: bool,
) -> InputGroup:
    """Validate and tokenize a request's inputs: inline for sentences, in a thread for long texts."""
    if sum(map(len, texts)) <= _INLINE_CHARS:
        return _encode(encoder, texts, top_k, targets, listed)
    return await asyncio.to_thread(_encode, encoder, texts, top_k, targets, listed)


def _encode(
    encoder: FillMaskEncoder,
    texts: Sequence[str],
    top_k: int,
    targets: list[str] | str | None,
    listed: bool,
) -> InputGroup:
    """Validate and tokenize every input; the first problem becomes the request's error."""
    target_ids = None
    if targets is not None:
        try:
            target_ids = encoder.target_ids(targets)
        except InputError as exc:
            raise ServiceError(400, "bad_targets", str(exc)) from None
    try:
        return encoder.encode_group(texts, top_k=top_k, target_ids=target_ids)
    except InputError as exc:
        index = getattr(exc, "index", 0)
        where = f"inputs[{index}]: " if listed else ""
        if isinstance(exc, InputTooLongError):
            raise ServiceError(422, "input_too_long", f"{where}{exc}", max_tokens=exc.max_tokens) from None
        if isinstance(exc, InvalidTextError):
            raise ServiceError(422, "invalid_text", f"{where}{exc}") from None
        if isinstance(exc, EmptyInputError):
            raise ServiceError(400, "empty_input", f"{where}{exc}") from None
        raise ServiceError(400, "no_mask", f"{where}{exc}") from None
