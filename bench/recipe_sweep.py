"""Recipe sweep: `microbert-train` variants side by side, each scored through `transformers`.

    python bench/recipe_sweep.py --grid cpu --parallel 6 --cores-per-run 2 --out /tmp/sweep
    python bench/recipe_sweep.py --variants my_variants.json --parallel 4

Each variant is a name and extra `microbert-train` flags on top of a profile (a grid in this file,
or a JSON list of {"name", "flags"}). Runs are real trainer runs (`python -m train ... --resume
never`), started `--parallel` at a time; with `--cores-per-run N` each is pinned to its own N cores
(`taskset`), so several CPU runs on a large host behave like runs on the 2-core machine of the
`cpu` profile. Afterwards every export is scored by `bench/scoring.py` on each `--on` target.
Records `{"bench": "recipe", "name", "flags", "steps", "tokens", "train_seconds",
"tokens_per_second", "scores": {target: {...}}}` go to `bench/results/` (and `$OUT`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.records import append_records, commit

REPO = Path(__file__).resolve().parents[1]

# The cpu profile's questions: what escapes the unigram plateau within a 2-core budget.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        {"name": "profile", "flags": []},
        {"name": "lr5e-3", "flags": ["--lr", "5e-3"]},
        {"name": "b128-lr4e-3", "flags": ["--batch-size", "128", "--lr", "4e-3"]},
        {"name": "mlm15", "flags": ["--mlm-probability", "0.15"]},
        {"name": "seq128", "flags": ["--seq-len", "128"]},
        {"name": "wsd", "flags": ["--schedule", "wsd"]},
    ],
}


def run_variant(variant: dict[str, Any], args: argparse.Namespace, cores: str | None) -> subprocess.Popen:
    run_dir = Path(args.out) / "runs" / variant["name"]
    command = [sys.executable, "-m", "train", "--profile", args.profile, "--run-dir", str(run_dir),
               "--resume", "never", *args.common, *variant["flags"]]  # fmt: skip
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    env = {**os.environ, "MICROBERT_NO_BAR": "1", "OMP_NUM_THREADS": str(args.cores_per_run or "")}
    if not args.cores_per_run:
        env.pop("OMP_NUM_THREADS")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (Path(args.out) / f"{variant['name']}.log").open("w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def record_for(variant: dict[str, Any], args: argparse.Namespace, rc: int) -> dict[str, Any]:
    from bench.scoring import score

    run_dir = Path(args.out) / "runs" / variant["name"]
    record: dict[str, Any] = {
        "bench": "recipe",
        "name": variant["name"],
        "profile": args.profile,
        "flags": [*args.common, *variant["flags"]],
        "rc": rc,
        "commit": commit(),
    }
    history_path = run_dir / "training_history.json"
    if rc != 0 or not history_path.is_file():
        return record
    history = json.loads(history_path.read_text())
    status = json.loads((run_dir / "status.json").read_text())
    last = history["train"][-1]
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    record.update(
        steps=status["step"],
        tokens=last["tokens_seen"],
        train_seconds=status.get("training_seconds"),
        startup_seconds=status.get("startup_seconds"),
        tokens_per_second=last["tokens_seen"] / max(status.get("training_seconds") or 0.0, 1e-9),
        final_loss=last["loss"],
        seq_len=resolved["train"]["seq_len"],
        trainer_eval=history["eval"][-1] if history["eval"] else None,
    )
    record["scores"] = score(run_dir, args.on, seq_len=record["seq_len"], device=args.score_device)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS))
    parser.add_argument("--variants", help="JSON file: a list of {name, flags}")
    parser.add_argument("--only", help="comma-separated variant names to run")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--common", default="", help="flags added to every variant (one string)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--cores-per-run", type=int, default=0, help="pin each run to this many cores")
    parser.add_argument("--first-core", type=int, default=0, help="the first core to pin runs to")
    parser.add_argument("--on", action="append", help="scoring targets (bench/scoring.py)")
    parser.add_argument("--score-device", default="cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/recipe-sweep"))
    args = parser.parse_args()
    args.common = args.common.split()
    args.on = args.on or ["embedded-heldout:all", "embedded:heldout"]
    variants = GRIDS[args.grid] if args.grid else json.loads(Path(args.variants).read_text())
    if args.only:
        variants = [v for v in variants if v["name"] in args.only.split(",")]
    pending, running, records = list(variants), [], []
    first, width = args.first_core, args.cores_per_run
    free = [f"{first + i * width}-{first + (i + 1) * width - 1}" for i in range(args.parallel)]
    while pending or running:
        while pending and len(running) < args.parallel:
            variant = pending.pop(0)
            cores = free.pop(0) if args.cores_per_run else None
            running.append((variant, cores, run_variant(variant, args, cores), time.time()))
        time.sleep(2)
        for item in list(running):
            variant, cores, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if cores:
                free.append(cores)
            record = record_for(variant, args, proc.returncode)
            record["wall_s"] = round(time.time() - started, 1)
            records.append(record)
            print(json.dumps(record), flush=True)
    append_records(records, "recipe-sweep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
