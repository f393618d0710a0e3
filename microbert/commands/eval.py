"""`microbert eval`: held-out MLM loss, masked-token accuracy and perplexity of any artifact.

The numbers are those the trainer logs (same function, same seeded masking), on the held-out split
of `--dataset` tokenized with the artifact's own tokenizer. The most-frequent-token baseline is
printed beside the accuracy, so "is the model any better than guessing `the`?" has an answer.
"""

from __future__ import annotations

import argparse
import json
import sys

from microbert.checkpoint import load_artifact
from microbert.errors import ConfigError


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
    parser.add_argument("--mlm-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=1234, help="masking seed (default 1234)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from microbert.data import prepare_dataset
    from microbert.evaluate import evaluate

    artifact = load_artifact(args.model_dir, device=args.device)
    config = artifact.config
    manifest = artifact.manifest or {}
    seq_len = args.seq_len or int(manifest.get("seq_len") or min(128, config.max_position_embeddings))
    problems = []
    if seq_len > config.max_position_embeddings:
        problems.append(
            f"--seq-len {seq_len} is above the model's {config.max_position_embeddings} positions"
        )
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if problems:
        raise ConfigError(problems)
    data = prepare_dataset(
        args.dataset,
        seq_len=seq_len,
        vocab_size=artifact.tokenizer.get_vocab_size(),
        max_samples=args.max_samples,
        tokenizer=artifact.tokenizer,
        progress=sys.stderr.isatty(),
    )
    result = evaluate(
        artifact.model,
        data.eval,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        mlm_probability=args.mlm_probability,
        seed=args.seed,
        device=args.device,
    )
    report = {
        "model_dir": str(artifact.path),
        "step": artifact.step,
        "dataset": args.dataset,
        "seq_len": seq_len,
        "sequences": len(data.eval),
        **result.to_dict(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    baseline_token = artifact.tokenizer.id_to_token(result.baseline_token_id) if result.num_masked else "-"
    print(f"model          {artifact.path} (step {artifact.step})")
    print(f"dataset        {args.dataset}: {len(data.eval)} held-out sequences of {seq_len} tokens")
    print(f"masked tokens  {result.num_masked}")
    print(f"loss           {result.loss:.4f}")
    print(f"perplexity     {result.perplexity:.2f}")
    print(f"accuracy       {result.accuracy * 100:.2f}%")
    print(f"baseline       {result.baseline_accuracy * 100:.2f}% (always {baseline_token!r})")
    return 0
