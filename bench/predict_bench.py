"""FillMaskPredictor against `transformers.pipeline("fill-mask")` on the same weights, on this machine.

    python bench/predict_bench.py [--preset bert-tiny] [--texts 256] [--batch-size 64] [--repeats 3]

Both answer the same single-mask texts of ~30 words, in batches of `--batch-size`, with
random-weight models of the preset's shape and a WordPiece vocabulary trained on the shared
Gutenberg corpus. Prints sentences/s of each (best of `--repeats`) and the ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from microbert.checkpoint import save_artifact
from microbert.config import get_preset
from microbert.model import BertForMaskedLM
from microbert.predict import FillMaskPredictor
from microbert.tokenizer import train_tokenizer

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "gutenberg"


def make_texts(n: int, words_per_text: int = 30, seed: int = 0) -> list[str]:
    """~30-word windows of real text, one word replaced by [MASK]."""
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt"))).split()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        start = rng.randrange(len(words) - words_per_text)
        window = words[start : start + words_per_text]
        window[rng.randrange(words_per_text)] = "[MASK]"
        texts.append(" ".join(window))
    return texts


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-tiny")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import pipeline

    texts = make_texts(args.texts)
    tokenizer = train_tokenizer(
        (p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt"))),
        vocab_size=get_preset(args.preset).vocab_size,
    )
    config = get_preset(args.preset).replace(vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_artifact(BertForMaskedLM(config), tokenizer, Path(tmp) / "model")
        ours = FillMaskPredictor.from_pretrained(folder)
        pipe = pipeline("fill-mask", model=str(folder), device="cpu")

        ours_rate = best_rate(
            lambda: ours.predict(texts, batch_size=args.batch_size), len(texts), args.repeats
        )
        pipe_rate = best_rate(lambda: pipe(texts, batch_size=args.batch_size), len(texts), args.repeats)

    print(f"machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(
        f"shape: {args.preset} (vocab {config.vocab_size}), {len(texts)} texts of ~30 words, "
        f"batch {args.batch_size}"
    )
    print(f"FillMaskPredictor          {ours_rate:8.1f} sentences/s")
    print(f"pipeline('fill-mask')      {pipe_rate:8.1f} sentences/s")
    print(f"ratio                      {ours_rate / pipe_rate:8.2f}x")


if __name__ == "__main__":
    main()
