"""Held-out evaluation scores what a fill-mask user gets: every scored position is [MASK]."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from microbert.checkpoint import save_artifact
from microbert.evaluate import choose_positions, evaluate
from microbert.model import BertForMaskedLM
from microbert.tokenizer import mask_token_id, special_token_ids


def _rows(tokenizer, texts, seq_len=32) -> np.ndarray:
    ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False).ids]
    body = seq_len - 2
    n = len(ids) // body
    rows = np.zeros((n, seq_len), dtype=np.int64)
    rows[:, 0] = tokenizer.token_to_id("[CLS]")
    rows[:, 1:-1] = np.asarray(ids[: n * body]).reshape(n, body)
    rows[:, -1] = tokenizer.token_to_id("[SEP]")
    return rows


class CopyInput(nn.Module):
    """Predicts whatever token stands at each position: perfect under 80/10/10 corruption on the
    10% left unchanged, worthless at filling a [MASK]."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size})()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot(input_ids, self.config.vocab_size).float()
        return type("Out", (), {"logits": logits + self.anchor})()


def test_copying_the_input_scores_nothing(tiny_tokenizer, sample_texts):
    rows = _rows(tiny_tokenizer, sample_texts[:300])
    result = evaluate(
        CopyInput(tiny_tokenizer.get_vocab_size()),
        rows,
        special_token_ids=special_token_ids(tiny_tokenizer),
        mask_token_id=mask_token_id(tiny_tokenizer),
    )
    assert result.num_masked > 1000
    assert result.accuracy == 0.0 and result.top5_accuracy <= 0.01
    assert 0.02 < result.baseline_accuracy < 0.2  # the constant guess on the same positions


def test_positions_depend_only_on_rows_and_seed(tiny_tokenizer, sample_texts):
    rows = torch.from_numpy(_rows(tiny_tokenizer, sample_texts[:100]))
    specials = special_token_ids(tiny_tokenizer)
    a = choose_positions(rows, specials, 0.15, torch.Generator().manual_seed(3))
    b = choose_positions(rows, specials, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not a[:, 0].any() and not a[:, -1].any()  # [CLS] and [SEP] are never scored
    assert 0.12 < a.float().mean() < 0.15  # 15% of the non-special tokens


def test_same_score_through_transformers(tmp_path, tiny_tokenizer, tiny_config, sample_texts):
    """The figure users reproduce by loading the artifact in `transformers` is the trainer's figure."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config).eval()
    folder = save_artifact(model, tiny_tokenizer, tmp_path / "step-1", metadata={"step": 1})
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    rows = _rows(tiny_tokenizer, sample_texts[:200])
    kwargs = {
        "special_token_ids": special_token_ids(tiny_tokenizer),
        "mask_token_id": mask_token_id(tiny_tokenizer),
        "batch_size": 16,
    }
    ours, theirs = evaluate(model, rows, **kwargs), evaluate(hf_model, rows, **kwargs)
    assert ours.num_masked == theirs.num_masked and ours.baseline_token_id == theirs.baseline_token_id
    assert ours.accuracy == pytest.approx(theirs.accuracy, abs=1e-3)
    assert ours.top5_accuracy == pytest.approx(theirs.top5_accuracy, abs=1e-3)
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-4)


def test_special_ids_come_from_the_tokenizer(tmp_path, sample_texts):
    """A `transformers` BERT vocabulary has [MASK] at 103: eval must mask with 103, not 4."""
    transformers = pytest.importorskip("transformers")
    words = sorted({w for t in sample_texts[:500] for w in t.lower().split() if w.isalpha()})[:400]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")  # what BertTokenizer reads
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(sample_texts[:400]))
    out = subprocess.run(
        [sys.executable, "-m", "microbert.cli", "eval", "--model-dir", str(tmp_path / "hf"), "--dataset",
         str(text), "--split", "all", "--json", "--seq-len", "32"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
        "MICROBERT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["num_masked"] > 100 and report["split"] == "all"
    # scored tokens are words: never a special id (which 0–4 as literals would have let through)
    assert report["baseline_token_id"] not in (0, 100, 101, 102, 103)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--mask-rate", "1.5"], "--mask-rate"), (["--max-batches", "0"], "--max-batches")],
)
def test_impossible_eval_arguments(tiny_artifact, flags, message):
    out = subprocess.run(
        [sys.executable, "-m", "microbert.cli", "eval", "--model-dir", str(tiny_artifact), "--dataset",
         "embedded", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
