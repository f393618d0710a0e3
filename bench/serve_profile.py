"""Where the predictor's time goes, per sentence: the profile behind the serving figures (issue 13).

    python -m bench.serve_profile [--preset bert-tiny] [--batch-sizes 64,256] [--threads N]
                                  [--model-dir RUN] [--repeats 20] [--trace]

For each batch size, `FillMaskPredictor` answers that many ~24-word one-[MASK] sentences (the
request of bench/serve_wrk.py) `--repeats` times and reports microseconds per sentence in each
stage, one after the other: `encode` (validate and tokenize), `run` (tensors, forward pass, softmax
and top-k, the copy back: `launch` then `collect`, which waits for the device, so the device's time
is inside it; the record splits it), `format` (the pipeline's candidates) and `json` (`orjson` of
the answers). Then the overlapped figure: `predict` on `--repeats` batches in one call, where the
tokenizing and formatting of one batch overlap the device's work on another. Then the same batch
under `cProfile` (the Python functions by own time) and `torch.profiler` (operators by own CPU
time, and by CUDA time on a GPU); `--trace` also writes a Chrome trace of three `run` calls.
`--collapsed FILE ...` only summarizes py-spy samples (`bench/serve_wrk.py --py-spy` writes them)
as inclusive and own shares.

Prints one JSON record per batch size (`{"bench": "serve-profile", ...}`, also appended through
bench/records.py) and writes the tables to `$OUT/serve_profile-<preset>-b<N>.txt` (or a temporary
folder, named on stdout). A random-weight artifact of the preset's shape is made unless
`--model-dir` names a run folder.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from bench.records import append_records
from bench.serve_bench import TEXT, make_run
from bench.serve_wrk import base_record, load_average
from microbert.predict import FillMaskPredictor

STAGES = ("encode", "run", "format", "json")


def stage_times(
    predictor: FillMaskPredictor, texts: list[str], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds per sentence in each stage, the mean over `repeats` batches, one stage after the
    other, on the path `predict` and the service take (a batch as one `InputGroup`); and `run` split
    into `launch` (the host's part: inputs, queueing the device's work) and `collect` (waiting for
    the device, then slicing). `format` includes the per-input views it needs."""
    totals = dict.fromkeys(STAGES, 0.0)
    split = {"launch": 0.0, "collect": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        group = predictor.encoder.encode_group(texts)
        t1 = time.perf_counter()
        pending = predictor.launch_groups([group])
        t_launched = time.perf_counter()
        (output,) = predictor.collect_groups(pending)
        t2 = time.perf_counter()
        results = predictor.format(list(zip(group.inputs(), output.outputs(), strict=True)))
        t3 = time.perf_counter()
        orjson.dumps(results)
        t4 = time.perf_counter()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[stage] += seconds
        split["launch"] += t_launched - t1
        split["collect"] += t2 - t_launched

    def per_sentence(total: float) -> float:
        return round(total / repeats / len(texts) * 1e6, 1)

    return (
        {stage: per_sentence(total) for stage, total in totals.items()},
        {part: per_sentence(total) for part, total in split.items()},
    )


def overlapped_time(predictor: FillMaskPredictor, texts: list[str], repeats: int) -> float:
    """Microseconds per sentence of `predict` (and `orjson`) on `repeats` batches' texts in one call,
    where the predictor overlaps tokenizing and formatting with the device: the figure a user of
    `predict(list, batch_size=...)` gets."""
    many = texts * repeats
    predictor.predict(many[: 2 * len(texts)], batch_size=len(texts))  # warm-up
    start = time.perf_counter()
    orjson.dumps(predictor.predict(many, batch_size=len(texts)))
    return round((time.perf_counter() - start) / len(many) * 1e6, 1)


def python_profile(predictor: FillMaskPredictor, texts: list[str], repeats: int) -> str:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeats):
        predictor.predict(texts, batch_size=len(texts))
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def operator_profile(predictor: FillMaskPredictor, texts: list[str], repeats: int, trace: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    group = predictor.encoder.encode_group(texts)
    activities = [ProfilerActivity.CPU]
    cuda = predictor.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            predictor.collect_groups(predictor.launch_groups([group]))
    averages = prof.key_averages(group_by_input_shape=True)
    tables = ["by own CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    if cuda:
        tables += ["by CUDA time:", averages.table(sort_by="self_device_time_total", row_limit=25)]
    if trace is not None:
        with profile(activities=activities) as traced:
            for _ in range(3):
                predictor.collect_groups(predictor.launch_groups([group]))
        traced.export_chrome_trace(str(trace))
    return "\n".join(tables)


def _thread_label(frames: list[str]) -> str:
    """`pid N (command) thread T` from py-spy's leading labels: the innermost process (with
    --subprocesses a worker's stack starts with its parent's label too) and the thread."""
    processes = [f for f in frames[:4] if f.startswith("process ")]
    thread = next((f for f in frames[:4] if f.startswith("thread")), "")
    if not processes:
        return thread or "?"
    pid, _, command = processes[-1].removeprefix("process ").partition(":")
    words = command.strip('"').split()
    command = " ".join(w for w in words[1:4] if not w.startswith("-B"))  # past the interpreter's path
    return f"pid {pid} ({command[:40]}) {thread}"


def summarize_collapsed(
    path: Path, rows: int = 40, sampled_s: float | None = None, rate_hz: float = 50
) -> str:
    """A py-spy `--format raw` file (collapsed stacks, `frame;frame;... count`) as shares of all samples:
    functions by inclusive share (time in them and what they call) and frames by own share. With
    `sampled_s` (how long py-spy sampled at `rate_hz`) also each thread's busy cores: py-spy records
    only threads that run, so a thread's samples over rate × seconds is the share of a core it used."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, samples = stack.split(";"), int(count)
        total += samples
        own[frames[-1]] += samples
        threads[_thread_label(frames)] += samples
        for name in {frame.split(" (")[0] for frame in frames}:
            if not name.startswith(("process ", "thread")):  # py-spy's labels, not frames
                inclusive[name] += samples
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples", "inclusive:"]
    if sampled_s:
        cores = rate_hz * sampled_s
        busy = [f"{n / cores:5.2f} cores  {name}" for name, n in threads.most_common(rows // 2)]
        lines[1:1] = [f"busy (samples / ({rate_hz:g} Hz x {sampled_s:g} s)):", *busy]
    lines += [f"{100 * n / total:5.1f}% {name}" for name, n in inclusive.most_common(rows)]
    lines += ["own:"] + [f"{100 * n / total:5.1f}% {name}" for name, n in own.most_common(rows // 2)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collapsed", type=Path, nargs="+", help="only summarize these py-spy raw files")
    parser.add_argument(
        "--sampled-s", type=float, help="with --collapsed: seconds sampled at 50 Hz (busy cores per thread)"
    )
    parser.add_argument("--preset", default="bert-tiny")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--model-dir", type=Path, help="profile this run folder instead of a random-weight one"
    )
    parser.add_argument("--trace", action="store_true", help="also a Chrome trace of three run() calls")
    args = parser.parse_args()
    if args.collapsed:
        for path in args.collapsed:
            print(summarize_collapsed(path, sampled_s=args.sampled_s))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="serve-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is not None:
            artifact = args.model_dir / "export" / (args.model_dir / "export" / "latest").read_text().strip()
        else:
            artifact = make_run(Path(tmp) / "run", args.preset)
        predictor = FillMaskPredictor.from_pretrained(
            artifact, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32
        )
        records: list[dict[str, Any]] = []
        for batch_size in (int(b) for b in args.batch_sizes.split(",") if b):
            texts = [
                TEXT.replace("across the [MASK]", f"across the [MASK] {i % 97}") for i in range(batch_size)
            ]
            predictor.predict(texts, batch_size=batch_size)  # warm-up (and CUDA graph capture)
            before = load_average()
            stages, run_split = stage_times(predictor, texts, args.repeats)
            overlapped = overlapped_time(predictor, texts, args.repeats)
            name = f"serve_profile-{args.preset}-b{batch_size}"
            report = [
                f"{args.preset}, batch {batch_size}, {device}, torch threads {torch.get_num_threads()}",
                "microseconds per sentence: " + json.dumps(stages),
                "run, split: " + json.dumps(run_split),
                f"overlapped (predict on {args.repeats} batches in one call): {overlapped} us/sentence",
                "",
                "cProfile of predict(), by own time:",
                python_profile(predictor, texts, max(1, args.repeats // 2)),
                "torch.profiler of run():",
                operator_profile(
                    predictor,
                    texts,
                    max(1, args.repeats // 2),
                    out_dir / f"{name}.trace.json" if args.trace else None,
                ),
            ]
            (out_dir / f"{name}.txt").write_text("\n".join(report))
            record = {
                **base_record(argparse.Namespace(preset=args.preset), device),
                "bench": "serve-profile",
                "batch_size": batch_size,
                "torch_threads": torch.get_num_threads(),
                "us_per_sentence": stages,
                "sentences_per_second": round(1e6 / sum(stages.values()), 1),
                "run_split_us_per_sentence": run_split,
                "overlapped_us_per_sentence": overlapped,  # predict(list): host and device overlapped
                "overlapped_sentences_per_second": round(1e6 / overlapped, 1),
                "load_average_before": before,
                "load_average_after": load_average(),
                "tables": str(out_dir / f"{name}.txt"),
            }
            print(json.dumps(record), flush=True)
            records.append(record)
        append_records(records, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
