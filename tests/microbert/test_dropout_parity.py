"""With dropout on, MicroBERT's model trains exactly like `transformers`' BertForMaskedLM.

Same initial weights, same batches and masks, and the same dropout draws (the two models consume
the RNG in the same order: embeddings, attention probabilities, attention output, feed-forward
output): the losses of 20 AdamW steps agree to float rounding. So a run that stays on the unigram
plateau with dropout 0.1 would stay there in `transformers` too: it is the recipe, not the model
(BENCHMARKS.md, "Dropout and the plateau").
"""

from __future__ import annotations

import pytest
import torch

from microbert.config import get_preset
from microbert.data import mask_tokens
from microbert.model import BertForMaskedLM

transformers = pytest.importorskip("transformers")


def test_training_with_dropout_matches_transformers_step_for_step():
    config = get_preset("bert-tiny").replace(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    ours = BertForMaskedLM(config).train()
    names = transformers.BertConfig().to_dict()
    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k in names})
    theirs = transformers.BertForMaskedLM._from_config(hf_config, attn_implementation="sdpa").train()
    theirs.load_state_dict(ours.state_dict(), strict=False)  # position_ids buffers aside, all weights
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(1)
    ours_losses, their_losses = [], []
    for step in range(20):
        ids = torch.randint(5, 500, (8, 32), generator=batches)
        ids[:, 0], ids[:, -1], ids[0, 20:] = 2, 3, 0  # [CLS] … [SEP], one padded row
        inputs, labels = mask_tokens(
            ids,
            vocab_size=500,
            mask_token_id=4,
            special_token_ids=[0, 1, 2, 3, 4],
            generator=torch.Generator().manual_seed(step),
        )
        for model, opt, losses in ((ours, opt_ours, ours_losses), (theirs, opt_theirs, their_losses)):
            torch.manual_seed(100 + step)  # the same dropout draws for both
            loss = model(input_ids=inputs, attention_mask=(ids != 0).long(), labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert ours_losses == pytest.approx(their_losses, abs=1e-5)
    # dropout was really on: other draws give another loss on the same batch
    with torch.no_grad():
        torch.manual_seed(7)
        other = ours(input_ids=inputs, attention_mask=(ids != 0).long(), labels=labels).loss.item()
        torch.manual_seed(8)
        assert ours(input_ids=inputs, attention_mask=(ids != 0).long(), labels=labels).loss.item() != other
