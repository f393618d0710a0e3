"""Serving benchmark with `wrk` as the load generator: what the server sustains, not what a client does.

    python -m bench.serve_wrk [--preset bert-tiny] [--duration 10] [--connections 64,256]
                              [--impls microbert,hf_pipeline_fastapi] [--modes single,batch32]
                              [--predictor] [--hf-list] [--overload 60] [--smoke]

One random-weight artifact of the preset's shape (WordPiece vocabulary trained on the embedded
corpus, no training) is served by each implementation in turn, on loopback:

- `microbert` — `microbert-serve` as configured (`--workers`, `MICROBERT_*` from `--env`);
- `hf_pipeline_fastapi` — FastAPI around `pipeline("fill-mask")` (`bench/hf_pipeline_app.py`).

For each, `wrk --latency` runs `--duration` seconds (after a 2 s warm-up) at each connection count,
with single-sentence requests (`single`: one ~24-word sentence, one [MASK]) and 32-input requests
(`batch32`). After a 429 a connection waits what the answer's Retry-After-Ms (else Retry-After) says
before its next request, as a well-behaved client does (`--backoff auto`, the default: whenever the
connections' inputs could overflow the server's queue, by its /info limits; otherwise no 429 can come
and wrk runs without those Lua callbacks, which cost it CPU; `never`: re-send at once, a retry
storm); the record counts only 2xx answers as served and gives the 429 share apart (`share_429`).
Without HTTP: `--predictor` times `FillMaskPredictor.predict` on `--batch-size` texts a call, then
on all `--texts` in one call (`batch_size=--batch-size`, the `impl` "... on a list"), and `--hf-list`
`pipeline(list, batch_size=64)`. `--overload S` runs microbert-serve with
a small queue for S seconds under 1,024 wrk connections that re-send at once after a fast 429, with
16 closed-loop Python clients beside them whose 200s give the latencies (`--overload-client python`:
1,024 bench/serve_load.py clients alone), and records the statuses, the p50/p99/max of the 200s and
the server's RSS before, during and after, by process (parent, HTTP workers, model process).

Every result is a record `{"bench": "serve", "impl", "mode", "concurrency", "sentences_per_second",
"p50_ms", "p99_ms", ...}` appended through bench/records.py to bench/results/ (and $OUT), with the
load average of the machine before and after it (a shared machine makes figures noisy: say so).
An HTTP record also says where the cores went: `cpu_ms_per_request`, the CPU milliseconds per 2xx
answer of each process role's main thread (`workers_loop`: the event loops), of its other threads
(`workers_threads`: the model thread and the tokenizer's pool; `model_threads` with a model
process), of wrk (`client`) and in all (`total`), read from /proc around the run.
`--smoke`: 2 s runs at 16 connections, for checking the script end to end on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.records import append_records, commit, cpu_model
from bench.serve_bench import TEXT, make_run
from bench.serve_load import LoadResult, run_load
from bench.serve_open_loop import OpenLoopResult, run_open_loop

REPO = Path(__file__).resolve().parents[1]
# 32 different sentences of the same length, one [MASK] each: the batch32 request.
BATCH = [TEXT.replace("across the [MASK]", f"across the [MASK] {i}") for i in range(32)]


# Statuses are counted per thread and summed in done(). With `backoff`, after a 429 the next request
# waits what the server said (Retry-After-Ms, else Retry-After), through wrk's delay(). wrk keeps one
# Lua state per thread, not per connection, so a backoff goes to the next request the thread sends
# (a FIFO), which may be another of its connections: the total backoff is what the server asked for.
_COUNT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
statuses = {}
pending = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if backoff and status == 429 then
    local ms = tonumber(headers["retry-after-ms"])
    if not ms then ms = (tonumber(headers["retry-after"]) or 1) * 1000 end
    table.insert(pending, ms)
  end
end
function delay() return table.remove(pending, 1) or 0 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do io.write(string.format("status %d: %d\\n", code, n)) end
end
"""


def lua(body: bytes, backoff: bool = True, count: bool = False) -> str:
    """wrk's script: POST `body`; with `backoff`, honour 429s' Retry-After and count statuses;
    with `count` alone, count statuses and re-send at once (a client that ignores Retry-After)."""
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    if backoff or count:
        script += f"backoff = {'true' if backoff else 'false'}\n" + _COUNT
    return script


def ok_share(result: dict[str, Any]) -> float:
    """The share of the requests answered 2xx. (wrk's latency percentiles cover every response,
    so with rejections they include the fast 429s: read them with `non_2xx` beside them.)"""
    if not result.get("requests"):
        return 1.0
    return max(0.0, 1.0 - result["non_2xx"] / result["requests"])


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s and latency percentiles (ms) from `wrk --latency` output."""

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return round(float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit], 2)

    result: dict[str, Any] = {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}  # type: ignore[index]
    for q in ("50", "90", "99"):
        match = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        result[f"p{q}_ms"] = ms(match[1]) if match else None
    latency = re.search(r"^[ \t]+Latency[ \t]+\S+[ \t]+\S+[ \t]+(\S+)", out, re.M)
    result["max_ms"] = ms(latency[1]) if latency else None
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(non_2xx[1]) if non_2xx else 0
    result["socket_errors"] = errors[1].strip() if errors else None
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = int(total[1]) if total else None
    statuses = {code: int(n) for code, n in re.findall(r"^status (\d+): (\d+)$", out, re.M)}
    if statuses:  # the backoff script's count: every response, warm-up excluded
        result["statuses"] = statuses
        result["share_429"] = round(statuses.get("429", 0) / sum(statuses.values()), 4)
    return result


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# The kernel's counters of connections it could not queue for accept(): a connect that overflows
# the listen backlog is dropped, and the client's SYN retry after 1, 3, 7 s is what a max latency
# of seconds is made of. `nstat` reads the same counters; not every host has it.
TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPTimeouts", "TCPAbortOnData")


def tcp_counters(text: str | None = None) -> dict[str, int]:
    """`TCP_COUNTERS` from /proc/net/netstat (or `text` in its format: a `TcpExt:` line of names,
    then one of values). Counters since boot: subtract two readings. {} where there is none."""
    if text is None:
        try:
            text = Path("/proc/net/netstat").read_text()
        except OSError:
            return {}
    rows = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(rows) != 2:
        return {}
    values = dict(zip(rows[0][1:], rows[1][1:], strict=False))
    return {name: int(values[name]) for name in TCP_COUNTERS if name in values}


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if name in before}


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _tree(pid: int) -> list[int]:
    """A process and its descendants."""
    found, pids = [], [pid]
    while pids:
        current = pids.pop()
        found.append(current)
        try:
            pids += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            continue
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers, the model process), MiB."""
    return round(sum(_status_kib(p, "VmRSS") for p in _tree(pid)) / 1024, 1)


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "parent"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    if b"serve.remote" in cmdline:
        return "model"
    return "workers" if b"multiprocessing" in cmdline or b"uvicorn" in cmdline else "other"


def rss_by_role(pid: int) -> dict[str, float | list[int]]:
    """The tree's RSS (MiB) and threads by role: the parent (microbert-serve), the model process,
    the HTTP workers (summed), so that growth can be placed."""
    rss: dict[str, float] = {}
    threads: dict[str, int] = {}
    sockets: list[int] = []
    largest = 0.0
    for p in _tree(pid):
        role, mib = _role(p, pid), _status_kib(p, "VmRSS") / 1024
        rss[role] = rss.get(role, 0.0) + mib
        threads[role] = threads.get(role, 0) + _status_kib(p, "Threads")
        if role == "workers":
            largest = max(largest, mib)
            sockets.append(_socket_count(p))
    return {
        **{k: round(v, 1) for k, v in rss.items()},
        "largest_worker": round(largest, 1),
        **{f"{k}_threads": v for k, v in threads.items()},
        "worker_sockets": sorted(sockets, reverse=True),  # connections per worker, most first
    }


def _socket_count(pid: int) -> int:
    """Open sockets of a process: for an HTTP worker, about its client connections (how evenly the
    workers' accepts spread them)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return 0
    count = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) the server's threads have used, by part: each process role's
    main thread (`<role>_loop`: an HTTP worker's event loop) and its other threads
    (`<role>_threads`: the model thread, the tokenizer's pool). Read from /proc, not sampled, so
    the parts add up to what the server took from the cores."""
    parts: dict[str, float] = {}
    for process in _tree(pid):
        role = _role(process, pid)
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{process}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{process}/task/{tid}/stat").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime, stime: 14, 15
            key = f"{role}_loop" if tid == process else f"{role}_threads"
            parts[key] = parts.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return parts


def cpu_ms_per_request(
    before: dict[str, float], after: dict[str, float], client_s: float, requests: int
) -> dict[str, float]:
    """Milliseconds of CPU per answered request, by part (`thread_cpu_seconds`' two readings) and for
    the load generator (`client_s`), with their total: where the cores went, per request."""
    if requests <= 0:
        return {}
    spent = {key: after[key] - before.get(key, 0.0) for key in after}
    spent["client"] = client_s
    figures = {key: round(seconds / requests * 1000, 3) for key, seconds in sorted(spent.items())}
    figures["total"] = round(sum(spent.values()) / requests * 1000, 3)
    return figures


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have exited (wrk, once it is waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class MidwaySockets(threading.Thread):
    """The HTTP workers' connection counts halfway through a run (`value`, most first, after `join`):
    how wrk's connections were shared out. Workers that share one listening socket take them in
    turns, unevenly, and a worker holding most of them does most of the work on its core alone."""

    def __init__(self, pid: int, duration: float):
        super().__init__(daemon=True)
        self.pid, self.delay = pid, duration / 2
        self.value: list[int] = []
        self.start()

    def run(self) -> None:
        time.sleep(self.delay)
        self.value = list(rss_by_role(self.pid)["worker_sockets"])  # type: ignore[arg-type]


def parse_cpus(text: str) -> set[int]:
    """CPU numbers as `taskset -c` writes them: "0-7", "8-15,31", "3"."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return cpus


# The host's cores, read before `--client-cpus` narrows this process (and its children) to some of them.
HOST_CORES = len(os.sched_getaffinity(0))


class Server:
    """The server under test, on `cpus` when given (its workers and model process inherit them): with
    the load generator on the other cores, what the server answers is not set by what the client
    takes from it (on a 16-core GPU host, eight client processes beside the server fell seconds
    behind at 65,536 connections: BENCHMARKS.md, session 15)."""

    def __init__(
        self, command: list[str], env: dict[str, str], port: int, log: Path, cpus: set[int] | None = None
    ):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command, env={**os.environ, **env}, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )  # fmt: skip
        wait_ready(self.url, self.process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def wrk_command(
    wrk: str, url: str, script: Path, connections: int, duration: float, threads: int, timeout_s: float = 2
) -> list[str]:
    """`timeout_s`: wrk's per-request timeout (its default 2 s); a slower answer is counted as a
    timeout, not a latency, so the overload run raises it to see how slow the slowest is."""
    seconds = max(1, round(duration))
    return [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
            f"--timeout={max(1, round(timeout_s))}s", "-s", str(script), url + "/fill-mask"]  # fmt: skip


def run_wrk(
    wrk: str, url: str, script: Path, connections: int, duration: float, threads: int
) -> dict[str, Any]:
    command = wrk_command(wrk, url, script, connections, duration, threads)
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    return parse_wrk(out)


def base_record(args: argparse.Namespace, device: str) -> dict[str, Any]:
    return {
        "bench": "serve",
        "shape": args.preset,
        "device": device,
        "gpus": 1 if torch.cuda.is_available() else 0,
        "cpu_cores": HOST_CORES,
        "cpu_model": cpu_model(),
        **({"server_cpus": args.server_cpus, "client_cpus": args.client_cpus} if args.server_cpus else {}),
        "torch": torch.__version__,
        "commit": commit(),
        "date": dt.date.today().isoformat(),
    }


def server_command(
    impl: str, run: Path, artifact: Path, port: int, args: argparse.Namespace
) -> tuple[list[str], dict[str, str]]:
    cuda = torch.cuda.is_available()
    if impl == "microbert":
        env = {
            "MICROBERT_DEVICE": "cuda" if cuda else "cpu",
            "MICROBERT_DTYPE": "bfloat16" if cuda else "float32",
        }
        env.update(dict(item.split("=", 1) for item in args.env))
        command = [sys.executable, "-m", "serve.cli", "--model-dir", str(run), "--port", str(port),
                   "--workers", args.workers, "--log-level", "info"]  # fmt: skip
        return command, env
    if impl == "hf_pipeline_fastapi":
        command = [sys.executable, "-m", "uvicorn", "bench.hf_pipeline_app:app", "--port", str(port),
                   "--log-level", "warning"]  # fmt: skip
        return command, {"MODEL_DIR": str(artifact)}
    raise SystemExit(f"unknown impl {impl!r}: microbert or hf_pipeline_fastapi")


def start_py_spy(args: argparse.Namespace, server: Server, out: Path) -> subprocess.Popen[bytes] | None:
    """With `--py-spy`: sample the server and its workers during the measured run (collapsed stacks,
    read with `python -m bench.serve_profile --collapsed FILE`); nonblocking, so it barely slows them."""
    if not args.py_spy:
        return None
    binary = shutil.which("py-spy")
    if binary is None:
        print("--py-spy: no py-spy on PATH (pip install py-spy); not sampling", flush=True)
        return None
    command = [binary, "record", "--nonblocking", "--subprocesses", "--threads", "--rate", "50",
               "--format", "raw", "--duration", str(max(1, round(args.duration) - 1)),
               "--output", str(out), "--pid", str(server.process.pid)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def finish_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()


def could_be_refused(url: str, inputs: int, tokens: int, connections: int) -> bool:
    """Whether `connections` requests of `inputs` inputs and `tokens` queue tokens each, in flight at
    once, could overflow the server's queue (its /info limits).

    When they cannot, no 429 can come back and wrk runs without the backoff script, whose Lua
    callbacks cost wrk a third of its requests/s on 2 shared cores (measured), which is the
    server's CPU.
    """
    try:
        with urllib.request.urlopen(url + "/info", timeout=10) as response:
            limits = json.loads(response.read()).get("limits", {})
    except (OSError, ValueError):
        return True  # not ours (FastAPI + pipeline has no /info): assume it could
    if "max_queue_tokens" not in limits:
        return True
    over_inputs = limits.get("max_queue") is not None and connections * inputs > limits["max_queue"]
    # a worker may hold more than its share of the connections (uvicorn's accept is not balanced)
    over_share = connections > limits.get("max_concurrent_requests_per_worker", connections)
    return over_inputs or over_share or connections * tokens > limits["max_queue_tokens"]


# microbert-serve's series that say what its model did during a run (summed over its processes).
_PASS_SERIES = {
    "passes": "microbert_batch_size_inputs_count",
    "inputs": "microbert_batch_size_inputs_sum",
    "pass_seconds": "microbert_inference_duration_seconds_sum",
    "queue_seconds": "microbert_queue_duration_seconds_sum",
}


def parse_pass_series(text: str) -> dict[str, float]:
    """The `_PASS_SERIES` values in a Prometheus exposition (they carry no labels)."""
    names = {series: key for key, series in _PASS_SERIES.items()}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[names[name]] = float(value)
    return values


def pass_series(url: str) -> dict[str, float] | None:
    """The server's `_PASS_SERIES` now, or None (not ours: no /metrics, or not these series)."""
    return complete_pass_series(metrics_text(url))


def complete_pass_series(text: str) -> dict[str, float] | None:
    values = parse_pass_series(text)
    return values if len(values) == len(_PASS_SERIES) else None


def histogram_buckets(text: str, family_name: str, **wanted: str) -> dict[float, float]:
    """One histogram's series in a Prometheus exposition (upper bound in s -> cumulative count),
    of the samples with the `wanted` labels."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != family_name:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_bucket") and all(labels.get(k) == v for k, v in wanted.items()):
                buckets[float(labels["le"])] = float(sample.value)
    return buckets


def ok_duration_buckets(text: str) -> dict[float, float]:
    """The 200s' in-app time histogram of POST /fill-mask (upper bound in s -> cumulative count)."""
    return histogram_buckets(text, "microbert_request_duration_seconds", route="/fill-mask", status="200")


def metrics_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            return str(response.read().decode())
    except (OSError, ValueError):
        return ""


def bucket_quantiles(start: dict[float, float], end: dict[float, float]) -> dict[str, float | None]:
    """p50, p99 and max of the observations between two readings of one histogram, each as the upper
    bound of its bucket (ms; None beyond the last finite bound), and how many were over 1 s and 10 s."""
    counts = sorted((bound, end[bound] - start.get(bound, 0.0)) for bound in end)
    total = counts[-1][1] if counts else 0.0

    def at_most(q: float) -> float | None:
        for bound, count in counts:
            if total and count >= q * total:
                return None if bound == float("inf") else round(bound * 1000, 1)
        return None

    at_bound = dict(counts)

    def over(seconds: float) -> float:
        return total - at_bound.get(seconds, total)

    return {
        "p50": at_most(0.5),
        "p99": at_most(0.99),
        "max": at_most(1.0),
        "over_1s": over(1.0),
        "over_10s": over(10.0),
    }


def app_ok_latency(before: str, after: str) -> dict[str, float | None]:
    """Quantiles of the time the 200s spent inside the server between two /metrics readings
    (`bucket_quantiles`): what the server's own queue and passes cost, apart from the wait in unread
    sockets and the client's lateness. `over_1s` / `over_10s` say whether a client's answers of
    seconds were slow inside the server."""
    return bucket_quantiles(ok_duration_buckets(before), ok_duration_buckets(after))


def event_loop_lag(before: str, after: str) -> dict[str, float | None]:
    """Quantiles of the HTTP workers' event-loop lag between two /metrics readings (all workers'
    ticks together): the wait of a request that has arrived before a worker reads it, the part of a
    client's latency that `app_ok_latency` does not see."""
    family = "microbert_event_loop_lag_seconds"
    return bucket_quantiles(histogram_buckets(before, family), histogram_buckets(after, family))


def pass_figures(
    before: dict[str, float] | None, after: dict[str, float] | None, seconds: float
) -> dict[str, float]:
    """What the model did between two readings: passes per second, inputs per pass, mean pass time
    (launch to results, a pipelined pass's wait behind the one before included), the share of the
    run those times add up to, and the mean queue wait of an input. Whether a server that answers
    below its target waits on its model or on something else is read here (a share well below 1
    with small passes: the card is idle while the host works)."""
    if before is None or after is None:
        return {}
    delta = {key: after[key] - before[key] for key in _PASS_SERIES}
    if delta["passes"] <= 0 or seconds <= 0:
        return {}
    return {
        "passes_per_second": round(delta["passes"] / seconds, 1),
        "inputs_per_pass": round(delta["inputs"] / delta["passes"], 1),
        "pass_ms": round(1000 * delta["pass_seconds"] / delta["passes"], 2),
        "pass_share": round(delta["pass_seconds"] / seconds, 3),
        "queue_ms_per_input": round(1000 * delta["queue_seconds"] / max(delta["inputs"], 1), 2),
    }


def request_tokens(artifact: Path, texts: list[str]) -> int:
    """The padded tokens a request's inputs count in microbert-serve's queue."""
    from microbert.predict import bucket_length
    from microbert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(artifact)
    return sum(bucket_length(len(e.ids)) for e in tokenizer.encode_batch(texts))


def bench_http(
    args: argparse.Namespace, run: Path, artifact: Path, folder: Path, device: str
) -> list[dict[str, Any]]:
    requests = {"single": [TEXT], "batch32": BATCH}
    scripts = {}
    for mode, texts in requests.items():
        body = json.dumps({"inputs": texts[0] if mode == "single" else texts}).encode()
        for backoff in (True, False):
            path = folder / f"{mode}{'-backoff' if backoff else ''}.lua"
            path.write_text(lua(body, backoff=backoff))
            scripts[mode, backoff] = path
    records = []
    for n, impl in enumerate(args.impls.split(",")):
        port = 8420 + n
        command, env = server_command(impl, run, artifact, port, args)
        server = Server(command, env, port, folder / f"{impl}.log", cpus=args.server_cpu_set)
        try:
            for mode in args.modes.split(","):
                sentences, tokens = len(requests[mode]), request_tokens(artifact, requests[mode])
                for connections in args.connections:
                    backoff = {"always": True, "never": False}.get(
                        args.backoff, could_be_refused(server.url, sentences, tokens, connections)
                    )
                    script = scripts[mode, backoff]
                    run_wrk(args.wrk, server.url, script, connections, min(2.0, args.duration), args.threads)
                    before = load_average()
                    spy = start_py_spy(args, server, folder / f"py-spy-{impl}-{mode}-{connections}.txt")
                    counted = pass_series(server.url), time.monotonic()
                    cpu_before, client_before = thread_cpu_seconds(server.process.pid), children_cpu_seconds()
                    sockets = MidwaySockets(server.process.pid, args.duration)
                    result = run_wrk(args.wrk, server.url, script, connections, args.duration, args.threads)
                    sockets.join()
                    cpu = cpu_ms_per_request(
                        cpu_before,
                        thread_cpu_seconds(server.process.pid),
                        children_cpu_seconds() - client_before,
                        int((result.get("requests") or 0) * ok_share(result)),
                    )
                    passes = pass_figures(counted[0], pass_series(server.url), time.monotonic() - counted[1])
                    finish_py_spy(spy)
                    record = {
                        **base_record(args, device),
                        "impl": impl if impl != "microbert" else f"microbert-serve --workers {args.workers}",
                        "settings": dict(item.split("=", 1) for item in args.env)
                        if impl == "microbert"
                        else {},
                        "mode": mode,
                        "concurrency": connections,
                        "load_generator": f"wrk -t{min(args.threads, connections)}"
                        + (", waits Retry-After after a 429" if backoff else ""),
                        "duration_s": args.duration,
                        # answered sentences only: a 429 or 503 is not a served sentence
                        "sentences_per_second": round(
                            result["requests_per_second"] * ok_share(result) * sentences, 1
                        ),
                        **result,
                        **passes,
                        "cpu_ms_per_request": cpu,
                        "worker_sockets": sockets.value,
                        "load_average_before": before,
                        "load_average_after": load_average(),
                    }
                    print(json.dumps(record), flush=True)
                    records.append(record)
        finally:
            server.stop()
    return records


def bench_predictor(args: argparse.Namespace, artifact: Path, device: str) -> list[dict[str, Any]]:
    """`FillMaskPredictor.predict` two ways: one call per `--batch-size` texts (a batch at a time, as
    before: nothing to overlap across calls), and one call for all `--texts` at that `batch_size`,
    as `pipeline(list, batch_size=...)` is measured (the predictor overlaps its batches' host and
    device work within a call)."""
    from microbert.predict import FillMaskPredictor

    cuda = torch.cuda.is_available()
    predictor = FillMaskPredictor.from_pretrained(
        artifact, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32
    )
    texts = [TEXT.replace("across the [MASK]", f"across the [MASK] {i % 97}") for i in range(args.texts)]
    size = args.batch_size
    predictor.predict(texts[: size * 4], batch_size=size)  # warm-up, graph capture
    calls = {
        "FillMaskPredictor.predict": [texts[i : i + size] for i in range(0, len(texts), size)],
        "FillMaskPredictor.predict on a list": [texts],
    }
    records = []
    for impl, lists in calls.items():
        latencies, done = [], 0
        started = time.perf_counter()
        before = load_average()
        while time.perf_counter() - started < args.duration / len(calls):
            for call in lists:
                t0 = time.perf_counter()
                predictor.predict(call, batch_size=size)
                latencies.append((time.perf_counter() - t0) * 1000)
                done += len(call)
        elapsed = time.perf_counter() - started
        latencies.sort()
        record = {
            **base_record(args, device),
            "impl": impl,
            "mode": "predictor",
            "concurrency": None,
            "batch_size": size,
            "texts_per_call": len(lists[0]),
            "sentences_per_second": round(done / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2], 2),  # of one call
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
            "duration_s": round(elapsed, 1),
            "load_average_before": before,
            "load_average_after": load_average(),
        }
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def bench_hf_list(args: argparse.Namespace, artifact: Path, device: str) -> list[dict[str, Any]]:
    from transformers import pipeline

    cuda = torch.cuda.is_available()
    pipe = pipeline("fill-mask", model=str(artifact), device=0 if cuda else -1,
                    dtype=torch.bfloat16 if cuda else torch.float32)  # fmt: skip
    texts = [TEXT] * max(64, min(args.texts, 2048))
    pipe(texts[:128], batch_size=64)
    before = load_average()
    started = time.perf_counter()
    done = 0
    while time.perf_counter() - started < args.duration:
        pipe(texts, batch_size=64)
        done += len(texts)
    elapsed = time.perf_counter() - started
    record = {
        **base_record(args, device),
        "impl": "pipeline('fill-mask') on a list, batch_size=64",
        "mode": "predictor",
        "concurrency": None,
        "batch_size": 64,
        "sentences_per_second": round(done / elapsed, 1),
        "p50_ms": None,
        "p99_ms": None,
        "duration_s": round(elapsed, 1),
        "load_average_before": before,
        "load_average_after": load_average(),
    }
    print(json.dumps(record), flush=True)
    return [record]


class _RssSampler:
    """The server's RSS every few seconds of a run, from a thread: tells a leak from a warm-up, and
    (by role) which process grows."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.roles: list[tuple[float, dict[str, float | list[int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.every_s):
            at = round(time.monotonic() - start, 1)
            self.samples.append((at, rss_mib(self.pid)))
            self.roles.append((at, rss_by_role(self.pid)))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# Closed-loop Python clients beside wrk in the overload run: their 200s are the latency a client
# sees (wrk's own percentiles mix in the fast 429s and cannot tell them apart).
PROBE_CLIENTS = 16


def bench_overload(args: argparse.Namespace, run: Path, folder: Path, device: str) -> list[dict[str, Any]]:
    """Clients far beyond what the server sustains, against a small queue: only 200 and 429
    (Retry-After), bounded latency of the 200s, flat RSS.

    `--overload-client wrk` (the default where wrk is installed): `--overload-clients` wrk connections
    that re-send at once after a 429 (they ignore Retry-After: the most load this machine can offer),
    and beside them `PROBE_CLIENTS` closed-loop clients (bench/serve_load.py) whose 200s give the
    latency percentiles. `python`: bench/serve_load.py's clients alone (one Python process: on a
    16-core GPU host it, not the server, can be the limit). `open`: bench/serve_open_loop.py's
    arrivals at `--overload-rate` a second (over `--overload-processes` processes, at most
    `--overload-clients` connections), whatever the server answers: the only client that offers a
    multiple of the sustainable rate; its 200s give the latencies."""
    queue = args.overload_queue
    command, env = server_command("microbert", run, run, 8430, args)
    env["MICROBERT_MAX_QUEUE"] = str(queue)
    server = Server(command, env, 8430, folder / "overload-server.log", cpus=args.server_cpu_set)
    use_wrk = args.overload_client.startswith("wrk")
    open_loop = args.overload_client == "open"
    if open_loop and not args.overload_rate:
        raise SystemExit("--overload-client open needs --overload-rate (requests a second)")
    backoff = args.overload_client == "wrk-backoff"
    pid = server.process.pid
    wrk_out = ""
    try:
        asyncio.run(run_load("127.0.0.1", 8430, concurrency=64, duration_s=2, text=TEXT))  # warm-up
        rss_before, roles_before = rss_mib(pid), rss_by_role(pid)
        metrics_before, counted_at = metrics_text(server.url), time.monotonic()
        before, tcp_before = load_average(), tcp_counters()
        with _RssSampler(pid, every_s=max(1.0, args.overload / 12)) as rss_curve:
            wrk = None
            if use_wrk:
                script = folder / "overload.lua"
                script.write_text(lua(json.dumps({"inputs": TEXT}).encode(), backoff=backoff, count=True))
                flood = wrk_command(args.wrk, server.url, script, args.overload_clients, args.overload,
                                    args.threads, timeout_s=args.overload)  # fmt: skip
                wrk = subprocess.Popen(flood, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            clients = PROBE_CLIENTS if use_wrk else args.overload_clients
            # The probes wait a 429's Retry-After (the server would hold a request sent sooner):
            # their 200s are the latency a well-behaved client sees.
            result: LoadResult | OpenLoopResult
            if open_loop:
                result = run_open_loop(
                    "127.0.0.1", 8430, rate=args.overload_rate, duration_s=args.overload, text=TEXT,
                    max_connections=args.overload_clients, processes=args.overload_processes,
                )  # fmt: skip
            else:
                result = asyncio.run(
                    run_load(
                        "127.0.0.1",
                        8430,
                        concurrency=clients,
                        duration_s=args.overload,
                        text=TEXT,
                        polite=use_wrk,
                    )
                )
            if wrk is not None:
                wrk_out = wrk.communicate(timeout=args.overload + 60)[0]
        rss_after, roles_after = rss_mib(pid), rss_by_role(pid)
        metrics_after, counted_s = metrics_text(server.url), time.monotonic() - counted_at
        tcp_after = tcp_counters()
        alive = server.process.poll() is None
    finally:
        server.stop()
    if wrk_out:
        (folder / "overload-wrk.txt").write_text(wrk_out)
    summary = result.summary()
    seconds = summary["duration_s"]
    statuses = dict(summary["statuses"])
    record: dict[str, Any] = {}
    if open_loop:
        record["open_loop"] = {
            key: summary[key]
            for key in (
                "rate", "arrivals", "not_sent", "connections_opened", "latency_ok_open_ms", "send_lag_ms",
                "connect_ms", "slow_ok", "refusals", "retry_after_ms",
            )
        }  # fmt: skip
        record["open_loop"].update(
            ok_over_1s=summary["latency_ok_ms"]["over_1s"], ok_over_10s=summary["latency_ok_ms"]["over_10s"]
        )
    if use_wrk:
        parsed = parse_wrk(wrk_out) if "Requests/sec" in wrk_out else {"statuses": {}}
        record["wrk"] = {key: parsed.get(key) for key in ("statuses", "requests_per_second", "p50_ms",
                                                         "p99_ms", "max_ms", "socket_errors")}  # fmt: skip
        record["probe_statuses"] = dict(statuses)
        for code, n in parsed.get("statuses", {}).items():
            statuses[code] = statuses.get(code, 0) + n
    total = sum(statuses.values())
    record = {
        **base_record(args, device),
        "impl": f"microbert-serve --workers {args.workers}",
        "settings": dict(item.split("=", 1) for item in args.env),
        "mode": "overload",
        "concurrency": args.overload_clients,
        "load_generator": (
            f"wrk -t{args.threads} -c{args.overload_clients}, "
            + ("waits Retry-After after a 429; " if backoff else "re-sends at once after a 429; ")
            + f"latencies from {PROBE_CLIENTS} bench/serve_load.py clients beside it"
            if use_wrk
            else f"bench/serve_open_loop.py at {args.overload_rate:g}/s, {args.overload_processes} "
            f"process(es), at most {args.overload_clients} connections (open loop)"
            if open_loop
            else "bench/serve_load.py (closed loop)"
        ),
        "max_queue": queue,
        "duration_s": seconds,
        "sentences_per_second": round(statuses.get("200", 0) / seconds, 1),
        # A closed-loop client offers what it is answered; an open-loop one its arrivals.
        "offered_per_second": round((summary["arrivals"] if open_loop else total) / seconds, 1),
        "answered_per_second": round(total / seconds, 1),
        "statuses": statuses,
        "only_200_and_429": set(statuses) <= {"200", "429"},
        "p50_ms": summary["latency_ok_ms"]["p50"],
        "p99_ms": summary["latency_ok_ms"]["p99"],
        "max_ms": summary["latency_ok_ms"]["max"],
        # The same 200s' time inside the server (histogram bucket bounds): the rest of p99_ms is
        # the wait before a worker read the request, and the client's own lateness.
        "app_ok_ms_at_most": app_ok_latency(metrics_before, metrics_after),
        # How late the HTTP workers' event loops ran (bucket bounds): the wait before a worker read
        "event_loop_lag_ms_at_most": event_loop_lag(metrics_before, metrics_after),
        **pass_figures(complete_pass_series(metrics_before), complete_pass_series(metrics_after), counted_s),
        **record,
        "rss_mib_before": rss_before,
        "rss_mib_after": rss_after,
        "rss_mib_curve": rss_curve.samples,  # [seconds into the run, MiB]: growth, or a plateau?
        "rss_by_role_before": roles_before,
        "rss_by_role_after": roles_after,
        "rss_by_role_curve": rss_curve.roles,
        "server_alive_after": alive,
        # The whole host's counters over the run (loopback: the server's listen queue overflowing)
        "tcp_counters": counter_deltas(tcp_before, tcp_after),
        "load_average_before": before,
        "load_average_after": load_average(),
    }
    print(json.dumps(record), flush=True)
    return [record]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bert-tiny")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", default="64,256")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--impls", default="microbert,hf_pipeline_fastapi", help="'' for none")
    parser.add_argument("--modes", default="single,batch32")
    parser.add_argument("--workers", default="auto", help="microbert-serve --workers")
    parser.add_argument("--env", action="append", default=[], help="MICROBERT_X=value for microbert-serve")
    parser.add_argument("--predictor", action="store_true", help="FillMaskPredictor.predict, no HTTP")
    parser.add_argument("--hf-list", action="store_true", help="pipeline(list, batch_size=64), no HTTP")
    parser.add_argument("--batch-size", type=int, default=256, help="for --predictor")
    parser.add_argument("--texts", type=int, default=4096, help="for --predictor and --hf-list")
    parser.add_argument("--overload", type=float, default=0, help="seconds of overload (0: none)")
    parser.add_argument("--overload-clients", type=int, default=1024)
    parser.add_argument("--overload-queue", type=int, default=256)
    parser.add_argument("--overload-rate", type=float, default=0, help="--overload-client open: requests/s")
    parser.add_argument("--overload-processes", type=int, default=1, help="--overload-client open: processes")
    parser.add_argument(
        "--overload-client",
        choices=["wrk", "wrk-backoff", "python", "open"],
        default="wrk" if shutil.which("wrk") else "python",
        help="wrk connections that re-send at once after a 429 (default where wrk is installed) or "
        "wait its Retry-After (wrk-backoff), with Python probe clients for the latencies; or Python "
        "clients alone",
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument(
        "--py-spy", action="store_true", help="sample the server with py-spy during each measured run ($OUT)"
    )
    parser.add_argument(
        "--backoff",
        choices=["auto", "always", "never"],
        default="auto",
        help="wrk waits Retry-After after a 429: auto (when the connections could overflow the queue, "
        "from /info), always, never (re-send at once: the old client's retry storm)",
    )
    parser.add_argument("--model-dir", type=Path, help="serve this run folder instead of a random-weight one")
    parser.add_argument(
        "--server-cpus", default="", help="run the server on these CPUs (taskset's form: 0-7); the clients "
        "(wrk, the Python load generators) then run on the others, or on --client-cpus",
    )  # fmt: skip
    parser.add_argument("--client-cpus", default="", help="with --server-cpus: the clients' CPUs")
    parser.add_argument(
        "--smoke", action="store_true", help="2 s runs at 16 connections (a check, not a figure)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.connections, args.overload = (
            2.0,
            "16",
            min(args.overload, 3.0) if args.overload else 0,
        )
        args.texts = min(args.texts, 512)
    args.connections = [int(c) for c in args.connections.split(",") if c]
    try:
        args.server_cpu_set = parse_cpus(args.server_cpus) if args.server_cpus else None
        clients = parse_cpus(args.client_cpus) if args.client_cpus else set()
    except ValueError:
        cpus = f"{args.server_cpus!r} / {args.client_cpus!r}"
        raise SystemExit(f"--server-cpus/--client-cpus take taskset's form (0-7,12), not {cpus}") from None
    if args.server_cpu_set:
        clients = clients or os.sched_getaffinity(0) - args.server_cpu_set
        if not clients or clients & args.server_cpu_set:
            raise SystemExit(f"--client-cpus must be CPUs apart from --server-cpus {args.server_cpus}")
        args.client_cpus = ",".join(map(str, sorted(clients)))
        os.sched_setaffinity(0, clients)  # this process's clients (wrk, the Python ones) inherit it
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(os.environ.get("OUT") or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.model_dir is not None:
            run = args.model_dir
            artifact = run / "export" / (run / "export" / "latest").read_text().strip()
        else:
            run = Path(tmp) / "run"
            artifact = make_run(run, args.preset)
        try:
            if args.predictor:
                records += bench_predictor(args, artifact, device)
            if args.hf_list:
                records += bench_hf_list(args, artifact, device)
            if args.impls:
                records += bench_http(args, run, artifact, folder, device)
            if args.overload:
                records += bench_overload(args, run, folder, device)
        finally:
            append_records(records, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
