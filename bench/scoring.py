"""Score an exported model as a user would: loaded by `transformers`, every scored position [MASK]ed.

    python bench/scoring.py runs/cpu --on embedded-heldout:all --on imdb:heldout

Rows come from MicroBERT's data pipeline tokenized with the artifact's own tokenizer (so the same
text gives the same positions for any model with that tokenizer); the model is
`transformers.AutoModelForMaskedLM.from_pretrained(folder)`; the score is `microbert.evaluate`
(top-1, top-5, loss, and the constant guess on the same positions). Used by the quality and recipe
benchmarks, so a row of BENCHMARKS.md is what a user would measure on the published artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microbert.checkpoint import resolve_artifact_dir
from microbert.data import prepare_dataset
from microbert.evaluate import evaluate
from microbert.tokenizer import load_tokenizer, mask_token_id, special_token_ids


def score(
    model_dir: str | Path,
    targets: list[str],
    *,
    seq_len: int = 128,
    max_rows: int = 2000,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """{target: evaluate(...) as a dict} for targets written `SOURCE[:heldout|all]`."""
    from transformers import AutoModelForMaskedLM

    folder = resolve_artifact_dir(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = load_tokenizer(folder)
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        source, _, split = target.partition(":")
        data = prepare_dataset(
            source, seq_len=seq_len, vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer
        )
        rows = data.eval if split in ("", "heldout") else np.concatenate([data.eval, data.train])
        result = evaluate(
            model,
            rows[:max_rows],
            special_token_ids=special_token_ids(tokenizer),
            mask_token_id=mask_token_id(tokenizer),
            batch_size=batch_size,
            device=device,
        )
        results[target] = {
            **result.to_dict(),
            "over_baseline": result.over_baseline,
            "rows": min(len(rows), max_rows),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--on", action="append", required=True, help="SOURCE[:heldout|all], repeatable")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-rows", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        json.dumps(
            score(args.model_dir, args.on, seq_len=args.seq_len, max_rows=args.max_rows, device=args.device),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
