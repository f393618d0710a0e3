"""The model against transformers' BertForMaskedLM on the same weights (fp32, 1e-4)."""

import numpy as np
import pytest
import torch

from microbert.checkpoint import load_state_dict
from microbert.config import SINUSOIDAL_POSITION_STD, ModelConfig, resolve_position_init
from microbert.model import (
    IGNORE_INDEX,
    BertForMaskedLM,
    count_parameters,
    init_output_bias_unigram,
    init_position_embeddings,
    init_weights,
    scale_residual_branches,
)

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _pair(config: ModelConfig = CONFIG):
    torch.manual_seed(0)
    ours = BertForMaskedLM(config).eval()
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config.to_dict())).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing)
    return ours, hf


def _batch():
    torch.manual_seed(1)
    input_ids = torch.randint(5, 99, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 12:] = 0  # unequal lengths: padded rows
    attention_mask[2, 5:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 10:] = 1
    return input_ids, attention_mask, token_type_ids


def test_state_dict_keys_map_one_to_one_onto_transformers():
    ours, hf = _pair()
    hf_keys = {k for k in hf.state_dict() if "position_ids" not in k and "token_type_ids" not in k}
    assert set(ours.state_dict()) == hf_keys


def test_logits_match_transformers_on_padded_batches():
    ours, hf = _pair()
    input_ids, attention_mask, token_type_ids = _batch()
    with torch.no_grad():
        expected = hf(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        got = ours(input_ids, attention_mask, token_type_ids).logits
    real = attention_mask.bool()
    assert (expected - got)[real].abs().max() < 1e-4


def test_loss_on_masked_positions_matches_transformers():
    ours, hf = _pair()
    input_ids, attention_mask, _ = _batch()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[2, 1] = 17, 42, 5
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        out = ours(input_ids, attention_mask, labels=labels)
    assert out.logits.shape == (3, CONFIG.vocab_size)  # head ran on the 3 masked positions only
    assert int(out.num_masked) == 3
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_positions_restrict_the_head():
    ours, _ = _pair()
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        full = ours(input_ids, attention_mask).logits
        rows, cols = torch.tensor([0, 2]), torch.tensor([4, 1])
        some = ours(input_ids, attention_mask, positions=(rows, cols)).logits
    assert torch.allclose(some, full[rows, cols], atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_positions_match_transformers_with_the_last_layer_on_those_rows_only(layers):
    """The last layer runs its queries, projection and feed-forward on the asked positions alone
    (every position still a key and a value): the logits are transformers' at those positions, for
    any number of positions per row, rows asked twice or not at all, padded rows, and a mask."""
    config = ModelConfig(**{**CONFIG.to_dict(), "num_hidden_layers": layers})
    ours, hf = _pair(config)
    input_ids, attention_mask, token_type_ids = _batch()
    rows, cols = torch.tensor([0, 0, 0, 2, 2]), torch.tensor([0, 9, 19, 1, 4])  # row 1 not asked
    seen: list[int] = []
    last = ours.bert.encoder.layer[-1].intermediate.dense
    handle = last.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    with torch.no_grad():
        want = hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        got = ours(input_ids, attention_mask, token_type_ids, positions=(rows, cols)).logits
        chosen = torch.zeros_like(attention_mask, dtype=torch.bool)
        chosen[rows, cols] = True
        by_mask = ours(input_ids, attention_mask, token_type_ids, positions=chosen).logits
    handle.remove()
    assert seen == [5, 5]  # (M, d) in the last layer's feed-forward, never (B, T, d)
    assert (got - want[rows, cols]).abs().max() < 1e-4
    assert torch.equal(by_mask, got)  # a boolean mask is the same positions, row-major


def test_gradients_flow_and_decoder_stays_tied():
    ours, _ = _pair()
    ours.train()
    input_ids, attention_mask, _ = _batch()
    labels = torch.where(torch.rand(input_ids.shape) < 0.3, input_ids, IGNORE_INDEX)
    labels[0, 1] = 7
    ours(input_ids, attention_mask, labels=labels).loss.backward()
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_initialisation_is_bert_style():
    torch.manual_seed(0)
    model = BertForMaskedLM(
        ModelConfig(
            vocab_size=5000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
        )
    )
    std = model.bert.embeddings.word_embeddings.weight[1:].std().item()
    assert abs(std - 0.02) < 0.002
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0)  # padding row
    assert torch.all(model.bert.encoder.layer[0].attention.self.query.bias == 0)
    assert count_parameters(model) == model.config.num_parameters()


def test_transformers_weights_load_into_microbert():
    torch.manual_seed(5)
    hf2 = transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG.to_dict())).eval()
    fresh = BertForMaskedLM(CONFIG).eval()
    load_state_dict(fresh, hf2.state_dict(), source="test")
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        assert (
            fresh(input_ids, attention_mask).logits
            - hf2(input_ids=input_ids, attention_mask=attention_mask).logits
        )[attention_mask.bool()].abs().max() < 1e-4


def test_fixed_slot_head_gives_the_exact_loss_and_gradients():
    ours, _ = _pair()
    input_ids, attention_mask, _ = _batch()
    torch.manual_seed(2)
    labels = torch.where(torch.rand(input_ids.shape) < 0.2, input_ids, IGNORE_INDEX)
    labels[attention_mask == 0] = IGNORE_INDEX
    masked = int((labels != IGNORE_INDEX).sum())
    exact = ours(input_ids, attention_mask, labels=labels)
    exact.loss.backward()
    expected_grad = ours.bert.embeddings.word_embeddings.weight.grad.clone()
    ours.zero_grad()
    fixed = ours(input_ids, attention_mask, labels=labels, masked_slots=masked + 5)
    fixed.loss.backward()
    assert fixed.logits.shape == (masked + 5, CONFIG.vocab_size)
    assert int(fixed.num_masked) == int(exact.num_masked) == masked
    assert torch.allclose(fixed.loss, exact.loss, atol=1e-6)
    assert torch.allclose(ours.bert.embeddings.word_embeddings.weight.grad, expected_grad, atol=1e-6)


def test_too_few_slots_are_visible_in_num_masked():
    ours, _ = _pair()
    input_ids, attention_mask, _ = _batch()
    labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
    out = ours(input_ids, attention_mask, labels=labels, masked_slots=4)
    assert out.logits.shape[0] == 4
    assert int(out.num_masked) == int(attention_mask.sum()) > 4  # the caller can see the overflow


def test_masked_slots_for():
    from microbert.model import masked_slots_for

    slots = masked_slots_for(256 * 128, 0.15)
    assert slots % 64 == 0
    assert 0.15 * 256 * 128 + 6.5 * (256 * 128 * 0.15 * 0.85) ** 0.5 < slots < 0.17 * 256 * 128
    assert masked_slots_for(8, 0.5) == 8  # never more than the batch


@pytest.mark.parametrize("out_features", [30522, 64, 7])
def test_aligned_linear_equals_linear(out_features):
    from microbert.model import aligned_linear

    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, requires_grad=True)
    weight = torch.randn(out_features, 16, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True)
    got = aligned_linear(x, weight, bias)
    want = torch.nn.functional.linear(x, weight, bias)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, weight, bias), upstream)
    expected = torch.autograd.grad(want, (x, weight, bias), upstream)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_head_pads_the_vocabulary_matmul_and_matches_the_cpu():
    """On a GPU the head pads its 30,522-wide matmul to 30,528 (`aligned_linear`); same numbers."""
    torch.backends.cuda.matmul.allow_tf32 = False
    config = ModelConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    cpu = BertForMaskedLM(config).eval()
    gpu = BertForMaskedLM(config).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    input_ids = torch.randint(5, config.vocab_size, (4, 32))
    labels = torch.where(torch.rand(input_ids.shape) < 0.15, input_ids, IGNORE_INDEX)
    mask = input_ids % 3 == 0
    with torch.no_grad():
        want = cpu(input_ids, positions=mask).logits
        got = gpu(input_ids.cuda(), positions=mask.cuda()).logits
        assert got.shape == want.shape == (int(mask.sum()), config.vocab_size)
        assert (got.cpu() - want).abs().max() < 1e-4
        slots = int((labels != IGNORE_INDEX).sum()) + 7
        want_loss = cpu(input_ids, labels=labels).loss
        got_loss = gpu(input_ids.cuda(), labels=labels.cuda(), masked_slots=slots).loss
        assert abs(float(got_loss) - float(want_loss)) < 1e-4


def _twins() -> tuple[BertForMaskedLM, BertForMaskedLM]:
    """Two models with the same initial weights: one to keep, one to re-initialise."""
    torch.manual_seed(0)
    plain = BertForMaskedLM(CONFIG)
    torch.manual_seed(0)
    return plain, BertForMaskedLM(CONFIG)


def test_sinusoidal_position_init_has_the_recorded_scale_and_no_other_weight_changes():
    plain, model = _twins()
    init_position_embeddings(model, "sinusoidal")
    pos = model.bert.embeddings.position_embeddings.weight
    assert float(pos.square().mean().sqrt()) == pytest.approx(SINUSOIDAL_POSITION_STD, rel=1e-4)
    # neighbouring positions are alike, far ones are not: the order signal attention starts from
    similarity = torch.nn.functional.cosine_similarity(pos[:1], pos, dim=-1)
    assert similarity[1] > 0.8 > similarity[32]
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        if "position_embeddings" not in name:
            assert torch.equal(a, b), name


def test_normal_position_init_is_berts_and_auto_picks_by_width():
    plain, model = _twins()
    init_position_embeddings(model, "normal")
    assert torch.equal(model.state_dict()["bert.embeddings.position_embeddings.weight"],
                       plain.state_dict()["bert.embeddings.position_embeddings.weight"])  # fmt: skip
    assert resolve_position_init("auto", 128) == "sinusoidal"
    assert resolve_position_init("auto", 256) == "sinusoidal"
    assert resolve_position_init("auto", 768) == "normal"
    assert resolve_position_init("normal", 128) == "normal"
    with pytest.raises(ValueError, match="choose one of auto, sinusoidal, normal"):
        init_position_embeddings(model, "rotary")


def test_scaled_residual_init_changes_only_the_weights_that_end_each_branch():
    plain, model = _twins()
    scale_residual_branches(model, 0.25)
    ends = {
        f"bert.encoder.layer.{i}.{part}.dense.weight"
        for i in range(2)
        for part in ("attention.output", "output")
    }
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        if name in ends:
            assert torch.allclose(b, a * 0.25), name
        else:
            assert torch.equal(a, b), name


def test_unigram_bias_follows_token_frequency_and_specials_get_the_least():
    _, model = _twins()
    rows = np.array([[2, 7, 7, 7, 9, 0], [2, 7, 9, 11, 3, 0]], dtype=np.uint16)  # 0 pad, 2 CLS, 3 SEP
    init_output_bias_unigram(model, rows, special_ids=[0, 1, 2, 3, 4])
    bias = model.cls.predictions.bias.detach()
    assert bias[7] > bias[9] > bias[11] > bias[50]  # 4 × 7, 2 × 9, 1 × 11, never 50
    assert bias[50] == bias[0] == bias[2]  # unseen tokens and specials alike: the floor
    assert abs(float(bias.mean())) < 1e-5  # softmax ignores a shift: centred, like BERT's zeros
    # softmax of the bias alone is the (add-one smoothed) unigram distribution of non-special tokens
    probs = bias.double().softmax(-1)
    assert float(probs[7] / probs[9]) == pytest.approx((4 + 1) / (2 + 1), rel=1e-4)


def test_init_weights_with_berts_choices_is_berts_init():
    from types import SimpleNamespace

    plain, model = _twins()
    settings = SimpleNamespace(position_init="normal", position_init_std=None, residual_init="normal",
                               output_bias_init="zeros")  # fmt: skip
    init_weights(model, settings, np.ones((2, 4), dtype=np.uint16), special_ids=[0])
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_models_with_the_new_starting_values_still_match_transformers():
    """Only starting values change: the same weights give the same logits in both models."""
    torch.manual_seed(0)
    ours = BertForMaskedLM(CONFIG).eval()
    scale_residual_branches(ours, 0.5)
    init_output_bias_unigram(
        ours, np.arange(5, 99, dtype=np.uint16).reshape(2, 47), special_ids=[0, 1, 2, 3, 4]
    )
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG.to_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        a = ours(input_ids, attention_mask).logits
        b = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(a, b, atol=1e-4)
