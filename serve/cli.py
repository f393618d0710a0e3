"""`microbert-serve --model-dir DIR [--host H] [--port P] [--workers N]`: parse, check, run uvicorn.

Flags override `MICROBERT_*` variables and are passed on through them, so `--workers N` processes
(which build their app from the environment) see the same settings. Problems are reported at once,
before anything starts. SIGTERM: uvicorn stops accepting, finishes in-flight requests, runs the
lifespan shutdown (which drains the batch queue), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from microbert.checkpoint import resolve_artifact_dir, verify_artifact
from microbert.errors import ArtifactError
from serve.settings import Settings

log = logging.getLogger("microbert.serve")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microbert-serve",
        description="Serve fill-mask over HTTP (Hugging Face Inference API convention). "
        "Every setting can also come from a MICROBERT_* environment variable.",
    )
    parser.add_argument(
        "--model-dir", help="run folder (serves export/latest, reloads when it changes) or artifact"
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--workers", type=int, help="processes (default 1); metrics are summed across them")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return parser


def _check_model_dir(path: Path) -> str | None:
    """A problem with the model folder, or None. A run folder with no export yet is fine: we wait for it."""
    try:
        folder = resolve_artifact_dir(path)
    except ArtifactError as exc:
        if not path.is_dir():
            return str(exc)
        log.warning("%s; waiting for the first export", exc)
        return None
    try:
        verify_artifact(folder)
    except ArtifactError as exc:
        return str(exc)
    return None


def _multiprocess_metrics_dir() -> None:
    """Each worker writes its metric values here; set before any worker imports prometheus_client."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="microbert-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    Path(directory).mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):  # values of an earlier run would be summed in
        stale.unlink()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flags = {"model_dir": args.model_dir, "host": args.host, "port": args.port, "workers": args.workers}
    for name, value in flags.items():
        if value is not None:
            os.environ[f"MICROBERT_{name.upper()}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        print(
            "microbert-serve: invalid settings:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr
        )
        return 2
    if settings.model_dir is None:
        print("microbert-serve: no model: pass --model-dir or set MICROBERT_MODEL_DIR", file=sys.stderr)
        return 2
    problem = _check_model_dir(settings.model_dir)
    if problem:
        print(f"microbert-serve: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    # uvicorn re-raises the SIGTERM it handled once shut down; with the default handler that would kill
    # the process with -15 instead of exiting 0 after the graceful shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": 30,
    }
    if settings.workers > 1:
        _multiprocess_metrics_dir()
        # SIGHUP to this parent restarts the workers one at a time; each serves only once loaded.
        uvicorn.run(
            "serve.app:app_from_env",
            factory=True,
            workers=settings.workers,
            timeout_worker_healthcheck=120,
            **common,
        )
    else:
        from serve.app import create_app

        uvicorn.run(create_app(settings), **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
