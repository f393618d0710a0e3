"""The model being served, its loading and its reloading without downtime.

A reload loads the new export beside the running one (in a thread, so requests keep flowing),
verifies it (manifest checksums, then one real prediction) and swaps a single reference. Requests
already tokenized keep the predictor they were tokenized with until their batch runs, so nothing
fails during the swap; the old model is freed when its last batch is done. A run folder's
`export/latest` is polled every `reload_interval_s`; SIGHUP reloads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from microbert.checkpoint import MANIFEST, resolve_artifact_dir
from microbert.errors import ArtifactError, ConfigError
from microbert.predict import FillMaskPredictor
from serve.batcher import Batcher
from serve.metrics import Metrics
from serve.settings import Settings

log = logging.getLogger("microbert.serve")

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


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics):
        if settings.model_dir is None:
            raise ConfigError("no model to serve: pass --model-dir or set MICROBERT_MODEL_DIR")
        self.settings = settings
        self.model_dir: Path = settings.model_dir
        self.metrics = metrics
        self.device, self.dtype = resolve_device(settings.device, settings.dtype)
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.started = time.monotonic()
        self.batcher: Batcher | None = None
        self._lock: asyncio.Lock | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reload_tasks: set[asyncio.Task[bool]] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model if there is an export (before serving), start batching and the reload watch."""
        self._lock = asyncio.Lock()
        s = self.settings
        self.batcher = Batcher(
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_s=s.max_wait_ms / 1000,
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
        if self.batcher is not None:
            await self.batcher.stop()
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
        predictor = FillMaskPredictor.from_pretrained(path, device=self.device, dtype=DTYPES[self.dtype])
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
                if self.current is None:
                    self.last_error = str(exc)
                    log.info("waiting for a model: %s", exc)
                else:
                    log.warning("reload (%s) skipped: %s", reason, exc)
                return False
            if self.current is not None and not force and path == self.current.path:
                return False
            try:
                loaded = await asyncio.to_thread(self._load, path)
            except Exception as exc:
                self.last_error = f"loading {path} failed: {exc}"
                log.exception("loading %s failed (%s); still serving %s", path, reason, self._describe())
                if self.current is not None:
                    self.metrics.reloads.labels("failed").inc()
                return False
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
