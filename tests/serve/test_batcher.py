"""The batcher's passes against the predictor alone: the same answers, in order, on CPU and GPU."""

import asyncio

import numpy as np
import pytest
import torch

from microbert.predict import FillMaskPredictor, GroupOutput
from serve.batcher import Batcher
from serve.metrics import Metrics

TEXTS = [
    "To be or not to [MASK], that is the question.",
    "The king is dead, long live the [MASK]!",
    "I [MASK] thee, good [MASK], of thy love.",
    "Friends, Romans, countrymen, lend me your [MASK]; I come to bury Caesar.",
]


async def _answers(predictor: FillMaskPredictor, requests: list[list[str]]) -> list[list]:
    """Every request submitted while the previous passes are in flight (batches of 2 inputs)."""
    batcher = Batcher(
        max_batch_size=2, max_batch_tokens=4096, max_wait_s=0, max_queue_tokens=1 << 20, metrics=Metrics()
    )
    batcher.start()
    try:
        futures = [batcher.submit(predictor, predictor.encoder.encode_group(texts)) for texts in requests]
        return [GroupOutput.joined(await asyncio.gather(*f)).outputs() for f in futures]
    finally:
        await batcher.stop()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_pipelined_passes_give_each_input_its_own_answer(tiny_artifact, device):
    """On a GPU a pass is launched before the previous one is collected (CUDA graphs replay into
    the same buffers): every input must still get the answer the predictor gives it alone."""
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact, device=device)
    requests = [[TEXTS[i % 4], TEXTS[(i + 1) % 4]] for i in range(12)]
    got = asyncio.run(_answers(predictor, requests))
    for texts, outputs in zip(requests, got, strict=True):
        for want, out in zip(predictor.run(predictor.encode(texts)), outputs, strict=True):
            assert np.array_equal(want.token_ids, out.token_ids)
            assert np.allclose(want.scores, out.scores, atol=1e-6)


def test_a_request_larger_than_a_pass_is_cut_into_parts_and_counted_by_its_inputs(tiny_artifact):
    """A request is one entry of the queue however many inputs it has; one that exceeds a pass (5
    inputs, passes of 2) goes in parts, each answered as the predictor answers it alone, and the
    queue's depth and the batch-size metric count inputs."""
    predictor = FillMaskPredictor.from_pretrained(tiny_artifact)
    texts = [TEXTS[i % 4] for i in range(5)]
    metrics = Metrics()

    async def run() -> tuple[list, int, int]:
        batcher = Batcher(
            max_batch_size=2, max_batch_tokens=4096, max_wait_s=0, max_queue_tokens=1 << 20, metrics=metrics
        )
        futures = batcher.submit(predictor, predictor.encoder.encode_group(texts))
        parts, depth = len(futures), batcher.depth
        batcher.start()
        try:
            return GroupOutput.joined(await asyncio.gather(*futures)).outputs(), parts, depth
        finally:
            await batcher.stop()

    outputs, parts, depth = asyncio.run(run())
    assert (parts, depth) == (3, 5)
    for want, out in zip(predictor.run(predictor.encode(texts)), outputs, strict=True):
        assert np.array_equal(want.token_ids, out.token_ids)
        assert np.allclose(want.scores, out.scores, atol=1e-6)
    batch_sizes = metrics.batch_size.collect()[0].samples
    assert next(s.value for s in batch_sizes if s.name.endswith("_sum")) == 5
