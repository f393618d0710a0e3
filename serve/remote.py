"""One model process fed by several HTTP processes, over a Unix socket.

On a GPU, N uvicorn workers that each load the model would hold N copies of it and split the
traffic into N small batches that contend for one card. Instead `microbert-serve --workers N`
(with `model_process` on) starts one model process (`python -m serve.remote`) that owns the
`ModelService`: the batch queue across all workers, the forward passes, reloads. The HTTP workers
parse and check requests, tokenize them (with the tokenizer of the artifact the model process
serves), send the token ids, and format the model's outputs into JSON themselves: the per-text and
per-candidate work is spread over the workers' cores, and the model process's one event loop only
queues inputs and answers. (Tokenizing there took half of that loop's time under load.)

A reload changes the artifact: inputs tokenized for another than the one served are refused with
("stale", its folder, longest input, mask token), and the worker tokenizes again for it, so one
tokenizer's ids never meet another's model or strings.

Frames are a 4-byte length and a pickled list of messages, between processes of one server through
a socket in a folder only its user can open. The model process sends the answers that became ready
in one event-loop iteration (every answer of a batch) as one frame per worker (`_Outbox`): one
pickle, one write and one read for all of them. A worker sends each request at once: holding its
requests to the end of an iteration (tens of them, each parsed and tokenized first) would delay the
first by the others' work, and showed no gain where it was measured (bench/NOTES.md, "Serving").
A request's inputs travel as a few flat arrays, not an object per input, and so do its outputs;
each array as its raw bytes (`_raw`), which pickle copies as they are where a numpy array costs
a reduce call: 1 µs a request each way against 15 (measured on 2 cores).
Client → model: ("run", id, folder, inputs, timeout_s), ("cancel", id), ("status", id),
("encoding", id). Model → client: ("ok", id, payload) or ("error", id, (status, error_type,
message, extra, headers)).

The model process keeps no task per request: a "run" queues its inputs at once and its reply is
written by the callback that fires when their outputs are all there (or by the timer of its
deadline). Per-request Python there is what bounds a one-process server, since every worker's
requests meet on its one event loop.
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

import numpy as np

from microbert.predict import (
    FillMaskEncoder,
    FillMaskFormatter,
    GroupOutput,
    InputGroup,
    ModelOutput,
    PreparedInput,
)
from serve.batcher import Batcher
from serve.errors import ServiceError, not_ready
from serve.service import encode_request, timed_out
from serve.settings import Settings

log = logging.getLogger("microbert.serve")

_HEADER = struct.Struct("!I")


def _frame(messages: list[Any]) -> bytes:
    payload = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def _read(reader: asyncio.StreamReader) -> list[Any]:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    messages: list[Any] = pickle.loads(await reader.readexactly(size))
    return messages


# Bytes written to a socket but not yet taken by the other process beyond which that is logged
# (with how many), at most once per `_BACKLOG_LOG_S`: frames waiting there have no deadline yet.
_BACKLOG_BYTES = 1 << 20
_BACKLOG_LOG_S = 5.0


class _Backlog:
    """Watches one writer's buffer: a process that stops reading its socket shows up in the log."""

    def __init__(self, where: str):
        self.where = where
        self.logged_at = -_BACKLOG_LOG_S

    def check(self, writer: asyncio.StreamWriter) -> None:
        size = writer.transport.get_write_buffer_size()
        if size > _BACKLOG_BYTES and time.monotonic() - self.logged_at > _BACKLOG_LOG_S:
            self.logged_at = time.monotonic()
            log.warning("%s: %d bytes written and not yet read by the other process", self.where, size)


class _Outbox:
    """Messages for one socket, written as one frame per event-loop iteration (see the module's doc)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._messages: list[Any] = []
        self._backlog = _Backlog("model process → HTTP worker")

    def send(self, message: Any) -> None:
        if not self._messages:  # the first of this iteration: flush once the iteration's callbacks ran
            asyncio.get_running_loop().call_soon(self._flush)
        self._messages.append(message)

    def _flush(self) -> None:
        messages, self._messages = self._messages, []
        if messages and not self.writer.is_closing():
            self.writer.write(_frame(messages))
            self._backlog.check(self.writer)


def _pack_inputs(group: InputGroup) -> tuple[Any, ...]:
    """A request's inputs as the bytes of their group's four int64 arrays (ids, lengths, mask
    positions, masks per input), with the top_k and targets they share."""
    return (
        group.ids.tobytes(),
        group.lengths.tobytes(),
        group.mask_positions.tobytes(),
        group.mask_counts.tobytes(),
        group.top_k,
        group.target_ids,
    )


def _unpack_inputs(packed: tuple[Any, ...]) -> InputGroup:
    *arrays, top_k, target_ids = packed
    ids, lengths, positions, counts = (np.frombuffer(raw, dtype=np.int64) for raw in arrays)
    return InputGroup(ids, lengths, positions, counts, top_k, target_ids)


def _pack_outputs(output: GroupOutput) -> tuple[Any, ...]:
    """A request's outputs as the bytes of (every mask's float32 scores, their int64 token ids,
    masks per input), and the k they share (the rows are (masks, k))."""
    return (
        np.ascontiguousarray(output.scores, dtype=np.float32).tobytes(),
        np.ascontiguousarray(output.token_ids, dtype=np.int64).tobytes(),
        output.mask_counts.astype(np.int64, copy=False).tobytes(),
        output.scores.shape[1],
    )


def _unpack_outputs(packed: tuple[Any, ...]) -> GroupOutput:
    raw_scores, raw_ids, raw_counts, k = packed
    return GroupOutput(
        np.frombuffer(raw_scores, dtype=np.float32).reshape(-1, k),
        np.frombuffer(raw_ids, dtype=np.int64).reshape(-1, k),
        np.frombuffer(raw_counts, dtype=np.int64),
    )


class _Artifact:
    """What a worker keeps of the artifact being served: its folder, an encoder and a formatter."""

    def __init__(self, path: str, max_length: int, mask_token: str):
        self.path = path
        self.formatter = FillMaskFormatter.from_folder(Path(path))
        self.encoder = FillMaskEncoder(self.formatter.tokenizer, mask_token=mask_token, max_length=max_length)


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
        self._artifact: _Artifact | None = None
        # One build of an artifact's tokenizer and formatter at a time (0.2 s of the GIL and ~12 MiB
        # for a bert-base vocabulary): the requests that find it missing or stale wait for that one.
        self._loading = asyncio.Lock()
        self._mask_token: str | None = None
        self._backlog = _Backlog(f"HTTP worker {os.getpid()} → model process")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="microbert-model-connection")
        with contextlib.suppress(asyncio.TimeoutError):  # the model process may still be starting
            await asyncio.wait_for(self._connected.wait(), 30)
        # Warm: the served artifact's tokenizer now, not under the first requests. A model still
        # loading answers not_ready; the first request then loads it.
        with contextlib.suppress(ServiceError, asyncio.TimeoutError):
            await asyncio.wait_for(self._served(), 30)

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
                    for kind, request_id, payload in await _read(reader):
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
            self._writer.write(_frame([(kind, request_id, *args)]))
            self._backlog.check(self._writer)
            reply_kind, payload = await future
        except asyncio.CancelledError:  # the client went away: the model process drops the inputs
            self._pending.pop(request_id, None)
            if self._writer is not None:
                self._writer.write(_frame([("cancel", request_id)]))
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

    async def _served(self, encoding: tuple[str, int, str] | None = None) -> _Artifact:
        """The artifact the model process serves (asked for when not known or `encoding` differs).

        Built once however many requests ask at once: after a reload every request in flight finds
        its tokenization stale, and under a flood a cold worker has its whole admission limit of
        them; each building its own is what lay behind a worker's loop stalled over 10 s and grown
        by ~2 GB on a GPU host (bench/NOTES.md, session 16)."""
        if encoding is None and self._artifact is not None:
            return self._artifact
        async with self._loading:
            if encoding is None:
                if self._artifact is not None:  # built while this request waited
                    return self._artifact
                encoding = await self._call("encoding")
            path, max_length, mask_token = encoding
            artifact = self._artifact
            if artifact is None or (artifact.path, artifact.encoder.max_length) != (path, max_length):
                # A new artifact: its tokenizer, once (tens of ms, off the event loop), then kept.
                artifact = await asyncio.to_thread(_Artifact, path, max_length, mask_token)
                self._artifact = artifact
            self._mask_token = mask_token
            return artifact

    async def infer(
        self,
        texts: Sequence[str],
        top_k: int,
        targets: list[str] | str | None,
        listed: bool,
        timeout_s: float,
    ) -> tuple[FillMaskFormatter, Path, list[tuple[PreparedInput, ModelOutput]]]:
        artifact = await self._served()
        for _ in range(3):  # a reload between tokenizing and queueing: tokenize again for the new model
            group = await encode_request(artifact.encoder, texts, top_k, targets, listed)
            kind, payload = await self._call("run", artifact.path, _pack_inputs(group), timeout_s)
            if kind == "outputs":
                items = list(zip(group.inputs(), _unpack_outputs(payload).outputs(), strict=True))
                return artifact.formatter, Path(artifact.path), items
            artifact = await self._served(payload)
        raise not_ready("the model was replaced while this request was being tokenized; retry", 1.0)


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
        outbox = _Outbox(writer)
        tasks: dict[int, asyncio.Task[None]] = {}
        runs: dict[int, _Run] = {}
        try:
            while True:
                for kind, request_id, *args in await _read(reader):
                    if kind == "run":
                        self._run(outbox, runs, request_id, *args)
                    elif kind == "cancel":
                        run = runs.get(request_id)
                        if run is not None:
                            run.drop()
                        task = tasks.pop(request_id, None)
                        if task is not None:
                            task.cancel()
                    else:
                        task = asyncio.create_task(self._answer(outbox, kind, request_id))
                        tasks[request_id] = task
                        task.add_done_callback(functools.partial(_forget, tasks, request_id))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for task in list(tasks.values()):
                task.cancel()
            for run in list(runs.values()):
                run.drop()
            self.connections.discard(writer)
            writer.close()

    def _run(
        self,
        outbox: _Outbox,
        runs: dict[int, _Run],
        request_id: int,
        path: str,
        packed: Any,
        timeout_s: float,
    ) -> None:
        """Queue a request's inputs; `_Run` replies when they are done. Refusals reply at once."""
        try:
            submitted = self.service.submit_prepared(path, _unpack_inputs(packed))
            if submitted is None:  # tokenized for an artifact no longer served
                outbox.send(("ok", request_id, ("stale", self.service.encoding())))
                return
        except ServiceError as exc:
            outbox.send(_error(request_id, exc))
            return
        except Exception:
            log.exception("model process: run failed")
            outbox.send(_error(request_id, _internal_error()))
            return
        batcher, futures = submitted
        runs[request_id] = _Run(outbox, runs, request_id, batcher, futures, timeout_s)

    async def _answer(self, outbox: _Outbox, kind: str, request_id: int) -> None:
        try:
            if kind == "status":
                reply: tuple[Any, ...] = ("ok", request_id, await self.service.status())
            elif kind == "encoding":
                reply = ("ok", request_id, self.service.encoding())
            else:
                raise ServiceError(500, "internal_error", f"unknown message {kind!r}")
        except ServiceError as exc:
            reply = _error(request_id, exc)
        except Exception:
            log.exception("model process: %s failed", kind)
            reply = _error(request_id, _internal_error())
        outbox.send(reply)


def _internal_error() -> ServiceError:
    return ServiceError(500, "internal_error", "internal server error")


def _error(request_id: int, exc: ServiceError) -> tuple[Any, ...]:
    return "error", request_id, (exc.status_code, exc.error_type, exc.message, exc.extra, exc.headers)


class _Run:
    """One request's inputs in the batcher: replied to when all their outputs are there, refused
    (503, as `ModelService.infer` does) when `timeout_s` passes first, dropped unanswered when the
    worker cancels it (its client went away)."""

    def __init__(
        self,
        outbox: _Outbox,
        runs: dict[int, _Run],
        request_id: int,
        batcher: Batcher,
        futures: list[asyncio.Future[GroupOutput]],
        timeout_s: float,
    ):
        self.outbox, self.runs, self.request_id = outbox, runs, request_id
        self.batcher, self.futures, self.timeout_s = batcher, futures, timeout_s
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(timeout_s, self._expire)
        self.waiting = len(futures)  # parts not yet answered (most requests are one part)
        for future in futures:
            future.add_done_callback(self._part_done)
        if not futures:
            loop.call_soon(self._reply)

    def _part_done(self, future: asyncio.Future[GroupOutput]) -> None:
        self.waiting -= 1
        # exception() also marks a failure retrieved (no warning); _reply answers it.
        failed = future.cancelled() or future.exception() is not None
        if self.waiting == 0 or failed:
            self._reply()

    def _reply(self) -> None:
        if self.runs.pop(self.request_id, None) is None:  # expired, dropped or answered: handled there
            return
        self.timer.cancel()
        if any(f.cancelled() for f in self.futures):  # the batcher stopped: the process is stopping
            self.batcher.discard(self.futures)
            self.outbox.send(_error(self.request_id, not_ready("the model process is stopping; retry", 1.0)))
        elif any(f.done() and f.exception() is not None for f in self.futures):  # logged by the batcher
            self.batcher.discard(self.futures)
            self.outbox.send(_error(self.request_id, _internal_error()))
        else:
            output = GroupOutput.joined([f.result() for f in self.futures])
            self.outbox.send(("ok", self.request_id, ("outputs", _pack_outputs(output))))

    def _expire(self) -> None:
        if self.runs.pop(self.request_id, None) is not None:
            self.batcher.discard(self.futures)
            self.outbox.send(_error(self.request_id, timed_out(self.timeout_s)))

    def drop(self) -> None:
        if self.runs.pop(self.request_id, None) is not None:
            self.timer.cancel()
            self.batcher.discard(self.futures)


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
