"""Service settings, from `MICROBERT_*` environment variables (or a `.env` file) through pydantic-settings.

Every field is also a row of the settings table in README.md ("## Serving"). Limits default to values
that keep one CPU process responsive; `max_input_tokens` defaults to the model's own positions, and
the queue's token limit to `QUEUE_PASSES` forward passes' budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The default queue holds this many forward passes' token budget (`max_batch_tokens`, as TEI's
# --max-batch-tokens): under overload an admitted input waits at most about that many passes, and
# 64 connections of 32-input requests (2,048 inputs of up to 32 tokens) still fit.
QUEUE_PASSES = 4


# The default concurrency limit per HTTP worker. A refusal still costs a Python worker tens of
# microseconds, so a limit that clients reach in normal use turns their retries into a storm that
# costs more than it saves (bench/NOTES.md, session 9: 512 in all over 8 workers halved an H200's
# throughput under 1,024 connections). 256 admitted requests wait at most ~0.15 s behind one
# another in a worker on the GPU host (about 0.55 ms of worker time each).
CONCURRENT_PER_WORKER = 256


class Settings(BaseSettings):
    """What `microbert-serve` and `create_app` need; validated once, at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="MICROBERT_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    model_dir: Path | None = Field(
        default=None, description="run folder (uses export/latest) or artifact folder"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 on a GPU that has it, else float32"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int | Literal["auto"] = Field(
        default=1, description="HTTP processes; auto: from the cores (serve.cli.auto_workers)"
    )
    reuse_port: bool | Literal["auto"] = Field(
        default="auto",
        description="with several HTTP workers, each accepts on a socket of its own (SO_REUSEPORT, "
        "Linux), so the kernel spreads connections evenly and each worker has a listen queue of its "
        "own; false: one shared socket, as uvicorn does; auto: own sockets wherever the kernel spreads "
        "connections over them (Linux), else one shared socket (serve.workers.wants_reuse_port)",
    )
    model_process: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="one model process fed by the HTTP workers (auto: on with a GPU and several workers)",
    )
    model_socket: str | None = Field(
        default=None, description="set by microbert-serve for its HTTP workers: the model process's socket"
    )
    allocator: str = Field(
        default="auto",
        description="malloc of the server's processes: auto (jemalloc where installed, else the system's), "
        "jemalloc, system, or the path of a malloc library to preload (serve.allocator)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch threads per model (microbert-serve sets it for N CPU workers)"
    )
    cuda_graphs: bool = Field(
        default=True, description="replay each batch shape's forward pass as a CUDA graph"
    )
    max_batch_size: int = Field(default=64, ge=1, description="inputs per forward pass")
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="padded tokens per forward pass (inputs × longest)"
    )
    max_wait_ms: float = Field(
        default=2.0, ge=0, le=1000, description="how long an idle batcher waits to fill a batch"
    )
    max_queue_tokens: int | None = Field(
        default=None,
        ge=1,
        description="padded tokens waiting for the model; beyond it: 429 (default: "
        f"{QUEUE_PASSES} × max_batch_tokens)",
    )
    max_queue: int | None = Field(
        default=None, ge=1, description="also cap the inputs waiting for the model (default: tokens decide)"
    )
    max_concurrent_requests: int | None = Field(
        default=None,
        ge=1,
        description="fill-mask requests handled at once (TEI's --max-concurrent-requests), shared out "
        f"over the HTTP workers; beyond it: 429 at once, before the body is read (default: "
        f"{CONCURRENT_PER_WORKER} per HTTP worker)",
    )
    fast_path: bool = Field(
        default=True,
        description="answer POST /fill-mask with a valid JSON body without FastAPI's routing (the "
        "same answers, about half the event loop's time a request); false: every request through "
        "FastAPI",
    )
    max_inputs: int = Field(default=64, ge=1, description="inputs in one request")
    max_input_tokens: int | None = Field(
        default=None, ge=3, description="default: the model's max_position_embeddings"
    )
    max_body_bytes: int = Field(default=1 << 20, ge=64, description="request body limit; beyond it: 413")
    max_top_k: int = Field(default=100, ge=1, description="largest top_k a request may ask for")
    max_predictions: int = Field(
        default=8192, ge=1, description="inputs × masks × top_k in one request; beyond it: 422"
    )
    max_response_bytes: int = Field(
        default=8 << 20, ge=1024, description="estimated size of a response; beyond it: 422"
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="a request not answered by then is abandoned: 503"
    )
    keep_alive_s: int = Field(
        default=15,
        ge=2,
        le=600,
        description="how long an idle keep-alive connection stays open (uvicorn's timeout_keep_alive); "
        "a 429 asks a client to wait at most half of it, so that a polite client's retry finds its "
        "connection still open",
    )
    shutdown_timeout_s: float = Field(
        default=10.0, ge=0, description="after SIGTERM, how long in-flight requests may take"
    )
    api_key: SecretStr | None = Field(
        default=None, description="when set, POST /fill-mask needs it (Bearer or X-API-Key)"
    )
    reload_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="how often export/latest is checked for a newer step; 0: only on SIGHUP",
    )

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        # A request of max_inputs inputs must fit in an empty queue, or it could never be served.
        problems = []
        if isinstance(self.workers, int) and not 1 <= self.workers <= 64:
            problems.append(f"workers must be 1 to 64 or auto, got {self.workers}")
        if self.max_queue is not None and self.max_queue < self.max_inputs:
            problems.append(f"max_queue ({self.max_queue}) must be at least max_inputs ({self.max_inputs})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def concurrent_requests(self) -> int:
        """`max_concurrent_requests`, or `CONCURRENT_PER_WORKER` for each HTTP worker."""
        return self.max_concurrent_requests or CONCURRENT_PER_WORKER * self._worker_count

    @property
    def concurrent_requests_per_worker(self) -> int:
        """This HTTP worker's share of `concurrent_requests` (microbert-serve tells each worker how
        many there are through MICROBERT_WORKERS)."""
        return -(-self.concurrent_requests // self._worker_count)

    @property
    def _worker_count(self) -> int:
        return self.workers if isinstance(self.workers, int) else 1

    @property
    def max_retry_s(self) -> float:
        """The longest wait a 429 asks for: half the keep-alive, so a client that waits it and a loop
        turn more still finds its connection open (a request written into a connection the server is
        closing fails on the client's side)."""
        return self.keep_alive_s / 2

    @property
    def queue_tokens(self) -> int:
        """The queue's token limit: `max_queue_tokens`, or `QUEUE_PASSES` forward passes' budget."""
        return self.max_queue_tokens or QUEUE_PASSES * self.max_batch_tokens
