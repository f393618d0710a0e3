"""The README's 2-core serving table: its verdict on the target reads the median of a row's repeats."""

from bench.readme_records import serve_cpu


def _run(rate: float, commit: str = "abc1234") -> dict:
    return {
        "bench": "serve", "device": "cpu", "cpu_cores": 2, "load_generator": "wrk -t1", "shape": "bert-tiny",
        "impl": "microbert-serve --workers 2", "mode": "single", "concurrency": 64, "commit": commit,
        "sentences_per_second": rate, "p50_ms": 40.0, "p99_ms": 60.0, "torch": "2.13.0+cpu",
        "duration_s": 10.0, "date": "2026-12-01", "load_average_before": 0.5, "load_average_after": 1.0,
    }  # fmt: skip


def test_one_fast_run_does_not_meet_the_target_when_the_repeats_do_not():
    text = " ".join(serve_cpu([_run(1600), _run(1650), _run(1720)]).split())  # the newest alone passes
    assert "is not met" in text and "3 runs at commit abc1234: 1,600–1,720/s, median 1,650/s" in text


def test_repeats_whose_median_passes_meet_it_and_older_commits_do_not_count():
    text = " ".join(serve_cpu([_run(900, commit="old0000"), _run(1690), _run(1725), _run(1704)]).split())
    assert "is met" in text and "3 runs at commit abc1234: 1,690–1,725/s, median 1,704/s" in text


def test_an_overload_run_is_not_a_row_of_the_table():
    flood = {**_run(1083), "mode": "overload", "concurrency": 1024, "load_generator": "wrk -t1 -c1024"}
    text = serve_cpu([_run(1720), flood])
    assert "overload" not in text and "| 1024 |" not in text
    assert "1,720" in text


def test_a_run_with_the_server_on_some_of_the_cores_is_not_a_row_nor_a_repeat():
    """The overload script's sustainable-rate runs pin the server to one core (`server_cpus`)."""
    pinned = {**_run(700), "server_cpus": "1", "client_cpus": "0"}
    text = " ".join(serve_cpu([_run(1720), _run(1690), pinned]).split())
    assert "| 700 |" not in text and "2 runs at commit abc1234: 1,690–1,720/s" in text
