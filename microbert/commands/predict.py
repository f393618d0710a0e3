"""`microbert predict`: fill-mask from the command line, human-readable or as the service's JSON."""

from __future__ import annotations

import argparse
import json
import sys

from microbert.errors import InputError
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
    # One value per flag (comma-separated, repeatable), never `nargs="+"`: a list flag would
    # swallow the TEXT arguments that follow it.
    parser.add_argument(
        "--targets",
        action="append",
        metavar="W[,W...]",
        help="score only these words: --targets sea,land (or --targets sea --targets land)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts with one or more [MASK]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts: list[str] = args.texts
    targets = split_targets(args.targets)
    check_text_arguments([*texts, *(targets or [])])
    predictor = FillMaskPredictor.from_pretrained(args.model_dir, device=args.device)
    if targets is not None:
        stray = [t for t in texts if predictor.mask_token not in t]
        if stray and len(stray) < len(texts):  # `--targets sea land TEXT`: the old, space-separated form
            raise InputError(
                f"{stray[0]!r} has no {predictor.mask_token}: --targets takes one comma-separated list "
                f"(--targets {','.join([*targets, *stray])})"
            )
    results = predictor.predict(texts, top_k=args.top_k, targets=targets)
    if args.json:
        json.dump(results, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(texts, results))
    return 0


def split_targets(values: list[str] | None) -> list[str] | None:
    """`--targets sea,land --targets sky` → ["sea", "land", "sky"]; None when the flag is absent."""
    if values is None:
        return None
    return [word.strip() for value in values for word in value.split(",") if word.strip()]


def check_text_arguments(values: list[str]) -> None:
    """Arguments the shell passed as bytes that are not UTF-8 (e.g. `$'\\xff'`) reach Python as lone
    surrogates, which the tokenizer cannot encode: say so instead of a traceback."""
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = value[exc.start].encode("utf-8", "surrogateescape")
            shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise InputError(
                f"{shown!r} is not valid UTF-8 (byte 0x{byte.hex()} at character {exc.start + 1}): "
                "pass the text as UTF-8"
            ) from None


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
