"""The predictor's output layer padded once (`keep_padded_decoder`), not on every forward pass."""

import pytest
import torch
import torch.nn.functional as F

from microbert.config import ModelConfig
from microbert.model import BertForMaskedLM, aligned_linear

CONFIG = ModelConfig(
    vocab_size=1001, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
)


def test_the_padded_copy_is_made_once_and_again_when_the_weights_change():
    torch.manual_seed(0)
    model = BertForMaskedLM(CONFIG).eval()
    model.keep_padded_decoder()
    head = model.cls.predictions
    weight, bias = head.padded_decoder()
    assert weight.shape == (1024, 32) and bias.shape == (1024,)
    assert torch.equal(weight, F.pad(head.decoder.weight.detach(), (0, 0, 0, 23)))
    assert torch.equal(bias, F.pad(head.bias.detach(), (0, 23)))
    again = head.padded_decoder()
    assert again[0] is weight and again[1] is bias  # kept, not copied again
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(1.0)  # tied: the decoder's weight changes
    changed, _ = head.padded_decoder()
    assert changed is not weight
    assert torch.equal(changed[:1001], head.decoder.weight.detach())
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # a reload into the same tensors: an in-place write as well
    assert torch.equal(head.padded_decoder()[1][:1001], head.bias.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_inference_uses_the_kept_copy_and_training_pads_per_call():
    torch.manual_seed(0)
    model = BertForMaskedLM(CONFIG).cuda()
    model.keep_padded_decoder()
    input_ids = torch.randint(5, CONFIG.vocab_size, (3, 16), device="cuda")
    head = model.cls.predictions
    with torch.inference_mode():
        kept = model.eval()(input_ids).logits
    assert head._padded is not None
    hidden = model.bert(input_ids)
    expected = aligned_linear(head.transform(hidden), head.decoder.weight, head.bias)
    assert kept.shape == expected.shape and torch.allclose(kept, expected, atol=1e-5)
    # With autograd on, the gradient still reaches the tied weight (the per-call pad).
    model.train()(input_ids).logits.float().sum().backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
