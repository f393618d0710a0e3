"""A bounded loopback load generator for `microbert-serve` (POST /fill-mask), and a bert-tiny model to serve.

    python bench/serve_load.py make-model /tmp/bert-tiny          # bert-tiny shape, random weights
    microbert-serve --model-dir /tmp/bert-tiny --port 8765 &
    python bench/serve_load.py run --port 8765 --concurrency 64 --duration 10

Each client holds one keep-alive HTTP/1.1 connection and sends the next request when the answer
arrives (closed loop), so the offered load adapts to the server. The client is hand-written on
asyncio streams because an HTTP library would spend more CPU than the server on this 2-core
machine, and the numbers would measure the client. Only 127.0.0.1/localhost is allowed, the run
length is capped at 60 s, and concurrency at 1,024.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_DURATION_S = 60.0
MAX_CONCURRENCY = 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_TEXT = "the king is [MASK] of the realm ."


@dataclass
class LoadResult:
    duration_s: float
    concurrency: int
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ok_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ok_s:
            return None
        ordered = sorted(self.latencies_ok_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 1)

        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 2),
            "statuses": dict(self.statuses),
            "ok_per_second": round(self.ok / self.duration_s, 1),
            "latency_ok_ms": {
                "p50": ms(self.percentile(0.5)),
                "p90": ms(self.percentile(0.9)),
                "p99": ms(self.percentile(0.99)),
                "max": ms(max(self.latencies_ok_s, default=None)),
            },
        }


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """One HTTP/1.1 response from a keep-alive connection: its status and its headers (names in
    lower case); the body (Content-Length) is read and dropped."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status_line.split()[1].decode(), headers


async def _client(
    host: str, port: int, request: bytes, deadline: float, result: LoadResult, polite: bool
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, headers = await read_response(reader)
            if status == "429" and "retry-after" not in headers:
                result.statuses["429_without_retry_after"] += 1
            elapsed = time.perf_counter() - started
            result.statuses[status] += 1
            if status == "200":
                result.latencies_ok_s.append(elapsed)
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
            if polite and status == "429":
                wait_s = int(headers.get("retry-after-ms", 0)) / 1000
                await asyncio.sleep(min(wait_s, max(0.0, deadline - time.perf_counter())))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, IndexError) as exc:
            result.statuses[f"error:{type(exc).__name__}"] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run_load(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    concurrency: int = 64,
    duration_s: float = 10.0,
    text: str | list[str] = DEFAULT_TEXT,
    path: str = "/fill-mask",
    api_key: str | None = None,
    polite: bool = False,
) -> LoadResult:
    """`concurrency` closed-loop clients for `duration_s` seconds against a loopback server.

    `text` may be a list: one request of that many inputs (the batch requests of the benchmark).
    `polite`: after a 429 a client waits its Retry-After-Ms before the next request (otherwise it
    re-sends at once, and the server holds that request for the same time)."""
    if host not in LOOPBACK:
        raise ValueError(f"load tests go to loopback only ({', '.join(LOOPBACK)}), not {host!r}")
    duration_s = min(duration_s, MAX_DURATION_S)
    concurrency = min(concurrency, MAX_CONCURRENCY)
    body = json.dumps({"inputs": text}).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = LoadResult(duration_s=duration_s, concurrency=concurrency)
    started = time.perf_counter()
    deadline = started + duration_s
    clients = (_client(host, port, request, deadline, result, polite) for _ in range(concurrency))
    await asyncio.gather(*clients)
    result.duration_s = time.perf_counter() - started
    return result


def make_model(folder: Path, corpus: Path, vocab_size: int = 30522) -> Path:
    """A bert-tiny-shaped artifact (2 layers, 2 heads, 128 hidden; random weights) in a run-folder layout."""
    import torch

    from microbert.checkpoint import save_artifact, update_latest
    from microbert.config import get_preset
    from microbert.model import BertForMaskedLM
    from microbert.tokenizer import train_tokenizer

    paragraphs = [p for p in corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tokenizer = train_tokenizer(paragraphs, vocab_size=vocab_size)
    config = get_preset("bert-tiny").replace(vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    step = save_artifact(
        BertForMaskedLM(config).eval(), tokenizer, folder / "export" / "step-1", metadata={"step": 1}
    )
    update_latest(folder / "export", step)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model", help="write a bert-tiny-shaped run folder")
    make.add_argument("folder", type=Path)
    make.add_argument(
        "--corpus",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/corpora/tinyshakespeare.txt",
    )
    run = commands.add_parser("run", help="load a running server")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--concurrency", type=int, default=64)
    run.add_argument("--duration", type=float, default=10.0)
    run.add_argument("--text", default=DEFAULT_TEXT)
    run.add_argument("--api-key")
    args = parser.parse_args(argv)
    if args.command == "make-model":
        print(make_model(args.folder, args.corpus))
        return 0
    result = asyncio.run(
        run_load(
            args.host,
            args.port,
            concurrency=args.concurrency,
            duration_s=args.duration,
            text=args.text,
            api_key=args.api_key,
        )
    )
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
