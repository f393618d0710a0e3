"""Microseconds to tokenize one sentence, in N processes at once, as N HTTP workers do.

Each HTTP worker of `microbert-serve` tokenizes its requests' texts itself. With `tokenizers`'
default, even one text given to `encode_batch` goes to a Rust thread pool as large as the machine,
one pool per process; whether that costs more than it saves when every core already runs a worker
is what this measures, against `encode` (no pool) and against `TOKENIZERS_PARALLELISM=false`:

    python -m bench.tokenize_contention --model-dir RUN --processes 8 --texts 1,32

Prints one line per (call, texts per call, parallelism) with the median microseconds per text over
the processes; nothing is recorded (it chooses a code path, it is not a figure of the product).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.serve_bench import TEXT


def _one_process(model_dir: Path, call: str, texts: int, seconds: float) -> float:
    from microbert.checkpoint import resolve_artifact_dir
    from microbert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_artifact_dir(model_dir))
    batch = [TEXT] * texts
    if call == "encode":
        work = lambda: [tokenizer.encode(t).ids for t in batch]  # noqa: E731
    else:
        fast = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        work = lambda: [e.ids for e in fast(batch)]  # noqa: E731
    work()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        calls += 1
    return (time.perf_counter() - start) / (calls * texts) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--texts", default="1,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_one_process(args.model_dir, args.child[0], int(args.child[1]), args.seconds))
        return 0
    for texts in (int(t) for t in args.texts.split(",")):
        for call, parallelism in (("encode_batch", None), ("encode_batch", "false"), ("encode", None)):
            env = dict(os.environ)
            env.pop("TOKENIZERS_PARALLELISM", None)
            if parallelism is not None:
                env["TOKENIZERS_PARALLELISM"] = parallelism
            command = [sys.executable, "-m", "bench.tokenize_contention", "--model-dir", str(args.model_dir),
                       "--seconds", str(args.seconds), "--child", call, str(texts)]  # fmt: skip
            children = [
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(args.processes)
            ]
            per_text = [float(child.communicate()[0]) for child in children]
            print(
                f"{args.processes} processes, {call}, {texts} text(s) a call, TOKENIZERS_PARALLELISM="
                f"{parallelism or 'unset'}: {statistics.median(per_text):.1f} µs a text "
                f"(processes {min(per_text):.1f}–{max(per_text):.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
