"""`microbert eval`: held-out fill-mask accuracy (top-1, top-5), loss and perplexity of any artifact.

The numbers are those the trainer logs (same function, same seeded positions, every one `[MASK]`ed),
on the held-out split of `--dataset` (or all of it, `--split all`, for text the model never trained
on), tokenized with the artifact's own tokenizer. The constant guess is printed beside the accuracy,
so "is the model any better than guessing `the`?" has an answer.
"""

from __future__ import annotations

import argparse
import json
import sys

from microbert.checkpoint import load_artifact
from microbert.errors import ConfigError
from microbert.evaluate import EVAL_MASK_RATE, EVAL_SEED


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="held-out MLM loss, masked accuracy and perplexity of an exported model",
        description="Evaluate an artifact on the held-out split of a dataset (tokenized with the "
        "artifact's tokenizer).",
    )
    parser.add_argument(
        "--model-dir", required=True, help="a run folder (uses export/latest) or an artifact folder"
    )
    parser.add_argument("--dataset", required=True, help="embedded, a local path, imdb, a Hub name …")
    parser.add_argument("--seq-len", type=int, help="default: the length the model was trained with")
    parser.add_argument("--max-samples", help="cap on texts read from the source (1000, 500k …)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument(
        "--split",
        choices=("heldout", "all"),
        default="heldout",
        help="heldout: the documents training never sees (every 100th); all: every row, for a text "
        "the model was not trained on (default heldout)",
    )
    parser.add_argument(
        "--mask-rate",
        "--mlm-probability",
        dest="mask_rate",
        type=float,
        default=EVAL_MASK_RATE,
        help=f"share of the non-special tokens scored, each replaced by [MASK] (default {EVAL_MASK_RATE})",
    )
    parser.add_argument(
        "--seed", type=int, default=EVAL_SEED, help=f"seed of the scored positions (default {EVAL_SEED})"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> list[str]:
    problems = []
    if not 0.0 < args.mask_rate <= 1.0:
        problems.append(f"--mask-rate must be above 0 and at most 1, got {args.mask_rate}")
    if args.max_batches is not None and args.max_batches < 1:
        problems.append(f"--max-batches must be at least 1, got {args.max_batches} (leave it out for all)")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    return problems


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from microbert.data import prepare_dataset
    from microbert.evaluate import evaluate
    from microbert.tokenizer import mask_token_id, special_token_ids

    problems = _check(args)
    if problems:
        raise ConfigError(problems)
    artifact = load_artifact(args.model_dir, device=args.device)
    config = artifact.config
    manifest = artifact.manifest or {}
    seq_len = args.seq_len or int(manifest.get("seq_len") or min(128, config.max_position_embeddings))
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            [f"--seq-len {seq_len} is above the model's {config.max_position_embeddings} positions"]
        )
    data = prepare_dataset(
        args.dataset,
        seq_len=seq_len,
        vocab_size=artifact.tokenizer.get_vocab_size(),
        max_samples=args.max_samples,
        tokenizer=artifact.tokenizer,
        progress=sys.stderr.isatty(),
    )
    rows = data.eval if args.split == "heldout" else np.concatenate([data.eval, data.train])
    if len(rows) == 0:
        raise ConfigError([f"--dataset {args.dataset} has no held-out rows: use --split all"])
    tokenizer = artifact.tokenizer
    pad_id = tokenizer.token_to_id("[PAD]")
    result = evaluate(
        artifact.model,
        rows,
        special_token_ids=special_token_ids(tokenizer),
        mask_token_id=mask_token_id(tokenizer),
        pad_token_id=0 if pad_id is None else pad_id,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        mask_rate=args.mask_rate,
        seed=args.seed,
        device=args.device,
    )
    report = {
        "model_dir": str(artifact.path),
        "step": artifact.step,
        "dataset": args.dataset,
        "split": args.split,
        "seq_len": seq_len,
        "sequences": len(rows),
        **result.to_dict(),
        "over_baseline": result.over_baseline,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    baseline_token = tokenizer.id_to_token(result.baseline_token_id)
    what = "held-out sequences" if args.split == "heldout" else "sequences (all of it)"
    print(f"model           {artifact.path} (step {artifact.step})")
    print(f"dataset         {args.dataset}: {len(rows)} {what} of {seq_len} tokens")
    print(
        f"scored tokens   {result.num_masked} ({result.mask_rate:.0%} of the tokens, each replaced by [MASK])"
    )
    print(f"top-1 accuracy  {result.accuracy * 100:.2f}% ({result.over_baseline:.1f}× the constant guess)")
    print(f"top-5 accuracy  {result.top5_accuracy * 100:.2f}%")
    print(f"constant guess  {result.baseline_accuracy * 100:.2f}% (always {baseline_token!r})")
    print(f"loss            {result.loss:.4f} (perplexity {result.perplexity:.1f})")
    return 0
