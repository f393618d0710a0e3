"""The trainer's wrappers around the model: flat parameters and the device-side clipping optimizer."""

from __future__ import annotations

import torch

from microbert.config import get_preset
from microbert.model import BertForMaskedLM
from train.flat import FlatParameters
from train.optim import ClippedAdamW

CONFIG = get_preset("bert-tiny").replace(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (3, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels[0, 0] = 7
    return ids, torch.ones_like(ids), labels


def test_flat_parameters_compute_what_the_model_computes():
    torch.manual_seed(0)
    model = BertForMaskedLM(CONFIG)
    ids, mask, labels = _batch()
    expected = model(ids, mask, labels=labels)
    expected.loss.backward()
    grad_embeddings = model.bert.embeddings.word_embeddings.weight.grad.clone()

    flat = FlatParameters(model)
    assert [name for name, _ in flat.named_parameters()] == ["flat_decay", "flat_no_decay"]
    assert flat.flat_decay.numel() + flat.flat_no_decay.numel() == CONFIG.num_parameters()
    no_decay = {name for name, _ in flat.layout["no_decay"]}
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "cls.predictions.bias" in no_decay
    assert "bert.encoder.layer.0.attention.self.query.weight" not in no_decay
    out = flat(ids, mask, labels=labels)
    assert torch.equal(out.loss, expected.loss)
    out.loss.backward()
    # the tied decoder's gradient lands in the word embeddings' slice, as in the model
    views = dict(
        zip(
            [n for n, _ in flat.layout["decay"]],
            torch.split(flat.flat_decay.grad, [s.numel() for _, s in flat.layout["decay"]]),
            strict=True,
        )
    )
    assert torch.allclose(
        views["bert.embeddings.word_embeddings.weight"].view_as(grad_embeddings), grad_embeddings, atol=1e-6
    )


def test_sync_to_model_exports_the_trained_values():
    torch.manual_seed(0)
    flat = FlatParameters(BertForMaskedLM(CONFIG))
    optimizer = torch.optim.SGD(flat.parameters(), lr=0.5)
    ids, mask, labels = _batch()
    flat(ids, mask, labels=labels).loss.backward()
    optimizer.step()
    model = flat.sync_to_model()
    assert torch.allclose(model(ids, mask, labels=labels).loss, flat(ids, mask, labels=labels).loss)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_clipped_adamw_clips_like_clip_grad_norm():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b, strict=True):
        pa.grad = torch.randn_like(pa) * 10
        pb.grad = pa.grad.clone()
    ours = ClippedAdamW(a, max_grad_norm=1.0, lr=0.1)
    reference = torch.optim.AdamW(b, lr=0.1, weight_decay=0.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
    ours.step()
    reference.step()
    assert torch.allclose(ours.last_grad_norm, expected_norm)
    for pa, pb in zip(a, b, strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    small = [torch.nn.Parameter(torch.ones(3))]
    small[0].grad = torch.full((3,), 0.01)
    ClippedAdamW(small, max_grad_norm=1.0, lr=0.1).step()  # under the limit: gradients untouched
    assert torch.allclose(small[0].grad, torch.full((3,), 0.01))


def test_clipped_adamw_decays_only_the_leading_elements_like_two_adamw_groups():
    torch.manual_seed(0)
    decay, no_decay = torch.randn(12), torch.randn(5)
    ours = [torch.nn.Parameter(decay.clone()), torch.nn.Parameter(no_decay.clone())]
    ref = [torch.nn.Parameter(decay.clone()), torch.nn.Parameter(no_decay.clone())]
    for step in range(3):
        grads = [torch.randn(12) * 0.01, torch.randn(5) * 0.01]
        for p, g in zip(ours + ref, grads + grads, strict=True):
            p.grad = g.clone()
        if step == 0:
            optimizer = ClippedAdamW(ours, max_grad_norm=0.0, weight_decay=0.1, decay_elements=12, lr=0.5)
            reference = torch.optim.AdamW(
                [{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}], lr=0.5
            )
        optimizer.step()
        reference.step()
    for p, r in zip(ours, ref, strict=True):
        assert torch.allclose(p, r, atol=1e-6)


def test_clipped_adamw_finds_the_decay_boundary_in_its_zero_shard():
    # A group of 10 elements split over 2 ranks, 7 decaying: rank 1 holds elements 5..9, decays 5 and 6.
    shard = torch.nn.Parameter(torch.ones(5))
    shard.grad = torch.zeros(5)
    optimizer = ClippedAdamW([shard], max_grad_norm=0.0, weight_decay=0.5, decay_elements=7, lr=1.0)
    optimizer.shard_rank = 1
    optimizer.step()
    assert torch.allclose(shard.detach(), torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0]))
