"""`microbert predict`: fill-mask from the command line, human-readable or as the service's JSON."""

from __future__ import annotations

import argparse
import json
import sys

from microbert.predict import FillMaskPredictor, FillMaskResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict the [MASK] tokens in texts",
        description="Predict [MASK] tokens. --json prints one element per TEXT, exactly what "
        "POST /fill-mask returns for it.",
    )
    parser.add_argument(
        "--model-dir", required=True, help="a run folder (uses export/latest) or an artifact folder"
    )
    parser.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    parser.add_argument("--targets", nargs="+", metavar="W", help="score only these words")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts with one or more [MASK]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    predictor = FillMaskPredictor.from_pretrained(args.model_dir, device=args.device)
    results = predictor.predict(args.texts, top_k=args.top_k, targets=args.targets)
    if args.json:
        json.dump(results, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(args.texts, results))
    return 0


def render(texts: list[str], results: list[FillMaskResult]) -> str:
    """The seed's "Testing MLM Model" block: each text, then its top candidates per mask."""
    lines = ["=== Testing MLM Model ==="]
    for text, result in zip(texts, results, strict=True):
        lines.append(f"\nInput: {text}")
        per_mask = result if result and isinstance(result[0], list) else [result]
        for m, candidates in enumerate(per_mask):
            if len(per_mask) > 1:
                lines.append(f"  mask {m + 1}:")
            for rank, c in enumerate(candidates, 1):
                lines.append(f"  {rank}. {c['token_str']:<16} {c['score']:.4f}")  # type: ignore[index]
    return "\n".join(lines) + "\n"
