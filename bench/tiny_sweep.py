"""The cpu profile's regime, per token, on whatever device is fast: which recipe leaves the plateau.

    python bench/tiny_sweep.py --variants bench/tiny_variants.json --procs 8 --out /tmp/tiny

The cpu profile must learn on 2 cores in minutes, i.e. within some 10–20 M tokens. Whether a
recipe leaves the unigram plateau within that many tokens does not depend on the device, so the
question is asked on a GPU, where a bert-tiny step takes milliseconds: a plain PyTorch loop over
MicroBERT's own model, masking, rows and evaluation (the trainer's AdamW settings, linear warm-up
then linear decay), several processes sharing the card. Each variant is a JSON object of overrides
(see `DEFAULTS`); its held-out score on *Persuasion* (`embedded-heldout`, never trained on) is taken
every `eval_every_tokens`. The recipe found here is then checked with the real trainer on 2 cores.
Records `{"bench": "tiny_sweep", "name", "variant", "curve": [{tokens, accuracy, baseline, ...}],
"tokens_per_second"}` go to `--out`/tiny_sweep.jsonl.

The same loop asks the GPU profiles' question per step (`bench/step_variants.json`): a preset's shape
on IMDB rows, bf16, each profile's peak LR, warm-up and schedule horizon, MicroBERT's model against
`transformers`' `BertForMaskedLM` with `BertConfig`'s defaults (dropout 0.1, its init) under the
same optimizer, schedule, batches and masks, scored on IMDB's held-out rows.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULTS: dict[str, Any] = {
    "layers": 2,
    "heads": 2,
    "hidden": 128,
    "intermediate": None,  # None: 4 × hidden
    "vocab": 4096,
    "seq": 64,
    "batch": 128,
    "lr": 1e-3,
    "warmup": 0.06,
    "tokens": 16e6,
    "mlm": 0.15,
    "corruption": "bert",  # or "mask": every chosen token becomes [MASK]
    "pos_init": "normal",
    "pos_scale": 1.0,  # or "sinusoidal"; RMS = init_std × pos_scale
    "init_std": 0.02,
    "wd": 0.01,
    "beta2": 0.98,
    "schedule": "linear",  # or "constant" (then decay over the last 20%)
    "seed": 0,
    "eval_every_tokens": 1e6,
    # the GPU profiles' question, per step (bench/step_variants.json): a preset's shape on IMDB rows
    "shape": None,  # a preset name: its layers, heads, widths and vocabulary replace those above
    "dataset": "embedded",  # or "imdb" (MICROBERT_DATASET_IMDB), scored on its held-out reviews
    "impl": "microbert",  # or "hf": transformers' BertForMaskedLM, BertConfig's defaults and init
    "dropout": 0.0,  # "hf" takes BertConfig's 0.1 unless given
    "bf16": False,  # autocast, as the trainer runs on a GPU
    "steps": None,  # a step count instead of `tokens`
    "horizon": None,  # the schedule's length in steps (a profile's max_steps), when longer than the run
    "eval_every_steps": None,
    "resid_scale": 1.0,  # or "depth": 1/sqrt(2 x layers), GPT-2's scaled init of the residual outputs
    "unigram_bias": False,  # start the MLM head's bias at the training data's log unigram frequency
    "compile": False,  # torch.compile the model (fewer, fused kernels: a large shape at a large batch)
}


def run_variant(variant: dict[str, Any], device: str, cache_dir: str | None) -> dict[str, Any]:
    import numpy as np
    import torch

    from microbert.config import ModelConfig
    from microbert.data.masking import mask_tokens
    from microbert.evaluate import evaluate
    from microbert.model import (
        BertForMaskedLM,
        init_output_bias_unigram,
        init_position_embeddings,
        scale_residual_branches,
    )

    v = _resolved(variant)
    torch.manual_seed(v["seed"])
    data, held_rows = _data(v, cache_dir)
    config = ModelConfig(
        vocab_size=data.tokenizer.get_vocab_size(),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        hidden_size=v["hidden"],
        intermediate_size=v["intermediate"] or 4 * v["hidden"],
        max_position_embeddings=max(512, v["seq"]),
        initializer_range=v["init_std"],
        hidden_dropout_prob=v["dropout"],
        attention_probs_dropout_prob=v["dropout"],
    )
    if v["impl"] == "hf":
        from transformers import BertConfig
        from transformers import BertForMaskedLM as HfBertForMaskedLM

        hf_config = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "max_position_embeddings")}  # fmt: skip
        model = HfBertForMaskedLM(BertConfig(**hf_config))  # dropout, init: BertConfig's defaults
    else:
        model = BertForMaskedLM(config)
        init_position_embeddings(model, v["pos_init"], v["init_std"] * v["pos_scale"])
        scale = v["resid_scale"]
        if scale == "depth":
            scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
        if scale != 1.0:
            scale_residual_branches(model, float(scale))
        if v["unigram_bias"]:
            init_output_bias_unigram(model, data.train, sorted(data.special_token_ids))
    model.to(device)
    forward = torch.compile(model) if v["compile"] else model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": v["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=v["lr"],
        betas=(0.9, v["beta2"]),
        eps=1e-6,
        fused=device.startswith("cuda"),
    )
    steps = int(v["steps"] or max(1, int(v["tokens"] // (v["batch"] * v["seq"]))))
    horizon = int(v["horizon"] or steps)
    warmup = int(v["warmup"] * horizon) if v["warmup"] < 1 else int(v["warmup"])

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if v["schedule"] == "constant":
            tail = int(0.8 * horizon)
            return 1.0 if step < tail else max(0.0, (horizon - step) / max(1, horizon - tail))
        if v["schedule"] == "cosine":  # the trainer's: down to 10% of the peak
            progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, (horizon - step) / max(1, horizon - warmup))

    specials = data.special_token_ids
    mask_id = data.mask_token_id
    rows = torch.from_numpy(data.train.astype(np.int64))
    gen = torch.Generator().manual_seed(v["seed"])
    dev_gen = torch.Generator(device=device).manual_seed(v["seed"])
    eval_every = int(v["eval_every_steps"] or max(1, v["eval_every_tokens"] // (v["batch"] * v["seq"])))
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bool(v["bf16"]))
    curve: list[dict[str, Any]] = []
    order = torch.randperm(len(rows), generator=gen)
    cursor, started, train_s = 0, time.perf_counter(), 0.0
    for step in range(steps):
        if cursor + v["batch"] > len(order):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        batch = rows[order[cursor : cursor + v["batch"]]].to(device, non_blocking=True)
        cursor += v["batch"]
        inputs, labels = mask_tokens(
            batch,
            vocab_size=config.vocab_size,
            mask_token_id=mask_id,
            special_token_ids=specials,
            mlm_probability=v["mlm"],
            generator=dev_gen,
        )
        if v["corruption"] == "mask":
            inputs = torch.where(labels != -100, mask_id, batch)
        for group in opt.param_groups:
            group["lr"] = v["lr"] * lr_at(step)
        with autocast:
            loss = forward(input_ids=inputs, attention_mask=(batch != 0).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            train_s += time.perf_counter() - started
            with autocast:
                score = evaluate(
                    model,
                    held_rows,
                    special_token_ids=specials,
                    mask_token_id=mask_id,
                    batch_size=128,
                    device=device,
                )
            print(f"{variant.get('name', '?')} step {step + 1}: {score.accuracy:.2%} "
                  f"({score.over_baseline:.2f}x) loss {float(loss.detach()):.3f}", flush=True)  # fmt: skip
            curve.append(
                {
                    "step": step + 1,
                    "tokens": (step + 1) * v["batch"] * v["seq"],
                    "loss": float(loss.detach()),
                    "accuracy": round(score.accuracy, 4),
                    "baseline": round(score.baseline_accuracy, 4),
                    "over": round(score.over_baseline, 2),
                    "top5": round(score.top5_accuracy, 4),
                }
            )
            started = time.perf_counter()
    return {
        "bench": "tiny_sweep",
        "name": variant.get("name", "?"),
        "variant": v,
        "device": device,
        "curve": curve,
        "tokens_per_second": round(steps * v["batch"] * v["seq"] / max(train_s, 1e-9)),
    }


def _resolved(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant over the defaults; a `shape` brings its preset's sizes, "hf" BertConfig's dropout."""
    v = {**DEFAULTS, **variant}
    if v["shape"]:
        from microbert.config import get_preset

        preset = get_preset(v["shape"])
        v.update(layers=preset.num_hidden_layers, heads=preset.num_attention_heads,
                 hidden=preset.hidden_size, intermediate=preset.intermediate_size,
                 vocab=preset.vocab_size)  # fmt: skip
        v.update(
            {k: variant[k] for k in ("layers", "heads", "hidden", "intermediate", "vocab") if k in variant}
        )
    if v["impl"] == "hf" and "dropout" not in variant:
        v["dropout"] = 0.1
    return v


def _data(v: dict[str, Any], cache_dir: str | None) -> tuple[Any, Any]:
    """The training rows and 2,048 held-out rows: *Persuasion* for the embedded corpus, else IMDB's."""
    import numpy as np

    from microbert.data.prepare import prepare_dataset

    data = prepare_dataset(v["dataset"], seq_len=v["seq"], vocab_size=v["vocab"], cache_dir=cache_dir)
    if v["dataset"] == "embedded":
        heldout = prepare_dataset("embedded-heldout", seq_len=v["seq"], vocab_size=v["vocab"],
                                  tokenizer=data.tokenizer, cache_dir=cache_dir)  # fmt: skip
        return data, np.concatenate([heldout.train, heldout.eval])[:2048]
    return data, data.eval[:2048]


def _worker(args: tuple[list[dict[str, Any]], str, str | None, str]) -> None:
    variants, device, cache_dir, out = args
    for variant in variants:
        try:
            record = run_variant(variant, device, cache_dir)
        except Exception as exc:  # one broken variant must not stop the sweep
            record = {"bench": "tiny_sweep", "name": variant.get("name"), "error": repr(exc)}
        with open(out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        best = max((p["over"] for p in record.get("curve", [])), default=0)
        last = record.get("curve", [{}])[-1] if record.get("curve") else {}
        print(
            f"{record['name']:<28} tok/s {record.get('tokens_per_second', 0):>10,} "
            f"last {last.get('over', '-')}x @ {last.get('tokens', 0) / 1e6:.1f}M best {best}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", required=True, help="JSON list of variant objects (each with a name)")
    parser.add_argument("--procs", type=int, default=1, help="worker processes sharing the device")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="/tmp/tiny_sweep")
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: run only the variants whose name has one"
    )
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = json.loads(Path(args.variants).read_text())
    if args.only:  # a device call's share of a sweep that needs several calls
        wanted = [w for w in args.only.split(",") if w]
        variants = [v for v in variants if any(w in v["name"] for w in wanted)]
        if not variants:
            raise SystemExit(f"--only {args.only!r} matches no variant's name in {args.variants}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = str(Path(args.out) / "tiny_sweep.jsonl")
    prepared = set()  # prepare every cache entry once, up front, before the workers share it
    for v in map(_resolved, variants):
        if (v["dataset"], v["seq"], v["vocab"]) not in prepared:
            prepared.add((v["dataset"], v["seq"], v["vocab"]))
            _data(v, args.cache_dir)
    shares = [variants[i :: args.procs] for i in range(args.procs)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.get_context("spawn").Pool(args.procs) as pool:
        pool.map(_worker, [(s, device, args.cache_dir, out) for s in shares if s])


if __name__ == "__main__":
    main()
