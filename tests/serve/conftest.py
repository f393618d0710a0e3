"""Service fixtures: run folders, an app under `with TestClient(app)`, a real `microbert-serve` process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from microbert.checkpoint import save_artifact, update_latest
from microbert.model import BertForMaskedLM
from serve.app import create_app
from serve.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: no .env file, no MICROBERT_* variables from the shell, no reload polling."""
    values: dict[str, Any] = {"model_dir": model_dir, "reload_interval_s": 0, **overrides}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("MICROBERT_")}
    try:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]
    finally:
        os.environ.update(saved)


def add_step(run_dir: Path, tiny_tokenizer: Any, tiny_config: Any, step: int, seed: int) -> Path:
    """Export a new random-weight step into a run folder and point export/latest at it."""
    torch.manual_seed(seed)
    folder = save_artifact(
        BertForMaskedLM(tiny_config).eval(),
        tiny_tokenizer,
        run_dir / "export" / f"step-{step}",
        metadata={"step": step},
    )
    update_latest(run_dir / "export", folder)
    return folder


@pytest.fixture
def run_dir(tmp_path: Path, tiny_artifact: Path) -> Path:
    """A run folder whose export/latest names a copy of the session's tiny artifact (step 7)."""
    export = tmp_path / "run" / "export"
    shutil.copytree(tiny_artifact, export / "step-7")
    update_latest(export, export / "step-7")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    """One app for a module's read-only tests; the lifespan (model load) runs."""
    with TestClient(create_app(make_settings(tiny_artifact, max_top_k=50))) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m serve.cli` (what `microbert-serve` runs) on 127.0.0.1, with settings from env and flags."""

    def __init__(self, model_dir: Path, *, workers: int = 1, env: dict[str, str] | None = None, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROBERT_", "PROMETHEUS_"))}
        child_env.update(env or {})
        child_env["PYTHONPATH"] = str(REPO)
        self.log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serve.cli",
                "--model-dir",
                str(model_dir),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--log-level",
                "info",
            ],
            cwd=tmp_cwd(log),
            env=child_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log_path.read_text()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


def tmp_cwd(log: Path) -> Path:
    # Not the repository: a stray .env there must not change the server's settings.
    return log.parent


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[ServerProcess] = []

    def start(model_dir: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(
            model_dir, workers=workers, env=env, log=tmp_path / f"server-{len(servers)}.log"
        )
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn server on 127.0.0.1 (sockets, HTTP parsing), in a thread of this
    process, so a test can also reach into `app.state` (hold the model thread, read the batcher)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
