"""`microbert cache info|usage|clear`: what the data cache holds, what it costs, and removing it."""

from __future__ import annotations

import argparse
import json
import sys

from microbert.data import cache as data_cache
from microbert.errors import MicroBertError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="inspect or clear the data cache")
    parser.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="default $MICROBERT_CACHE_DIR or ~/.cache/microbert"
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="{info,usage,clear}", required=True)
    for name, help_text in (("info", "list the prepared datasets"), ("usage", "disk space used")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=run_info if name == "info" else run_usage)
    clear = sub.add_parser("clear", help="delete prepared datasets (all, or the named KEYs)")
    clear.add_argument(
        "keys", nargs="*", metavar="KEY", help="cache keys from `microbert cache info` (default: all)"
    )
    clear.add_argument(
        "--unfinished", action="store_true", help="only entries whose preparation did not finish"
    )
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    clear.add_argument("--json", action="store_true", help="print JSON")
    clear.set_defaults(func=run_clear)


def _root(args: argparse.Namespace):
    return data_cache.cache_root(getattr(args, "cache_dir", None))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def run_info(args: argparse.Namespace) -> int:
    root = _root(args)
    entries = data_cache.list_entries(root)
    if args.json:
        print(json.dumps({"cache_dir": str(root), "entries": entries}, indent=2))
        return 0
    print(f"cache: {root}")
    if not entries:
        print("  (empty)")
    for e in entries:
        shards = e.get("finished_shards", 0)
        state = "" if e["complete"] else f"  UNFINISHED ({shards} shards done; `cache clear --unfinished`)"
        print(
            f"  {e['cache_key']:<48} {_size(e['bytes']):>10}  {e.get('source', '?')}"
            f"  seq {e.get('seq_len', '?')}"
            f"  {e.get('sequences', '?')} sequences  {e['modified']}{state}"
        )
    return 0


def run_usage(args: argparse.Namespace) -> int:
    report = data_cache.usage(_root(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"cache: {report['cache_dir']}")
    print(f"  prepared datasets  {_size(report['datasets_bytes']):>10}  ({report['entries']} entries)")
    print(f"    of which unfinished {_size(report['unfinished_bytes']):>7}")
    print(f"  tokenizers         {_size(report['tokenizers_bytes']):>10}")
    print(f"  Hub downloads      {_size(report['hf_datasets_bytes']):>10}")
    print(f"  total              {_size(report['total_bytes']):>10}")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    root = _root(args)
    what = (
        ", ".join(args.keys)
        if args.keys
        else f"{'unfinished entries' if args.unfinished else 'everything'} in {root}"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise MicroBertError(f"refusing to delete {what} without confirmation: add --yes")
        answer = input(f"delete {what}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removed = data_cache.clear(root, args.keys, unfinished_only=args.unfinished)
    if args.json:
        print(json.dumps({"cache_dir": str(root), "removed": removed}))
    else:
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {root}")
        for key in removed:
            print(f"  {key}")
    return 0
