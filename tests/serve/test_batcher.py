"""The batcher's passes against the predictor alone: the same answers, in order, on CPU and GPU."""

import asyncio

import numpy as np
import pytest
import torch

from microbert.predict import FillMaskPredictor
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
        futures = [batcher.submit(predictor, predictor.encode(texts)) for texts in requests]
        return [await asyncio.gather(*f) for f in futures]
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
