"""`microbert data prepare`: tokenize a source into the shard cache once, ahead of training."""

from __future__ import annotations

import argparse
import json
import time

from microbert.config import PRESETS, get_preset
from microbert.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets into the token cache")
    sub = parser.add_subparsers(dest="data_command", metavar="{prepare}", required=True)
    prepare = sub.add_parser(
        "prepare",
        help="tokenize and pack a source into the cache (a cache hit when already done)",
        description="Tokenize and pack a text source into the content-addressed cache. "
        "SRC: embedded (default), a local file or folder (.txt, .jsonl, .json, .parquet, .csv, gzipped too), "
        "imdb, wikitext-103, wikitext-2, wikipedia, openwebtext, c4, pile-cc, or hf:<repo>[:<config>].",
    )
    prepare.add_argument(
        "--dataset", default="embedded", metavar="SRC", help="the text source (default embedded)"
    )
    prepare.add_argument(
        "--seq-len", default="128", metavar="N", help="tokens per packed sequence (default 128)"
    )
    prepare.add_argument(
        "--max-samples", default=None, metavar="N", help="documents to read: 20000, 500k, 5M"
    )
    prepare.add_argument(
        "--streaming",
        nargs="?",
        const="true",
        default="false",
        metavar="true|false",
        help="stream Hub/structured sources instead of downloading them first (same result)",
    )
    prepare.add_argument("--text-column", default="text", help="column holding the text (default text)")
    prepare.add_argument(
        "--model", default="bert-tiny", metavar="PRESET", help="preset whose vocab_size the tokenizer gets"
    )
    prepare.add_argument(
        "--vocab-size", default=None, metavar="N", help="tokenizer vocabulary (overrides --model)"
    )
    prepare.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="use this tokenizer instead of training one"
    )
    prepare.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="default $MICROBERT_CACHE_DIR or ~/.cache/microbert"
    )
    prepare.add_argument("--json", action="store_true", help="print the result as JSON")
    prepare.set_defaults(func=run_prepare)


def _parse_bool(value: str, flag: str, problems: list[str]) -> bool:
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    problems.append(f"{flag} must be true or false, got {value!r}")
    return False


def _parse_int(value: str | None, flag: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        problems.append(f"{flag} must be an integer, got {value!r}")
        return None


def run_prepare(args: argparse.Namespace) -> int:
    from microbert.data import prepare_dataset

    problems: list[str] = []
    streaming = _parse_bool(args.streaming, "--streaming", problems)
    seq_len = _parse_int(args.seq_len, "--seq-len", problems)
    vocab_size = _parse_int(args.vocab_size, "--vocab-size", problems)
    if vocab_size is None and args.vocab_size is None:
        if args.model in PRESETS:
            vocab_size = get_preset(args.model).vocab_size
        else:
            problems.append(f"unknown preset {args.model!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if problems:
        raise ConfigError(problems)
    started = time.perf_counter()
    ds = prepare_dataset(
        args.dataset,
        seq_len=seq_len,  # type: ignore[arg-type]  # validated by prepare_dataset, with the rest
        vocab_size=vocab_size,  # type: ignore[arg-type]
        max_samples=args.max_samples,
        streaming=streaming,
        text_column=args.text_column,
        tokenizer=args.tokenizer,
        cache_dir=args.cache_dir,
        progress=not args.json,
    )
    seconds = round(time.perf_counter() - started, 3)
    result = {
        "cache_key": ds.cache_key,
        "path": str(ds.path),
        "documents": ds.meta["documents"],
        "tokens": ds.meta["tokens"],
        "sequences": ds.meta["sequences"],
        "train_sequences": ds.meta["train_sequences"],
        "eval_sequences": ds.meta["eval_sequences"],
        "padding_fraction": ds.meta["padding_fraction"],
        "vocab_size": ds.meta["vocab_size"],
        "seconds": seconds,
        "cached": ds.cached,
    }
    if args.json:
        print(json.dumps(result))
    else:
        state = "cache hit" if ds.cached else f"prepared in {seconds:.1f} s"
        print(f"{ds.meta['source']}: {state}")
        for key in ("cache_key", "path", "documents", "tokens", "train_sequences", "eval_sequences"):
            print(f"  {key:<16} {result[key]}")
        print(f"  {'padding':<16} {100 * result['padding_fraction']:.3f}%")
    return 0
