"""The model process's side of `serve/remote.py`, over a real Unix socket to a real `ModelService`.

What the HTTP-level test (`test_server.py`) cannot pin down: several messages in one frame, replies
of one iteration in one frame, a request that overruns its deadline, one that its worker cancels.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microbert.predict import FillMaskPredictor, GroupOutput, InputGroup
from serve import remote
from serve.metrics import Metrics
from serve.remote import (
    ModelServer,
    RemoteModel,
    _frame,
    _pack_inputs,
    _pack_outputs,
    _read,
    _unpack_inputs,
    _unpack_outputs,
)
from serve.service import ModelService
from tests.serve.conftest import add_step, make_settings

TEXTS = ["the king [MASK] the land .", "a [MASK] day and a [MASK] night", "[MASK] ."]


def _same_inputs(a: InputGroup, b: InputGroup) -> None:
    for name in ("ids", "lengths", "mask_positions", "mask_counts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.top_k, a.target_ids) == (b.top_k, b.target_ids)


def test_inputs_and_outputs_travel_as_raw_bytes_and_come_back_the_same(tiny_artifact: Path) -> None:
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact)
    encoder = predictor.encoder
    for target_ids in (None, (5, 9)):
        group = encoder.encode_group(TEXTS * 20, top_k=3, target_ids=target_ids)  # the batch path
        _same_inputs(_unpack_inputs(_pack_inputs(group)), group)
    group = encoder.encode_group(TEXTS, top_k=4)  # the few-texts path
    _same_inputs(_unpack_inputs(_pack_inputs(group)), group)
    one = encoder.encode_group([TEXTS[1]], top_k=2, target_ids=(5,))  # a single-sentence request
    _same_inputs(_unpack_inputs(_pack_inputs(one)), one)
    (alone,) = predictor.collect_groups(predictor.launch_groups([one]))
    back_alone = _unpack_outputs(_pack_outputs(alone))
    assert back_alone.scores.shape == (2, 1) and back_alone.outputs()[0].scores.shape == (2, 1)
    (output,) = predictor.collect_groups(predictor.launch_groups([group]))
    back = _unpack_outputs(_pack_outputs(output)).outputs()
    assert [o.scores.shape for o in back] == [(1, 4), (2, 4), (1, 4)]
    for x, y in zip(back, predictor.run(group.inputs()), strict=True):
        assert np.array_equal(x.scores, y.scores) and np.array_equal(x.token_ids, y.token_ids)
    # What a frame pickles is bytes and numbers (pickle copies bytes as they are): no numpy objects.
    for packed in (_pack_inputs(group), _pack_inputs(one), _pack_outputs(output), _pack_outputs(alone)):
        assert not any(isinstance(part, np.ndarray) for part in packed)


class _Client:
    """The worker's end of the socket, by hand: frames in, frames out, nothing coalesced for us."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def send(self, *messages: tuple[Any, ...]) -> None:
        self.writer.write(_frame(list(messages)))

    async def replies(self, count: int, timeout_s: float = 30) -> tuple[dict[int, Any], int]:
        """`count` replies by request id, and how many frames brought them."""
        replies: dict[int, Any] = {}
        frames = 0
        while len(replies) < count:
            frame = await asyncio.wait_for(_read(self.reader), timeout_s)
            frames += 1
            for kind, request_id, payload in frame:
                replies[request_id] = (kind, payload)
        return replies, frames


async def _with_server(tmp_path: Path, artifact: Path, body: Any, **settings: Any) -> None:
    service = ModelService(make_settings(artifact, **settings), Metrics())
    await service.start()
    server = ModelServer(service, str(tmp_path / "model.sock"))
    await server.start()
    reader, writer = await asyncio.open_unix_connection(server.path)
    try:
        await body(service, _Client(reader, writer))
    finally:
        writer.close()
        await server.close(1.0)
        await service.stop()


def test_runs_in_one_frame_are_answered_in_one_frame(tmp_path: Path, tiny_artifact: Path) -> None:
    expected = FillMaskPredictor.from_pretrained(tiny_artifact)

    async def body(service: ModelService, client: _Client) -> None:
        path, _, _ = service.encoding()
        prepared = [expected.encoder.encode_group([text], top_k=2) for text in TEXTS]
        client.send(*[("run", i, path, _pack_inputs(p), 30.0) for i, p in enumerate(prepared)])
        replies, frames = await client.replies(len(TEXTS))
        assert frames == 1  # one batch, answered in one loop iteration, one frame
        for i, p in enumerate(prepared):
            kind, (what, packed) = replies[i]
            assert (kind, what) == ("ok", "outputs")
            (got,) = _unpack_outputs(packed).outputs()
            (want,) = expected.run(p.inputs())
            assert np.array_equal(got.token_ids, want.token_ids)
            assert np.allclose(got.scores, want.scores, atol=1e-6)

    asyncio.run(_with_server(tmp_path, tiny_artifact, body))


def test_stale_inputs_and_a_full_queue_are_answered_at_once(tmp_path: Path, tiny_artifact: Path) -> None:
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact)

    async def body(service: ModelService, client: _Client) -> None:
        path, _, _ = service.encoding()
        one = _pack_inputs(predictor.encoder.encode_group([TEXTS[0]]))
        many = _pack_inputs(predictor.encoder.encode_group(TEXTS * 30))
        # The first fills the small queue (an empty queue takes any request); the second is refused.
        client.send(
            ("run", 1, "/elsewhere", one, 30.0), ("run", 2, path, many, 30.0), ("run", 3, path, many, 30.0)
        )
        replies, _ = await client.replies(3)
        assert replies[1] == ("ok", ("stale", service.encoding()))
        assert replies[2][1][0] == "outputs"
        kind, (status, error_type, _, _, headers) = replies[3]
        assert (kind, status, error_type) == ("error", 429, "queue_full") and int(headers["retry-after"]) >= 1

    asyncio.run(_with_server(tmp_path, tiny_artifact, body, max_queue=64))


def test_a_run_past_its_deadline_is_refused_and_a_cancelled_one_is_dropped(
    tmp_path: Path, tiny_artifact: Path
) -> None:
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact)

    async def body(service: ModelService, client: _Client) -> None:
        path, _, _ = service.encoding()
        packed = _pack_inputs(predictor.encoder.encode_group(TEXTS * 10))
        client.send(("run", 1, path, packed, 1e-9), ("run", 2, path, packed, 30.0), ("cancel", 2))
        client.send(("status", 3))
        replies, _ = await client.replies(2)
        kind, (status, error_type, *_) = replies[1]
        assert (kind, status, error_type) == ("error", 503, "timeout")
        assert replies[3][0] == "ok" and replies[3][1].ready
        assert 2 not in replies  # cancelled: no answer, and its inputs left the queue
        await asyncio.sleep(0.2)
        assert service.batcher is not None and service.batcher.depth == 0
        client.send(("status", 4))
        replies, _ = await client.replies(1)
        assert set(replies) == {4}  # nothing late for request 2 either

    asyncio.run(_with_server(tmp_path, tiny_artifact, body))


def test_runs_queued_when_the_model_stops_are_told_to_retry(tmp_path: Path, tiny_artifact: Path) -> None:
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact)

    async def body(service: ModelService, client: _Client) -> None:
        path, _, _ = service.encoding()
        packed = _pack_inputs(predictor.encoder.encode_group(TEXTS * 40))
        client.send(*[("run", i, path, packed, 30.0) for i in range(4)])
        await asyncio.sleep(0)  # read and queued, not yet run
        while service.batcher is not None and service.batcher.depth == 0:
            await asyncio.sleep(0.001)
        assert service.batcher is not None
        await service.batcher.stop(timeout_s=0)  # what a stopping model process does to the rest
        replies, _ = await client.replies(4)
        answers = [kind if kind == "ok" else payload[:2] for kind, payload in replies.values()]
        assert (503, "not_ready") in answers  # the queued ones: retry, not a hang or a 500
        assert set(answers) <= {"ok", (503, "not_ready")}

    asyncio.run(_with_server(tmp_path, tiny_artifact, body))


def test_a_frame_is_a_length_and_a_list_of_messages() -> None:
    frame = _frame([("status", 1), ("cancel", 2)])
    (size,) = struct.unpack("!I", frame[:4])
    assert size == len(frame) - 4

    async def read() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(frame)
        reader.feed_eof()
        return await _read(reader)

    assert asyncio.run(read()) == [("status", 1), ("cancel", 2)]


@pytest.mark.parametrize("masks", [[1, 1], [2, 0, 3], [4]])
def test_outputs_of_inputs_with_several_or_no_masks_split_back(masks: list[int]) -> None:
    rng = np.random.default_rng(0)
    parts = [
        GroupOutput(
            rng.random((m, 3), dtype=np.float32), rng.integers(0, 100, (m, 3)), np.array([m], dtype=np.int64)
        )
        for m in masks
    ]
    joined = GroupOutput.joined(parts)  # as a request cut into parts is answered
    back = _unpack_outputs(_pack_outputs(joined)).outputs()
    assert [len(o.scores) for o in back] == masks
    for x, y in zip(back, parts, strict=True):
        assert np.array_equal(x.scores, y.scores) and np.array_equal(x.token_ids, y.token_ids)


def test_a_worker_loads_each_served_artifact_once_however_many_requests_ask(
    tmp_path: Path, run_dir: Path, tiny_tokenizer: Any, tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP worker's tokenizer and formatter for the served artifact are built once: at start
    when the model is ready, and after a reload by the first request that finds it stale, while
    the others wait for that one. Each request building its own (a bert-base vocabulary: 0.2 s of
    the GIL and ~12 MiB) is what lay behind a worker's loop stalled over 10 s and grown by ~2 GB
    when a flood's first burst found it cold (bench/NOTES.md, session 16)."""
    built: list[str] = []

    class CountedArtifact(remote._Artifact):
        def __init__(self, path: str, max_length: int, mask_token: str):
            built.append(path)
            super().__init__(path, max_length, mask_token)

    monkeypatch.setattr(remote, "_Artifact", CountedArtifact)

    async def flood(model: RemoteModel) -> list[Any]:
        return await asyncio.gather(
            *(model.infer([TEXTS[0]], 2, None, False, 30.0) for _ in range(16)), return_exceptions=True
        )

    async def main() -> None:
        service = ModelService(make_settings(run_dir), Metrics())
        await service.start()
        server = ModelServer(service, str(tmp_path / "model.sock"))
        await server.start()
        model = RemoteModel(make_settings(run_dir, model_socket=server.path))
        try:
            await model.start()
            assert [Path(p).name for p in built] == ["step-7"]  # warm before the first request
            answers = await flood(model)
            assert all(not isinstance(a, BaseException) for a in answers), answers
            add_step(run_dir, tiny_tokenizer, tiny_config, step=8, seed=8)
            assert await service.reload(reason="test")
            answers = await flood(model)  # each finds its tokenization stale; one loads step 8
            assert all(not isinstance(a, BaseException) for a in answers), answers
            assert {Path(path).name for _, path, _ in answers} == {"step-8"}
            assert [Path(p).name for p in built] == ["step-7", "step-8"]
        finally:
            await model.stop()
            await server.close(1.0)
            await service.stop()

    asyncio.run(main())
