"""README.md's throughput figures, rendered from the benchmark records in `bench/results/*.json`.

The benchmarks append records (bench/records.py); this module only reads them, so the figures README
shows are the ones a benchmark measured, with the machine and date the records carry, and
`python bench/readme_outputs.py --check` notices a README that has fallen behind its records. No
benchmark is run here: regenerating is instant and offline, which is what lets tests/test_readme.py
check these parts on every run.

Which records a figure shows is decided by a rule written here, not picked by hand:
- `serve-cpu`: the `wrk` rows of `bench/serve_wrk.py` on 2 CPU cores (`device` "cpu", `cpu_cores` 2);
  of each (shape, server, settings, request, connections) the newest record (a later date, then later
  in its file: records are appended), so a new run replaces the rows it measured.
- `data-speed`: the newest `bench/data_bench.py` record (`bench` "data").
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
Record = dict[str, Any]

# The serving target of the 2-core machine (BENCHMARKS.md, "Serving, 2 CPU cores"): single sentences.
SERVE_TARGET_PER_S = 1700
SERVE_TARGET_P99_MS = 150.0
SERVE_TARGET_CONNECTIONS = 64


def load(results: Path = RESULTS) -> list[Record]:
    """Every record of every `*.json` list in `results`, oldest first (by date, then file order)."""
    records: list[Record] = []
    for path in sorted(results.glob("*.json")):
        records += [r for r in json.loads(path.read_text(encoding="utf-8")) if isinstance(r, dict)]
    return sorted(records, key=lambda r: str(r.get("date", "")))  # stable: file order within a date


def _newest(records: list[Record], key: Any) -> list[Record]:
    latest: dict[Any, Record] = {}
    for record in records:
        latest.pop(key(record), None)  # re-insert: the dict keeps the newest, in the order measured
        latest[key(record)] = record
    return list(latest.values())


def _prose(text: str) -> str:
    """A paragraph wrapped as README.md's are (a line break inside a code span renders as a space)."""
    return textwrap.fill(text, width=105, break_long_words=False, break_on_hyphens=False)


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _load(record: Record) -> str:
    if "load_average_before" not in record:
        return ""
    return f", load average {record['load_average_before']:.2f}–{record['load_average_after']:.2f}"


def _joined(values: list[Any]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def _server(record: Record) -> str:
    if record["impl"] == "hf_pipeline_fastapi":
        return 'FastAPI + `pipeline("fill-mask")`'
    settings = "".join(f", `{k}={v}`" for k, v in sorted((record.get("settings") or {}).items()))
    return f"`{record['impl']}`{settings}"


def _row_key(r: Record) -> tuple:
    """What makes two serving records the same row: shape, server, settings, request, connections."""
    settings = json.dumps(r.get("settings") or {}, sort_keys=True)
    return r.get("shape"), r.get("impl"), settings, r.get("mode"), r.get("concurrency")


# The table's requests (serve_wrk's modes), in its order, as its rows name them.
_REQUESTS = {"single": "single", "batch32": "32 inputs"}


def _in_table(r: Record) -> bool:
    """A `wrk` run of one of the table's requests with the server and wrk sharing the 2 cores. Not
    an overload run (its wrk floods the server with 1,024 connections and counts refusals apart), nor
    one with the server pinned to some of the cores (`server_cpus`: the overload script's
    sustainable-rate runs); BENCHMARKS.md reports those."""
    return (
        r.get("bench") == "serve"
        and r.get("device") == "cpu"
        and r.get("cpu_cores") == 2
        and r.get("mode") in _REQUESTS
        and str(r.get("load_generator", "")).startswith("wrk")
        and not r.get("server_cpus")
    )


def serve_cpu_rows(records: list[Record]) -> list[Record]:
    """The rule: newest `_in_table` record per (shape, server, settings, request, connections)."""
    rows = _newest([r for r in records if _in_table(r)], _row_key)
    order = list(_REQUESTS)
    return sorted(
        rows,
        key=lambda r: (
            r["impl"] == "hf_pipeline_fastapi",
            r["impl"],
            sorted((r.get("settings") or {}).items()),
            order.index(r["mode"]),
            r["concurrency"],
        ),
    )


def serve_cpu(records: list[Record]) -> str:
    rows = serve_cpu_rows(records)
    every_run = [r for r in records if _in_table(r)]
    if not rows:
        return "No 2-core `wrk` serving run is recorded in `bench/results/`; see BENCHMARKS.md."
    load = [x for r in rows for x in (r["load_average_before"], r["load_average_after"])]

    def each(field: str) -> str:
        return _joined([r[field] for r in rows])

    caption = (
        "Recorded by `bash bench/serve_cpu.sh` (`python -m bench.serve_wrk`) on the 2-core development "
        f"machine (records of device `cpu`, 2 cores, torch {each('torch')}), {each('shape')} shape, "
        f"`{_joined([str(r['load_generator']).split(',')[0] for r in rows])}` on the same two cores "
        "(† where it waits `Retry-After` after a 429, as a polite client does), "
        f"{each('duration_s')} s a row, "
        f"{each('date')}, commit {each('commit')}; "
        f"load average {min(load):.2f}–{max(load):.2f} (1 minute, before and after each row, the benchmark's "
        "own processes included). Sentences/s counts the inputs of 2xx answers only; non-2xx counts the "
        "requests answered with an error status; p50 and p99 are `wrk`'s, over all answers. "
        "`bench/readme_outputs.py` writes this table from the newest record of each row in `bench/results/`; "
        "the verdict on the target below reads the median of that row's runs at the same commit."
    )
    lines = [
        _prose(caption),
        "",
        "| server | request | connections | sentences/s | non-2xx | p50 | p99 | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        request = _REQUESTS[r["mode"]]
        request += " †" if "Retry-After" in str(r.get("load_generator", "")) else ""
        refused = f"{r['non_2xx']:,} of {r['requests']:,}" if r.get("non_2xx") else "0"
        cells = [
            _server(r),
            request,
            str(r["concurrency"]),
            f"{r['sentences_per_second']:,.0f}",
            refused,
            _ms(r["p50_ms"]),
            _ms(r["p99_ms"]),
            f"{r['load_average_before']:.2f}–{r['load_average_after']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    single = [
        r
        for r in rows
        if r["mode"] == "single"
        and r["concurrency"] == SERVE_TARGET_CONNECTIONS
        and r["p99_ms"] <= SERVE_TARGET_P99_MS
    ]
    best = max(single, key=lambda r: r["sentences_per_second"], default=None)
    target = (
        f"The target, {SERVE_TARGET_PER_S:,} single sentences/s at {SERVE_TARGET_CONNECTIONS} connections "
        f"with p99 ≤ {SERVE_TARGET_P99_MS:.0f} ms, "
    )
    if best is None:
        target += "is not met: no such row has that p99."
    else:
        # Repeats of that row at the same commit: the verdict reads their median, not one run.
        same = [
            r for r in every_run if _row_key(r) == _row_key(best) and r.get("commit") == best.get("commit")
        ]
        rates = sorted(r["sentences_per_second"] for r in same)
        median = statistics.median(rates)
        target += (
            f"is {'met' if median >= SERVE_TARGET_PER_S else 'not met'}: the best such row within that "
            f"p99 answers {best['sentences_per_second']:,.0f}/s ({_server(best)}, p99 "
            f"{_ms(best['p99_ms'])})"
        )
        if len(rates) > 1:
            target += (
                f"; its {len(rates)} runs at commit {best.get('commit')}: "
                f"{rates[0]:,.0f}–{rates[-1]:,.0f}/s, median {median:,.0f}/s"
            )
        target += "."
    return "\n".join([*lines, "", _prose(target)])


def data_speed(records: list[Record]) -> str:
    runs = [r for r in records if r.get("bench") == "data"]
    if not runs:
        return _prose(
            "**Speed** (`python bench/data_bench.py`, which records its results in `bench/results/`): no run "
            'is recorded there yet; BENCHMARKS.md ("Data pipeline, CPU") has the figures of an earlier '
            "run, taken by hand."
        )
    r = runs[-1]
    prepare, loader = r["prepare"], r["loader"]
    text = (
        f"**Speed** (`bench/data_bench.py`, device `{r['device']}`, {r['affinity']} of {r['cpu_cores']} "
        f"cores, {r['date']}, commit {r['commit']}{_load(r)}): tokenize + pack "
        f"{prepare['tokenize_pack_mb_per_s']:.1f} MB/s of the Gutenberg text "
        f"({prepare['text_mb']:.1f} MB, cold cache, tokenizer given); the loader delivers "
        f"{loader['loader_tokens_per_s'] / 1e6:.1f} M tokens/s of masked {loader['batch']} batches from the "
        "cache on one core"
    )
    if "loader_cuda" in r:
        text += f" ({r['loader_cuda']['loader_tokens_per_s'] / 1e6:.1f} M/s with masking on a GPU)"
    if "big" in r:
        big = r["big"]
        text += (
            f"; a {big['source_gb']:.1f} GB text file prepares in {big['prepare_seconds']:.0f} s "
            f"({big['prepare_mb_per_s']:.0f} MB/s: repeated text is cheap) with "
            f"{big['peak_rss_gb_all_processes']:.2f} GB peak memory summed over all processes"
        )
    return _prose(text + ".")


RENDERERS = {"serve-cpu": serve_cpu, "data-speed": data_speed}
