"""Serving throughput: `microbert-serve` against a FastAPI app around `pipeline("fill-mask")`.

    python -m bench.serve_bench [--preset bert-base] [--concurrency 64] [--duration 30]

Both services run under uvicorn on loopback, one after the other, with the same weights (a
random-weight model of the preset's shape and a WordPiece vocabulary trained on the embedded
corpus), bf16 on the GPU (fp32 on a CPU), and the same closed-loop load generator
(`bench/serve_load.py`): `--concurrency` clients, each sending one ~24-word sentence with one
[MASK] and the next as soon as the answer arrives. Prints and records sentences/s, p50/p99 latency
and errors to `bench/results/<date>-<device>.json` (and `$OUT` when set).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.records import append_records, commit
from bench.serve_load import run_load
from microbert.checkpoint import save_artifact, update_latest
from microbert.config import get_preset
from microbert.model import BertForMaskedLM
from microbert.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The old captain stood on the deck of the ship and looked out across the [MASK] as the "
    "storm gathered over the distant hills."
)


def embedded_texts() -> list[str]:
    texts = []
    for path in sorted((REPO / "microbert" / "corpus").glob("*.txt.gz")):
        texts += [p for p in gzip.decompress(path.read_bytes()).decode().split("\n\n") if p.strip()]
    return texts


def make_run(folder: Path, preset: str) -> Path:
    tokenizer = train_tokenizer(embedded_texts(), vocab_size=get_preset(preset).vocab_size)
    config = get_preset(preset).replace(vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    step = save_artifact(
        BertForMaskedLM(config), tokenizer, folder / "export" / "step-1", metadata={"step": 1}
    )
    update_latest(folder / "export", step)
    return step


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server on port {port} not ready after {timeout_s} s")


def measure(command: list[str], env: dict[str, str], port: int, args: argparse.Namespace) -> dict:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO)
    try:
        wait_ready(port, process)
        asyncio.run(
            run_load("127.0.0.1", port, concurrency=args.concurrency, duration_s=3, text=TEXT)
        )  # warm-up
        result = asyncio.run(
            run_load("127.0.0.1", port, concurrency=args.concurrency, duration_s=args.duration, text=TEXT)
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    summary = result.summary()
    errors = sum(n for status, n in summary["statuses"].items() if status != "200")
    return {
        "sentences_per_second": summary["ok_per_second"],
        "p50_ms": summary["latency_ok_ms"]["p50"],
        "p99_ms": summary["latency_ok_ms"]["p99"],
        "errors": errors,
        "statuses": summary["statuses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="microbert-serve vs FastAPI + pipeline('fill-mask')")
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--impls", default="microbert,hf_pipeline_fastapi")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = make_run(Path(tmp) / "run", args.preset)
        commands = {
            "microbert": (
                [sys.executable, "-m", "serve.cli", "--model-dir", str(Path(tmp) / "run"), "--port", "8310"],
                {
                    "MICROBERT_DEVICE": "cuda" if cuda else "cpu",
                    "MICROBERT_DTYPE": "bfloat16" if cuda else "float32",
                },
                8310,
            ),
            "hf_pipeline_fastapi": (
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.hf_pipeline_app:app",
                    "--port",
                    "8311",
                    "--log-level",
                    "warning",
                ],
                {"MODEL_DIR": str(artifact)},
                8311,
            ),
        }
        for impl in args.impls.split(","):
            command, env, port = commands[impl]
            rec = {
                "bench": "serve",
                "shape": args.preset,
                "impl": impl,
                "device": device_name,
                "gpus": 1 if cuda else 0,
                "concurrency": args.concurrency,
                "duration_s": args.duration,
                **measure(command, env, port, args),
                "torch": torch.__version__,
                "commit": commit(),
                "date": dt.date.today().isoformat(),
            }
            print(json.dumps(rec), flush=True)
            records.append(rec)
    append_records(records, device_name)


if __name__ == "__main__":
    main()
