"""Data pipeline benchmark: tokenize + pack speed, loader speed, memory on a 1 GB source.

    .venv/bin/python bench/data_bench.py [--corpora ../shared/corpora] [--big-gb 1.0] [--skip-big]

Targets (issue 3, on 2 CPU cores):
- tokenize + pack >= 5 MB of text per second on the Gutenberg corpus (tokenizer given, cold cache);
- the loader delivers >= 5 M tokens/s of masked batches from the cache on one core;
- preparing a 1 GB text source keeps peak resident memory under 2 GB.
The 1 GB source is the corpus repeated into a temporary file, deleted afterwards.

The results are appended as one record `{"bench": "data", "device": "cpu", "cpu_cores", "affinity",
"prepare", "loader", "big", ...}` to `bench/results/<date>-cpu.json` (bench/records.py), which is
where README.md's Data speeds are rendered from (`python bench/readme_outputs.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.records import append_records, commit  # noqa: E402
from microbert.data import ShardLoader, mask_tokens, prepare_dataset  # noqa: E402
from microbert.data.sources import iter_documents, resolve_source  # noqa: E402
from microbert.tokenizer import train_tokenizer  # noqa: E402


def bench_prepare(
    gutenberg: Path, cache: Path, vocab_size: int, seq_len: int, workers: int | None
) -> tuple[object, dict]:
    """Cold cache, tokenizer given: the time is reading, tokenizing, packing and writing shards."""
    docs = list(iter_documents(resolve_source(gutenberg)))
    text_bytes = sum(len(d.encode()) for d in docs)
    started = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ds = prepare_dataset(
        gutenberg, seq_len=seq_len, vocab_size=vocab_size, tokenizer=tok, cache_dir=cache, workers=workers
    )
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = prepare_dataset(gutenberg, seq_len=seq_len, vocab_size=vocab_size, tokenizer=tok, cache_dir=cache)
    hit_seconds = time.perf_counter() - started
    assert again.cached
    return ds, {
        "text_mb": round(text_bytes / 1e6, 2),
        "documents": ds.meta["documents"],
        "tokens": ds.meta["tokens"],
        "padding_fraction": ds.meta["padding_fraction"],
        "tokenize_pack_seconds": round(seconds, 2),
        "tokenize_pack_mb_per_s": round(text_bytes / 1e6 / seconds, 2),
        "tokenizer_training_seconds": round(train_seconds, 2),
        "cache_hit_seconds": round(hit_seconds, 3),
    }


def bench_loader(ds, batch_size: int, seconds: float, device: str = "cpu") -> dict:
    """One core: read rows from the memory-mapped cache, make tensors, mask them (as the trainer does)."""
    import torch

    torch.set_num_threads(1)
    loader = ShardLoader(ds.train, batch_size=batch_size, seed=0, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    specials = ds.special_token_ids
    vocab = ds.tokenizer.get_vocab_size()
    tokens = batches = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        input_ids, attention_mask = next(loader)
        _masked, _labels = mask_tokens(
            input_ids,
            vocab_size=vocab,
            mask_token_id=ds.mask_token_id,
            special_token_ids=specials,
            generator=generator,
        )
        tokens += attention_mask.sum()  # a tensor: no device sync per batch
        batches += 1
    tokens = int(tokens)
    elapsed = time.perf_counter() - started
    loader.close()
    return {
        "device": device,
        "batch": f"{batch_size}x{ds.seq_len}",
        "batches": batches,
        "loader_tokens_per_s": round(tokens / elapsed),
        "epochs_seen": loader.epoch,
    }


def bench_big(corpora: Path, gb: float, vocab_size: int, seq_len: int) -> dict:
    pieces = [p.read_text(encoding="utf-8") for p in sorted((corpora / "gutenberg").glob("*.txt"))]
    pieces.append((corpora / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    block = ("\n\n".join(pieces) + "\n\n").encode()
    target = int(gb * 1e9)
    with tempfile.TemporaryDirectory(prefix="microbert-bench-") as tmp:
        source = Path(tmp) / "big.txt"
        with open(source, "wb") as handle:
            written = 0
            while written < target:
                handle.write(block)
                written += len(block)
        code = (
            "import json, sys, time\n"
            "from microbert.data import prepare_dataset\n"
            "t = time.perf_counter()\n"
            f"ds = prepare_dataset({str(source)!r}, seq_len={seq_len}, vocab_size={vocab_size}, "
            f"cache_dir={str(Path(tmp) / 'cache')!r})\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'tokens': ds.meta['tokens'], "
            "'documents': ds.meta['documents'], 'sequences': ds.meta['sequences']}))\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        peak = _peak_tree_rss(process)
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the 1 GB prepare failed:\n{err}")
        report = json.loads(out.strip().splitlines()[-1])
    return {
        "source_gb": round(written / 1e9, 3),
        "prepare_seconds": round(report["seconds"], 1),
        "prepare_mb_per_s": round(written / 1e6 / report["seconds"], 2),
        "tokens": report["tokens"],
        "sequences": report["sequences"],
        "peak_rss_gb_all_processes": round(peak / 2**30, 3),
    }


def _peak_tree_rss(process: subprocess.Popen) -> int:
    """Peak of the summed resident memory of a process and its children (encoder workers), in bytes."""
    import psutil

    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                total += proc.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    parser.add_argument("--big-gb", type=float, default=1.0)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--cuda-loader", action="store_true", help="also time the loader + masking on a GPU")
    parser.add_argument("--workers", type=int, default=None, help="encoder processes (default: one per core)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/results/")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gutenberg = args.corpora / "gutenberg"
    results: dict = {"cpu_cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    results["load_average_before"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="microbert-bench-cache-") as cache:
        ds, results["prepare"] = bench_prepare(
            gutenberg, Path(cache), args.vocab_size, args.seq_len, args.workers
        )
        print(json.dumps({"prepare": results["prepare"]}), flush=True)
        results["loader"] = bench_loader(ds, args.batch_size, args.loader_seconds)
        if args.cuda_loader:
            results["loader_cuda"] = bench_loader(ds, args.batch_size, args.loader_seconds, "cuda")
            print(json.dumps({"loader_cuda": results["loader_cuda"]}), flush=True)
        del ds
        print(json.dumps({"loader": results["loader"]}), flush=True)
    if not args.skip_big:
        results["big"] = bench_big(args.corpora, args.big_gb, args.vocab_size, args.seq_len)
        print(json.dumps({"big": results["big"]}), flush=True)
    checks = {
        "tokenize_pack >= 5 MB/s": results["prepare"]["tokenize_pack_mb_per_s"] >= 5,
        "loader >= 5 M tokens/s": results["loader"]["loader_tokens_per_s"] >= 5e6,
    }
    if "big" in results:
        checks["1 GB prepare peak RSS < 2 GB"] = results["big"]["peak_rss_gb_all_processes"] < 2
    results["checks"] = checks
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results, indent=None if args.json else 2))
    if not args.no_record:
        import torch

        record = {"bench": "data", "device": "cpu", "torch": torch.__version__, "commit": commit()}
        append_records([{**record, "date": dt.date.today().isoformat(), **results}], "cpu")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
