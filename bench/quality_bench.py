"""Time to quality on one GPU: `microbert-train` against the `transformers` `Trainer`, same data.

    MICROBERT_DATASET_IMDB=imdb_train.jsonl.gz python bench/quality_bench.py --shape bert-mini \
        --budgets 10,40 --impls hf,microbert

Both train from scratch on the same packed rows of MicroBERT's cache (IMDB train, seq 128, the same
WordPiece tokenizer) for a wall-clock budget of training, and both models are then scored the same
way: exported, loaded by `transformers.AutoModelForMaskedLM`, 15% of the tokens of unseen text all
replaced by `[MASK]` (bench/scoring.py) — IMDB's held-out reviews (the training data's kind) and a
book never trained on (`embedded-heldout`, another kind).

- hf: `Trainer` as its documentation recommends for pre-training from scratch — `BertConfig`'s
  defaults (dropout 0.1), bf16, `torch_compile`, fused AdamW (its defaults: betas 0.9/0.999, no
  weight decay), `DataCollatorForLanguageModeling` at 15%, linear warm-up and decay (the Trainer's
  default shape). Its peak LR is the best of `--hf-lrs` at the short budget, found here.
- microbert: `python -m train` (DeepSpeed, ZeRO-1, bf16; the trainer's own defaults: no dropout,
  30% masking, AdamW, cosine) with `--time-budget`; `--mb-variants` name the recipe rows run at the
  short budget, and the best of them goes long.

Budgets run on a clock that starts after the first optimizer step (compilation and warm-up) for
both, and a time-budgeted schedule decays on that clock for both, so each run ends decayed. The
MicroBERT long run evaluates on a cadence; `seconds_to_reach_hf` is read off that curve: the first
training second at which it reaches the HF Trainer's long-budget held-out accuracy. Records
`{"bench": "quality", "impl", "shape", "budget_s", "steps", "tokens", "epochs", "heldout_accuracy",
"baseline_accuracy", "other_accuracy", "seconds_to_reach_hf", ...}` go to `bench/results/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.records import append_records, commit
from bench.scoring import score
from microbert.config import get_preset
from microbert.data import prepare_dataset
from microbert.run_config import WARMUP_SHARE  # the trainer's: both stacks warm up over the same share

REPO = Path(__file__).resolve().parents[1]
SCORE_ROWS = 2048  # rows scored per target (= the trainer's cadence evaluation: 8 batches of 256)

# MicroBERT recipe rows at the short budget: name -> extra flags (the first is the profile default)
MB_VARIANTS = {
    "default": [],
    "lr1e-3": ["--lr", "1e-3"],
    "lr2e-3": ["--lr", "2e-3"],
    "lr2e-4": ["--lr", "2e-4"],
    "mlm15": ["--mlm-probability", "0.15"],
    "dropout0.1": ["--dropout", "0.1"],
    "wsd": ["--schedule", "wsd"],
    "lr2e-4-mlm15": ["--lr", "2e-4", "--mlm-probability", "0.15"],
    "lr3e-4": ["--lr", "3e-4"],
    "posnormal": ["--position-init", "normal"],  # BERT's position init, for the comparison
    "lr2e-4-posnormal": ["--lr", "2e-4", "--position-init", "normal"],
    "lr2e-4-posnormal-wsd": ["--lr", "2e-4", "--position-init", "normal", "--schedule", "wsd"],
    "lr2e-4-sin02": ["--lr", "2e-4", "--position-init-std", "0.02"],
    "lr1e-4": ["--lr", "1e-4"],
    # bert-base at the short budget: more, smaller steps; a longer stable phase; more masked positions
    "lr2e-4-b128": ["--lr", "2e-4", "--batch-size", "128"],
    "lr3e-4-b128": ["--lr", "3e-4", "--batch-size", "128"],
    "lr2e-4-b128-wsd": ["--lr", "2e-4", "--batch-size", "128", "--schedule", "wsd"],
    "lr2e-4-b64-wsd": ["--lr", "2e-4", "--batch-size", "64", "--schedule", "wsd"],
    "lr1.4e-4-b64": ["--lr", "1.4e-4", "--batch-size", "64"],
    "lr2e-4-mlm30": ["--lr", "2e-4", "--mlm-probability", "0.3"],
    "lr1e-4-b64": ["--lr", "1e-4", "--batch-size", "64"],
    "lr1e-4-b32": ["--lr", "1e-4", "--batch-size", "32"],
    # BERT's own starting values for the residual branches and the head's bias (before session 6)
    "bertinit": ["--residual-init", "normal", "--output-bias-init", "zeros"],
    "seed1": ["--seed", "1"],
}


def _time_budget_callback(budget_s: float) -> Any:
    """Stops the Trainer when its clock passes the budget; the clock starts after step 1."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.origin: float | None = None
            self.startup_s = 0.0
            self.started = time.perf_counter()

        def seconds(self) -> float:
            return 0.0 if self.origin is None else time.perf_counter() - self.origin

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.origin is None:
                self.origin = time.perf_counter()
                self.startup_s = self.origin - self.started
            if self.seconds() >= budget_s:
                control.should_training_stop = True
            return control

    return TimeBudget()


def run_hf(shape: str, data: Any, lr: float, budget_s: float, out: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    preset = get_preset(shape)
    config = BertConfig(
        vocab_size=data.tokenizer.get_vocab_size(),
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
    )  # dropout and everything else: BertConfig's defaults
    torch.manual_seed(args.seed)
    model = BertForMaskedLM(config)
    tokenizer = AutoTokenizer.from_pretrained(data.path)
    rows = data.train[: len(data.train)]
    dataset = Dataset.from_dict(
        {"input_ids": rows.tolist(), "attention_mask": (rows != 0).astype("int8").tolist()}
    )
    clock = _time_budget_callback(budget_s)
    gpu = torch.cuda.is_available()  # a CPU run is a smoke test of this script, nothing more
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=gpu)

    def linear_by_time(_step: int) -> float:
        now, warm = clock.seconds(), WARMUP_SHARE * budget_s
        if now < warm:
            return max(now / warm, 1e-3)
        return max(0.0, 1.0 - (now - warm) / (budget_s - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_by_time)
    training_args = TrainingArguments(
        output_dir=str(out / "hf-trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=10**7,
        bf16=gpu,
        torch_compile=gpu,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=4 if gpu else 0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        optimizers=(optimizer, scheduler),
        callbacks=[clock],
    )
    trainer.train()
    steps = trainer.state.global_step
    folder = out / f"hf-{shape}-lr{lr:g}-{budget_s:g}s"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (data.path / name).is_file():
            shutil.copy(data.path / name, folder / name)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "impl": "hf_trainer",
        "lr": lr,
        "steps": steps,
        "training_seconds": round(clock.seconds(), 2),
        "startup_seconds": round(clock.startup_s, 2),
        "final_loss": losses[-1] if losses else None,
        "folder": str(folder),
    }


def run_microbert(
    shape: str, variant: str, budget_s: float, out: Path, args: argparse.Namespace, eval_every: int | None
) -> dict:
    run_dir = out / f"mb-{shape}-{variant}-{budget_s:g}s"
    profile = ["--profile", args.profile] if args.profile else []
    flags = MB_VARIANTS[variant]
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else args.batch_size
    command = [sys.executable, "-m", "train", *profile, "--model", shape, "--dataset",
               args.dataset, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--time-budget", str(budget_s), "--resume", "never", "--run-dir", str(run_dir),
               "--checkpoint-every", "1000000", "--eval-batches", str(SCORE_ROWS // batch),
               "--eval-every", str(eval_every or 1000000), "--log-every", "100", "--seed", str(args.seed),
               *MB_VARIANTS[variant]]  # fmt: skip
    env = {**os.environ, "MICROBERT_NO_BAR": "1"}
    with (out / f"{run_dir.name}.log").open("w") as log:
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"microbert run {run_dir.name} failed (rc {rc}); see {out / run_dir.name}.log")
    status = json.loads((run_dir / "status.json").read_text())
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    history = json.loads((run_dir / "training_history.json").read_text())
    return {
        "impl": "microbert",
        "variant": variant,
        "flags": MB_VARIANTS[variant],
        "steps": status["step"],
        "batch_size": resolved["runtime"]["micro_batch_size"],  # a variant may change it (one GPU)
        "training_seconds": status["training_seconds"],
        "startup_seconds": status["startup_seconds"],
        "final_loss": history["train"][-1]["loss"],
        "curve": [
            {"seconds": e["training_seconds"], "accuracy": e["accuracy"], "step": e["step"]}
            for e in history["eval"]
        ],
        "folder": str(run_dir),
    }


def finish(record: dict, shape: str, budget_s: float, rows: int, args: argparse.Namespace) -> dict:
    scores = score(record.pop("folder"), args.score_on, seq_len=args.seq_len, max_rows=SCORE_ROWS,
                   device="cuda" if _device_name() != "cpu" else "cpu", batch_size=128)  # fmt: skip
    same, other = args.score_on[0], args.score_on[1] if len(args.score_on) > 1 else None
    record.update(
        bench="quality",
        shape=shape,
        budget_s=budget_s,
        tokens=record["steps"] * record.setdefault("batch_size", args.batch_size) * args.seq_len,
        epochs=round(record["steps"] * record["batch_size"] / rows, 2),
        heldout_accuracy=scores[same]["accuracy"],
        heldout_top5=scores[same]["top5_accuracy"],
        baseline_accuracy=scores[same]["baseline_accuracy"],
        other_accuracy=scores[other]["accuracy"] if other else None,
        other_baseline_accuracy=scores[other]["baseline_accuracy"] if other else None,
        scores=scores,
        commit=commit(),
        device=_device_name(),
    )
    print(json.dumps({k: v for k, v in record.items() if k not in ("scores", "curve")}), flush=True)
    return record


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="bert-mini")
    parser.add_argument("--budgets", default="10,40", help="short,long training seconds")
    parser.add_argument("--impls", default="hf,microbert")
    parser.add_argument("--hf-lrs", default="1e-4,5e-4,1e-3")
    parser.add_argument("--hf-lr", type=float, help="skip the HF sweep: use this LR for the long run")
    parser.add_argument(
        "--mb-variants", default="default", help=f"short-budget rows: {','.join(MB_VARIANTS)}"
    )
    parser.add_argument("--profile", help="a profile under the flags (default: the trainer's own defaults)")
    parser.add_argument("--dataset", default="imdb")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-points", type=int, default=12, help="evaluations during the long MicroBERT run"
    )
    parser.add_argument("--score-on", default="imdb:heldout,embedded-heldout:all")
    parser.add_argument("--hf-target", type=float, help="the HF long-budget accuracy, when measured earlier")
    parser.add_argument(
        "--long-only", action="store_true", help="MicroBERT: only the long run, first variant"
    )
    parser.add_argument(
        "--short-only", action="store_true", help="only the short rows (both stacks), no long run"
    )
    parser.add_argument(
        "--steps-per-second", type=float, default=20.0, help="with --long-only: for the cadence"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/quality"))
    args = parser.parse_args()
    args.score_on = args.score_on.split(",")
    short, long = (float(b) for b in args.budgets.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    impls = args.impls.split(",")
    data = prepare_dataset(args.dataset, seq_len=args.seq_len, vocab_size=get_preset(args.shape).vocab_size)
    rows = len(data.train)
    records: list[dict] = []

    def keep(record: dict) -> dict:
        records.append(record)
        append_records([record], _device_name())
        return record

    def attempt(what: str, run: Any) -> dict | None:
        """One run: a failure is recorded and printed, and the bench goes on with the next."""
        try:
            return keep(run())
        except Exception as exc:  # a benchmark call must bring back whatever it could measure
            print(f"FAILED {what}: {type(exc).__name__}: {exc}", flush=True)
            keep({"bench": "quality", "shape": args.shape, "failed": what, "error": str(exc)[-2000:]})
            return None

    hf_target = args.hf_target
    if "hf" in impls:
        best_lr = args.hf_lr
        if best_lr is None:
            sweep = [
                attempt(
                    f"hf lr {lr:g}",
                    lambda lr=lr: finish(
                        run_hf(args.shape, data, lr, short, out, args), args.shape, short, rows, args
                    ),
                )
                for lr in map(float, args.hf_lrs.split(","))
            ]
            done = [r for r in sweep if r is not None]
            # ties (several LRs still at the constant guess) go to the lower training loss
            best = (
                max(done, key=lambda r: (r["heldout_accuracy"], -(r["final_loss"] or 99))) if done else None
            )
            best_lr = best["lr"] if best else 5e-4
        if not args.short_only:
            hf_long = attempt(
                "hf long",
                lambda: finish(
                    run_hf(args.shape, data, best_lr, long, out, args), args.shape, long, rows, args
                ),
            )
            hf_target = hf_long["heldout_accuracy"] if hf_long else hf_target
    if "microbert" in impls:
        variants = args.mb_variants.split(",")
        shorts = []
        for variant in [] if args.long_only else variants:
            record = attempt(
                f"microbert {variant}",
                lambda v=variant: finish(
                    run_microbert(args.shape, v, short, out, args, None), args.shape, short, rows, args
                ),
            )
            if record is not None:
                shorts.append(record)
        # ties (several runs still at the constant guess) go to the lower training loss
        best = max(shorts, key=lambda r: (r["heldout_accuracy"], -r["final_loss"])) if shorts else None
        if args.long_only:
            best = {"variant": variants[0], "steps": args.steps_per_second, "training_seconds": 1.0}
        if best is not None and not args.short_only:
            steps_per_second = best["steps"] / max(best["training_seconds"], 1e-9)
            eval_every = max(1, math.floor(steps_per_second * long / args.eval_points))

            def long_run() -> dict:
                mb_long = run_microbert(args.shape, best["variant"], long, out, args, eval_every)
                record = finish(mb_long, args.shape, long, rows, args)
                if hf_target:
                    reached = [p["seconds"] for p in record["curve"] if p["accuracy"] >= hf_target]
                    record["hf_target_accuracy"] = hf_target
                    record["seconds_to_reach_hf"] = reached[0] if reached else None
                return record

            attempt("microbert long", long_run)
    keys = ("impl", "variant", "lr", "budget_s", "steps", "epochs", "heldout_accuracy", "baseline_accuracy",
            "other_accuracy", "seconds_to_reach_hf")  # fmt: skip
    summary = [{k: r.get(k) for k in (*keys, "failed")} for r in records]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
