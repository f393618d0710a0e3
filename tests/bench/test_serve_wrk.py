"""`bench/serve_wrk.py` reads what the model did during a run from the server's own /metrics text,
and what wrk saw from wrk's output and its status-counting scripts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.serve_wrk import (
    app_ok_latency,
    counter_deltas,
    cpu_ms_per_request,
    event_loop_lag,
    lua,
    ok_share,
    parse_cpus,
    parse_pass_series,
    parse_wrk,
    pass_figures,
    tcp_counters,
    thread_cpu_seconds,
    wrk_command,
)
from serve.metrics import Metrics


def _exposition(batches: list[int], pass_s: float, queue_s: float) -> str:
    metrics = Metrics()
    for size in batches:
        metrics.batch_size.observe(size)
        metrics.inference_duration.observe(pass_s)
        for _ in range(size):
            metrics.queue_duration.observe(queue_s)
    return metrics.render()[0].decode()


def test_pass_figures_come_from_the_difference_of_two_readings() -> None:
    before = parse_pass_series(_exposition([8, 8], 0.004, 0.001))
    after = parse_pass_series(_exposition([8, 8, 32, 32, 32, 32], 0.004, 0.001))
    assert before == pytest.approx({"passes": 2, "inputs": 16, "pass_seconds": 0.008, "queue_seconds": 0.016})
    figures = pass_figures(before, after, seconds=2.0)
    assert figures == {
        "passes_per_second": 2.0,
        "inputs_per_pass": 32.0,
        "pass_ms": 4.0,
        "pass_share": 0.008,
        "queue_ms_per_input": 1.0,
    }


def _requests(durations: dict[tuple[str, str], list[float]]) -> str:
    metrics = Metrics()
    for (route, status), seconds in durations.items():
        for value in seconds:
            metrics.request_duration.labels(route, status).observe(value)
    return metrics.render()[0].decode()


def test_the_200s_in_app_quantiles_leave_out_the_refusals_and_what_came_before() -> None:
    """Of the /fill-mask 200s answered between two readings: 98 took under 25 ms and 2 took 0.3 s
    (the 0.5 s bucket); the readings' fast 429s and another route's slow 200s are not theirs."""
    earlier = {("/fill-mask", "200"): [2.0] * 50, ("/fill-mask", "429"): [0.0005] * 10}
    later = {
        ("/fill-mask", "200"): [2.0] * 50 + [0.02] * 98 + [0.3] * 2,
        ("/fill-mask", "429"): [0.0005] * 10_000,
        ("/metrics", "200"): [4.0] * 100,
    }
    assert app_ok_latency(_requests(earlier), _requests(later)) == {
        "p50": 25.0, "p99": 500.0, "max": 500.0, "over_1s": 0, "over_10s": 0,
    }  # fmt: skip
    assert app_ok_latency("", _requests(later)) == {
        "p50": 25.0, "p99": 2500.0, "max": 2500.0, "over_1s": 50, "over_10s": 0,
    }  # fmt: skip
    parked = {("/fill-mask", "200"): [0.02] * 98 + [12.0, 45.0]}  # one beyond the last bound (30 s)
    assert app_ok_latency("", _requests(parked)) == {
        "p50": 25.0, "p99": 30_000.0, "max": None, "over_1s": 2, "over_10s": 2,
    }  # fmt: skip
    assert app_ok_latency("", "") == {"p50": None, "p99": None, "max": None, "over_1s": 0, "over_10s": 0}


def test_event_loop_lag_quantiles_are_those_of_the_ticks_between_the_readings() -> None:
    """The workers' late timers between two readings, apart from those before the first, and not
    confused with the request-duration histogram's buckets."""
    before, after = Metrics(), Metrics()
    for metrics, ticks in ((before, [3.0] * 10), (after, [3.0] * 10 + [0.0005] * 97 + [0.2, 0.2, 1.5])):
        for value in ticks:
            metrics.event_loop_lag.observe(value)
        metrics.request_duration.labels("/fill-mask", "200").observe(20.0)
    text_before, text_after = before.render()[0].decode(), after.render()[0].decode()
    assert event_loop_lag(text_before, text_after) == {
        "p50": 1.0, "p99": 250.0, "max": 2500.0, "over_1s": 1, "over_10s": 0,
    }  # fmt: skip
    assert event_loop_lag("", "") == {"p50": None, "p99": None, "max": None, "over_1s": 0, "over_10s": 0}


def test_no_figures_without_two_readings_or_without_passes() -> None:
    reading = parse_pass_series(_exposition([4], 0.01, 0.0))
    assert pass_figures(None, reading, 1.0) == {}
    assert pass_figures(reading, reading, 1.0) == {}  # nothing ran in between
    assert parse_pass_series("# HELP other\nother_total 3\n") == {}


# What `wrk --latency` prints, with the status lines of the counting script's done().
WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:8430/fill-mask
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.08ms    2.10ms  31.23ms   83.45%
    Req/Sec     3.10k   120.00     3.30k    70.00%
  Latency Distribution
     50%    4.80ms
     75%    6.00ms
     90%    7.50ms
     99%   12.40ms
  6200 requests in 2.00s, 1.10MB read
  Non-2xx or 3xx responses: 200
Requests/sec:   3100.00
Transfer/sec:    550.00KB
status 200: 6000
status 429: 200
"""


def test_wrk_output_gives_rate_percentiles_max_and_statuses() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result["requests_per_second"] == 3100.0 and result["requests"] == 6200
    assert (result["p50_ms"], result["p99_ms"], result["max_ms"]) == (4.8, 12.4, 31.23)
    assert result["statuses"] == {"200": 6000, "429": 200} and result["share_429"] == round(200 / 6200, 4)
    assert result["non_2xx"] == 200 and ok_share(result) == pytest.approx(6000 / 6200)


def test_the_scripts_count_statuses_and_only_the_backoff_one_waits() -> None:
    body = b'{"inputs": "a [MASK]."}'
    assert "backoff = true" in lua(body, backoff=True) and "backoff = false" in lua(
        body, backoff=False, count=True
    )
    assert "function response" not in lua(body, backoff=False)  # no Lua callbacks: wrk at full speed


class _SometimesFull(BaseHTTPRequestHandler):
    """Every third POST is a 429 with Retry-After-Ms: 1 (counted under a lock: one thread a connection)."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _SometimesFull.lock:
            _SometimesFull.count += 1
            full = _SometimesFull.count % 3 == 0
        self.send_response(429 if full else 200)
        if full:
            self.send_header("Retry-After-Ms", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(shutil.which("wrk") is None, reason="no wrk on PATH (apt-get install wrk)")
@pytest.mark.parametrize("backoff", [True, False])
def test_wrk_runs_the_scripts_and_counts_every_answer(tmp_path: Path, backoff: bool) -> None:
    """A real wrk against a server that refuses every third request: the script's counts add up to
    wrk's own request count, a third of them 429 (give or take the answers still in flight on its two
    connections when it stopped: a run on a busy machine may count only a handful)."""
    _SometimesFull.protocol_version = "HTTP/1.1"
    _SometimesFull.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SometimesFull)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        script = tmp_path / "count.lua"
        script.write_text(lua(b'{"inputs": "a [MASK]."}', backoff=backoff, count=True))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = subprocess.run(
            wrk_command(shutil.which("wrk") or "wrk", url, script, 2, 1, 1), capture_output=True, text=True,
            check=True, timeout=60,
        ).stdout  # fmt: skip
    finally:
        server.shutdown()
    result = parse_wrk(out)
    statuses = result["statuses"]
    assert set(statuses) == {"200", "429"} and sum(statuses.values()) >= result["requests"] > 0
    assert abs(statuses["429"] - sum(statuses.values()) / 3) <= 2, statuses
    assert result["max_ms"] is not None


def test_listen_overflows_are_read_from_the_kernels_table_and_subtracted() -> None:
    def table(overflows: int, drops: int) -> str:
        return (
            "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPTimeouts TCPAbortOnData\n"
            f"TcpExt: 0 {overflows} {drops} 7 2\n"
            "IpExt: InNoRoutes InOctets\nIpExt: 0 123\n"
        )

    before, after = tcp_counters(table(10, 12)), tcp_counters(table(5_584, 5_590))
    assert before == {"ListenOverflows": 10, "ListenDrops": 12, "TCPTimeouts": 7, "TCPAbortOnData": 2}
    assert counter_deltas(before, after) == {
        "ListenOverflows": 5_574, "ListenDrops": 5_578, "TCPTimeouts": 0, "TCPAbortOnData": 0,
    }  # fmt: skip
    assert tcp_counters("no such table") == {}
    assert counter_deltas({}, after) == {}
    live = tcp_counters()  # this machine's: every Linux kernel has the four
    assert set(live) == {"ListenOverflows", "ListenDrops", "TCPTimeouts", "TCPAbortOnData"}


def test_cpu_lists_in_tasksets_form() -> None:
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus("5") == {5}
    for bad in ("", "a-b", "3-x"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_thread_cpu_is_read_per_thread_and_split_by_the_main_thread(tmp_path: Path) -> None:
    """A process that burns a CPU second in a second thread (which then sleeps, so that /proc still
    lists it) while its main thread sleeps: the reading puts that second under `_threads`, not
    `_loop` (the split the record's figures rest on)."""
    ready = tmp_path / "ready"
    script = (
        "import pathlib, sys, threading, time\n"
        "def burn():\n"
        "    end = time.thread_time() + 1.0\n"
        "    while time.thread_time() < end: pass\n"
        "    time.sleep(60)\n"
        "t = threading.Thread(target=burn)\n"
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(0.5); t.start(); t.join()\n"
    )
    burner = subprocess.Popen([sys.executable, "-c", script, str(ready)])
    try:
        while not ready.exists():
            time.sleep(0.05)
        before = thread_cpu_seconds(burner.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = thread_cpu_seconds(burner.pid)
            if after.get("parent_threads", 0.0) - before.get("parent_threads", 0.0) >= 0.95:
                break
            time.sleep(0.1)
        assert after["parent_threads"] - before.get("parent_threads", 0.0) >= 0.95
        assert after["parent_loop"] - before["parent_loop"] < 0.3
    finally:
        burner.kill()
        burner.wait()


def test_cpu_per_request_is_each_parts_difference_over_the_answers() -> None:
    before = {"workers_loop": 10.0, "workers_threads": 20.0}
    after = {"workers_loop": 16.0, "workers_threads": 30.0, "model_threads": 2.0}  # a part born meanwhile
    figures = cpu_ms_per_request(before, after, client_s=0.5, requests=10_000)
    assert figures == {
        "client": 0.05,
        "model_threads": 0.2,
        "workers_loop": 0.6,
        "workers_threads": 1.0,
        "total": 1.85,
    }
    assert cpu_ms_per_request(before, after, 0.5, 0) == {}
