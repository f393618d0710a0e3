"""`microbert-serve --model-dir DIR [--host H] [--port P] [--workers N]`: parse, check, run uvicorn.

Flags override `MICROBERT_*` variables and are passed on through them, so `--workers N` processes
(which build their app from the environment) see the same settings. Problems are reported at once,
before anything starts.

Workers: `--workers auto` takes the CPU cores this process may use (`auto_workers`). With one
worker the model is in the HTTP process. With several, either each worker loads its own copy (the
default on a CPU, where measured it is the faster: no hop between processes, the cores split
between the copies) or one model process serves all of them (`serve/remote.py`; the default with a
GPU, which must not hold N copies or split the traffic into N small batches).

Allocator: where jemalloc is installed, the command re-executes itself once with it preloaded
(`serve/allocator.py` says why: glibc's malloc let the model's processes grow under load).

SIGTERM: uvicorn stops accepting and gives in-flight requests `shutdown_timeout_s` (10 s) to finish,
then the lifespan shutdown drops what is still queued; a forward pass still running after another
second is not waited for. The process exits 0 within shutdown_timeout_s + 2 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from serve import allocator
from serve.settings import Settings
from serve.workers import run_workers, wants_reuse_port

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
    parser.add_argument(
        "--workers",
        help="HTTP processes, or auto (from the cores; default 1); metrics are summed across them",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return parser


def _check_model_dir(path: Path) -> str | None:
    """A problem with the model folder, or None. A run folder with no export yet is fine: we wait for it."""
    # Here, not at the top: microbert.checkpoint imports torch (~2.5 s), which must not be paid twice
    # when the process re-executes itself with another malloc.
    from microbert.checkpoint import resolve_artifact_dir, verify_artifact
    from microbert.errors import ArtifactError

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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(cores: int, gpu: bool) -> int:
    """HTTP workers for `--workers auto`.

    A CPU: one per core, each with its own model on one thread (bench/serve_cpu.sh measured this
    against a model process on 2 cores). A GPU: one model process, and HTTP workers on half the
    cores (the other half tokenize and launch in the model process), at most 8.
    """
    if gpu:
        return max(1, min(8, cores // 2))
    return max(1, cores)


def _plan(settings: Settings) -> tuple[int, bool, str]:
    """Workers, whether a model process serves them, and the line that says so in the log."""
    import torch  # not serve.service: prometheus_client must not be imported before its folder is set

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = usable_cores()
    if settings.workers == "auto":
        workers = auto_workers(cores, device == "cuda")
        how = f"--workers auto: {workers} HTTP worker(s) for {cores} core(s)"
    else:
        workers = int(settings.workers)
        how = f"{workers} HTTP worker(s)"
    shared = settings.model_process == "on" or (
        settings.model_process == "auto" and workers > 1 and device == "cuda"
    )
    if shared:
        how += f", one model process on {device}"
    elif workers > 1:
        how += f", each with its own model on {device}"
    return workers, shared, how


def _start_model_process(log_level: str) -> tuple[subprocess.Popen[bytes], str]:
    """The model process, listening on a socket in a fresh folder only this user can open."""
    folder = tempfile.mkdtemp(prefix="microbert-model-")
    socket_path = str(Path(folder) / "model.sock")
    env = {**os.environ, "MICROBERT_MODEL_SOCKET": socket_path, "MICROBERT_LOG_LEVEL": log_level}
    process = subprocess.Popen([sys.executable, "-m", "serve.remote"], env=env)
    return process, socket_path


def _stop_model_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
    try:
        library, allocator_line = allocator.resolve(settings.allocator)
    except allocator.AllocatorError as exc:
        print(f"microbert-serve: {exc}", file=sys.stderr)
        return 2
    if library is not None and not allocator.loaded(library):
        if argv is None and os.environ.get(allocator.REEXEC_MARK) != "1":
            allocator.reexec_with(library, "serve.cli", sys.argv[1:])  # does not return
        why = "the loader refused it" if argv is None else "main() was called in-process"
        allocator_line = f"{allocator_line} not preloaded ({why}): the system's malloc"
    problem = _check_model_dir(settings.model_dir)
    if problem:
        print(f"microbert-serve: {problem}", file=sys.stderr)
        return 2
    log.info("%s", allocator_line)
    log.info("%s", raise_open_files_limit())

    workers, shared, how = _plan(settings)
    log.info("%s", how)
    os.environ["MICROBERT_WORKERS"] = str(workers)  # each worker's share of max_concurrent_requests
    if workers > 1:
        _multiprocess_metrics_dir()
    if workers > 1 and not shared and settings.torch_threads is None:
        os.environ["MICROBERT_TORCH_THREADS"] = str(max(1, usable_cores() // workers))
    model_process = None
    if shared:
        if workers == 1:
            _multiprocess_metrics_dir()
        model_process, socket_path = _start_model_process(args.log_level)
        os.environ["MICROBERT_MODEL_SOCKET"] = socket_path
        settings = Settings()
    try:
        code = _run_uvicorn(settings, workers, args, wants_reuse_port(settings.reuse_port))
        _exit_now_if_abandoned(code)
        return code
    finally:
        if model_process is not None:
            _stop_model_process(model_process, settings.shutdown_timeout_s + 2)
            shutil.rmtree(Path(socket_path).parent, ignore_errors=True)


# The soft limit is raised at most this far where the hard one is unlimited (the kernel's own
# fs.nr_open defaults to 1,048,576, and setrlimit above it fails).
_OPEN_FILES_CAP = 1 << 20


def raise_open_files_limit() -> str:
    """Raise this process's soft limit of open files to its hard limit (the workers and the model
    process inherit it), and say what it is.

    Every client connection is a file descriptor, held until `keep_alive_s` after its last answer
    (15 s): a flood of clients, or many polite ones resting on 429s, holds thousands. Soft limits of
    1,024 are common (systemd's default, many shells) while the hard limit is far higher; at the
    soft limit a worker stops accepting (serve.accept pauses on EMFILE) and clients wait in the
    kernel's queue. nginx's `worker_rlimit_nofile` is the same idea, left there to the operator.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            return f"open files: at most {soft} (raising it to {target} failed: {exc})"
        return f"open files: at most {target} (soft limit raised from {soft})"
    return f"open files: at most {soft}"


def _exit_now_if_abandoned(code: int) -> None:
    """Interpreter exit would join a model thread that outlived the shutdown bound: skip that join."""
    service = sys.modules.get("serve.service")
    if service is not None and getattr(service, "abandoned_model_thread", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_uvicorn(settings: Settings, workers: int, args: argparse.Namespace, reuse_port: bool) -> int:
    import uvicorn

    # uvicorn re-raises the SIGTERM it handled once shut down; with the default handler that would kill
    # the process with -15 instead of exiting 0 after the graceful shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "timeout_keep_alive": settings.keep_alive_s,
    }
    if workers > 1:
        # SIGHUP to this parent restarts the workers one at a time; each serves only once loaded.
        config = uvicorn.Config(
            "serve.app:app_from_env",
            factory=True,
            workers=workers,
            timeout_worker_healthcheck=120,
            **common,
        )
        return run_workers(config, workers, reuse_port)
    else:
        from serve.app import create_app

        uvicorn.run(create_app(settings), **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
