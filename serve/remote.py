"""One model process fed by several HTTP processes, over a Unix socket.

On a GPU, N uvicorn workers that each load the model would hold N copies of it and split the
traffic into N small batches that contend for one card. Instead `microbert-serve --workers N`
(with `model_process` on) starts one model process (`python -m serve.remote`) that owns the
`ModelService`: tokenizing (in `tokenizers`' Rust threads), the batch queue across all workers,
the forward passes, reloads. The HTTP workers parse and check requests, send the texts, and format
the model's outputs into JSON themselves, with a formatter for the artifact named in each reply (so
a reload never pairs one tokenizer's ids with another's strings), which spreads the per-candidate
work over the workers' cores.

Frames are a 4-byte length and a pickle, between processes of one server through a socket in a
folder only its user can open. Client → model: ("infer", id, texts, top_k, targets, listed,
timeout_s), ("cancel", id), ("status", id). Model → client: ("ok", id, payload) or
("error", id, (status, error_type, message, extra, headers)).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microbert.predict import FillMaskFormatter, ModelOutput, PreparedInput
from serve.errors import ServiceError, not_ready
from serve.settings import Settings

log = logging.getLogger("microbert.serve")

_HEADER = struct.Struct("!I")


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def _read(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


def _pack_items(items: Sequence[tuple[PreparedInput, ModelOutput]]) -> list[tuple[Any, ...]]:
    return [(p.ids, p.mask_positions, p.top_k, p.target_ids, o.scores, o.token_ids) for p, o in items]


def _unpack_items(packed: list[tuple[Any, ...]]) -> list[tuple[PreparedInput, ModelOutput]]:
    return [
        (PreparedInput(ids, positions, top_k, targets), ModelOutput(scores, token_ids))
        for ids, positions, top_k, targets, scores, token_ids in packed
    ]


class RemoteModel:
    """The `Backend` of an HTTP worker: the model lives in the model process at `settings.model_socket`."""

    def __init__(self, settings: Settings):
        assert settings.model_socket is not None
        self.settings = settings
        self.path = settings.model_socket
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._formatters: dict[str, FillMaskFormatter] = {}
        self._mask_token: str | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="microbert-model-connection")
        with contextlib.suppress(asyncio.TimeoutError):  # the model process may still be starting
            await asyncio.wait_for(self._connected.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def _run(self) -> None:
        """Keep one connection to the model process; replies resolve the waiting requests' futures."""
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self._connected.set()
            try:
                while True:
                    kind, request_id, payload = await _read(reader)
                    future = self._pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result((kind, payload))
            except (OSError, asyncio.IncompleteReadError) as exc:
                log.warning("lost the model process (%s); reconnecting", exc)
            finally:
                self._connected.clear()
                self._writer.close()
                self._writer = None
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(
                            ("error", (503, "not_ready", "the model process restarted", {}, {}))
                        )
                self._pending.clear()

    async def _call(self, kind: str, *args: Any) -> Any:
        if self._writer is None:
            raise not_ready("the model process is not reachable yet", 1.0)
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(_frame((kind, request_id, *args)))
            reply_kind, payload = await future
        except asyncio.CancelledError:  # the client went away: the model process drops the inputs
            self._pending.pop(request_id, None)
            if self._writer is not None:
                self._writer.write(_frame(("cancel", request_id)))
            raise
        if reply_kind == "error":
            status, error_type, message, extra, headers = payload
            error = ServiceError(status, error_type, message, **extra)
            error.headers.update(headers)
            raise error
        return payload

    async def status(self) -> Any:
        status = await self._call("status")
        if status.info is not None:
            self._mask_token = status.info["mask_token"]
        return status

    async def mask_token(self) -> str:
        if self._mask_token is None:
            status = await self.status()
            if not status.ready:
                raise not_ready(f"the model is not loaded yet ({status.last_error or 'loading'})", 1.0)
        assert self._mask_token is not None
        return self._mask_token

    def _formatter(self, path: str) -> FillMaskFormatter:
        formatter = self._formatters.get(path)
        if formatter is None:  # a new artifact: its tokenizer, once (a few ms), then cached
            formatter = FillMaskFormatter.from_folder(Path(path))
            self._formatters = {**dict(list(self._formatters.items())[-1:]), path: formatter}
        return formatter

    async def infer(
        self,
        texts: Sequence[str],
        top_k: int,
        targets: list[str] | str | None,
        listed: bool,
        timeout_s: float,
    ) -> tuple[FillMaskFormatter, Path, list[tuple[PreparedInput, ModelOutput]]]:
        path, packed = await self._call("infer", list(texts), top_k, targets, listed, timeout_s)
        return self._formatter(path), Path(path), _unpack_items(packed)


def _forget(tasks: dict[int, asyncio.Task[None]], request_id: int, _: object) -> None:
    tasks.pop(request_id, None)


class ModelServer:
    """The model process's side: requests from every HTTP worker go to one `ModelService`."""

    def __init__(self, service: Any, path: str):
        self.service = service
        self.path = path
        self.connections: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    async def close(self, timeout_s: float) -> None:
        """Stop accepting; wait (bounded) for the HTTP workers to finish and disconnect."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        tasks: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                kind, request_id, *args = await _read(reader)
                if kind == "cancel":
                    task = tasks.pop(request_id, None)
                    if task is not None:
                        task.cancel()
                    continue
                task = asyncio.create_task(self._answer(writer, kind, request_id, args))
                tasks[request_id] = task
                task.add_done_callback(functools.partial(_forget, tasks, request_id))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for task in list(tasks.values()):
                task.cancel()
            self.connections.discard(writer)
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, kind: str, request_id: int, args: list[Any]
    ) -> None:
        try:
            if kind == "status":
                reply: tuple[Any, ...] = ("ok", request_id, await self.service.status())
            elif kind == "infer":
                _, path, items = await self.service.infer(*args)
                reply = ("ok", request_id, (str(path), _pack_items(items)))
            else:
                raise ServiceError(500, "internal_error", f"unknown message {kind!r}")
        except ServiceError as exc:
            reply = (
                "error",
                request_id,
                (exc.status_code, exc.error_type, exc.message, exc.extra, exc.headers),
            )
        except Exception:
            log.exception("model process: %s failed", kind)
            reply = ("error", request_id, (500, "internal_error", "internal server error", {}, {}))
        if not writer.is_closing():
            writer.write(_frame(reply))


async def _main_async(settings: Settings) -> None:
    from serve.metrics import Metrics
    from serve.service import ModelService, settle_heap

    assert settings.model_socket is not None
    service = ModelService(settings, Metrics())
    await service.start()
    settle_heap()
    server = ModelServer(service, settings.model_socket)
    await server.start()
    log.info("model process %d listening on %s", os.getpid(), settings.model_socket)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    # The HTTP workers finish their in-flight requests first (they disconnect when done).
    await server.close(settings.shutdown_timeout_s)
    await service.stop()


def main() -> int:
    """`python -m serve.remote`: the model process that `microbert-serve` starts; settings from the env."""
    logging.basicConfig(
        level=os.environ.get("MICROBERT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings()
    if settings.model_socket is None:
        print("serve.remote: MICROBERT_MODEL_SOCKET is not set (microbert-serve sets it)", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_main_async(settings))
    return 0


def _loop_factory() -> Any:
    """uvloop's event loop when it is installed (uvicorn's HTTP workers use it too): the model
    process answers every worker's frames on one loop, where the stdlib loop's socket writes cost
    a tenth of its time (py-spy, 2 workers under wrk)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
