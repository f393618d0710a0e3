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


class _SlowPredictor(FillMaskPredictor):
    """The predictor, with each CPU pass taking at least 30 ms (a fixed cost, as a CPU pass has)."""

    def launch_groups(self, groups):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.03)
        return super().launch_groups(groups)


async def _pass_sizes(predictor: FillMaskPredictor, max_wait_s: float) -> list[int]:
    """One input every 4 ms for 0.6 s (about 8 arrive during each 30 ms pass): the inputs of each pass."""
    metrics = Metrics()
    batcher = Batcher(
        max_batch_size=24, max_batch_tokens=1 << 16, max_wait_s=max_wait_s, max_queue_tokens=1 << 20,
        metrics=metrics,
    )  # fmt: skip
    batcher.start()
    sizes: list[int] = []
    observe = metrics.batch_size.observe
    metrics.batch_size.observe = lambda n: (sizes.append(int(n)), observe(n))[1]  # type: ignore[method-assign]
    try:
        group = predictor.encoder.encode_group([TEXTS[0]])
        futures = []
        for _ in range(150):
            futures += batcher.submit(predictor, group)
            await asyncio.sleep(0.004)
        await asyncio.gather(*futures)
    finally:
        await batcher.stop()
    return sizes


def test_on_a_cpu_a_pass_waits_for_the_inputs_due_after_the_last_one(tiny_artifact):
    """Without the wait, each pass takes what arrived during the one before (~8 here); with it, the
    batcher waits for those due next, up to `max_wait_s`, and passes fill to the batch size."""
    predictor = _SlowPredictor.from_pretrained(tiny_artifact)
    eager = asyncio.run(_pass_sizes(predictor, max_wait_s=0))
    waiting = asyncio.run(_pass_sizes(predictor, max_wait_s=0.2))
    assert sum(eager) == sum(waiting) == 150
    assert np.median(eager[2:]) <= 12  # pass after pass, what came meanwhile
    assert np.median(waiting[2:]) >= 20  # near the batch size of 24
