"""Training throughput: MicroBERT's DeepSpeed step against Hugging Face `BertForMaskedLM`, one run.

    python bench/train_bench.py [--shapes bert-base,bert-mini,v4] [--impls microbert,hf_transformers]
    deepspeed --num_gpus 2 bench/train_bench.py --shapes bert-base --impls microbert   # scaling

Both implementations train on the same batches: packed sequences from MicroBERT's shard cache
(the embedded corpus, tokenized with a WordPiece vocabulary of the shape's size), read by
`ShardLoader` and masked on the GPU by `mask_tokens` (15%). Each runs `--warmup` steps, then
`--steps` timed steps with a CUDA synchronisation only at both ends.

- microbert: `BertForMaskedLM` in the DeepSpeed engine (ZeRO stage 1, bf16, client fused AdamW),
  MLM head on a fixed number of slots holding the masked positions, the model compiled with
  `torch.compile` (`--compile-mode reduce-overhead` adds CUDA graphs).
- hf_transformers: `transformers.BertForMaskedLM` (SDPA attention), bf16 autocast, fused AdamW,
  the better of eager and `torch.compile`.

Tokens/s counts non-padding tokens of the global batch. MFU = tokens/s × (6·N + 12·L·d·S) / peak,
N = encoder matmul weights + MLM transform + d·V, peak = the card's datasheet dense bf16 rate from
the trainer's own table (`train.reporting.PEAK_FLOPS`: 989 TFLOP/s for an H100 or H200), so the MFU
here and in `train.log` divide by the same figure; `--peak-tflops` overrides it (e.g. a measured
matmul peak, about 790 on an H200), and each record says which figure it used (`peak_tflops`).
Records are appended to `bench/results/<date>-<gpu>.json` (and `$OUT` when set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/train_bench.py` or the deepspeed launcher: repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.records import append_records, commit
from microbert.config import ModelConfig, get_preset
from microbert.data import ShardLoader, mask_tokens, prepare_dataset
from microbert.model import BertForMaskedLM, masked_slots_for
from train.reporting import peak_flops as trainer_peak_flops

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    config: ModelConfig
    seq_len: int
    batch_size: int


SHAPES = {
    "bert-base": Shape("bert-base", get_preset("bert-base"), 128, 256),
    "bert-mini": Shape("bert-mini", get_preset("bert-mini"), 128, 256),
    "v4": Shape("v4", get_preset("hf-xl"), 256, 96),
}


def peak_flops(device_name: str, override: float | None) -> float:
    """The figure MFU divides by: `--peak-tflops`, else the trainer's datasheet table."""
    if override:
        return override * 1e12
    peak = trainer_peak_flops(device_name)
    if peak is None:
        raise SystemExit(f"no datasheet peak for {device_name!r}: pass --peak-tflops")
    return peak


def rank_and_world() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def make_batches(shape: Shape, config: ModelConfig, device: torch.device, rank: int, world: int, seed: int):
    data = prepare_dataset("embedded", seq_len=shape.seq_len, vocab_size=config.vocab_size)
    vocab = data.tokenizer.get_vocab_size()
    mask_token_id, special_token_ids = data.mask_token_id, data.special_token_ids
    loader = ShardLoader(
        data.train, batch_size=shape.batch_size, seed=seed, rank=rank, world_size=world, device=device
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + rank)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = next(loader)
        masked, labels = mask_tokens(
            input_ids,
            vocab_size=vocab,
            mask_token_id=mask_token_id,
            special_token_ids=special_token_ids,
            generator=generator,
        )
        return masked, attention_mask, labels

    return next_batch, config.replace(vocab_size=max(vocab, config.vocab_size))


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, float(loss)


def bench_microbert(shape: Shape, args: argparse.Namespace) -> dict:
    import deepspeed

    rank, world, local_rank = rank_and_world()
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    deepspeed.init_distributed()
    next_batch, config = make_batches(shape, shape.config, device, rank, world, args.seed)
    torch.manual_seed(args.seed)
    model = BertForMaskedLM(config.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    if not args.no_compile and args.compile_scope != "flat":
        target = model.bert if args.compile_scope == "encoder" else model
        target.compile(mode=args.compile_mode)
    if args.flat:
        from train.flat import FlatParameters

        model = FlatParameters(model)
        if not args.no_compile and args.compile_scope == "flat":
            model.compile(mode=args.compile_mode)  # the views into the flat parameters in the graph
    if args.client_clip:
        from train.optim import ClippedAdamW

        optimizer = ClippedAdamW(
            model.parameters(), max_grad_norm=1.0, lr=1e-4, weight_decay=0.01, fused=True
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": shape.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        # bf16 needs no loss scaling, so no per-parameter inf/NaN scan (and its host sync) per step.
        "bf16": {"enabled": True, "check_grad_overflow": False},
        # One gradient bucket, no overlap machinery: on one GPU (and NVLink pairs) the reduction is
        # cheap and the per-bucket host work is not (bert-mini: 1.12 -> 1.58 M tokens/s on an H100).
        "zero_optimization": {
            "stage": 1,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "reduce_bucket_size": 500_000_000,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.client_clip:  # the optimizer clips; DeepSpeed computes no norm
        ds_config["gradient_clipping"] = 0.0
        ds_config["zero_optimization"]["compute_grad_norm"] = False
        ds_config["zero_allow_untested_optimizer"] = True  # an AdamW subclass
    for key, value in json.loads(args.ds_extra).items():
        ds_config[key] = {**ds_config.get(key, {}), **value} if isinstance(value, dict) else value
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    slots = None if args.exact_head else masked_slots_for(shape.batch_size * shape.seq_len, 0.15)
    graphs = args.compile_mode == "reduce-overhead"
    overflow = torch.zeros((), dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        input_ids, attention_mask, labels = next_batch()
        out = engine(input_ids, attention_mask, labels=labels, masked_slots=slots)
        engine.backward(out.loss)
        engine.step()
        if slots is not None:
            overflow.add_((out.num_masked - slots).clamp(min=0))
        return out.loss.detach().clone()

    with sdpa_backend(args.sdpa_backend):
        elapsed, loss = time_steps(step, args.warmup, args.steps)
        if args.profile:
            profile(step, f"microbert-{shape.name}")
    if int(overflow):
        print(f"warning: {int(overflow)} masked positions did not fit {slots} slots", flush=True)
    return {"elapsed": elapsed, "loss": loss, "world": world, "config": config, "slots": slots}


def sdpa_backend(name: str | None):
    """A context that pins scaled_dot_product_attention to one backend (for the compile as well)."""
    import contextlib

    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(backends[name])


def bench_hf(shape: Shape, args: argparse.Namespace, compiled: bool) -> dict:
    import transformers

    device = torch.device("cuda", 0)
    next_batch, config = make_batches(shape, shape.config, device, 0, 1, args.seed)
    torch.manual_seed(args.seed)
    hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="sdpa")
    model = transformers.BertForMaskedLM(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    forward = torch.compile(model) if compiled else model

    def step() -> torch.Tensor:
        input_ids, attention_mask, labels = next_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    elapsed, loss = time_steps(step, args.warmup, args.steps)
    if args.profile:
        profile(step, f"hf-{shape.name}-{'compile' if compiled else 'eager'}")
    return {"elapsed": elapsed, "loss": loss, "world": 1, "config": config}


def profile(step: Callable[[], torch.Tensor], name: str, steps: int = 5) -> None:
    """A torch.profiler table of a few steady-state steps, to $OUT (or bench/results)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    table += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out / f"profile-{name}.txt").write_text(table)


def record(
    shape: Shape, impl: str, result: dict, args: argparse.Namespace, extra: dict | None = None
) -> dict:
    config: ModelConfig = result["config"]
    world = result["world"]
    tokens = shape.batch_size * shape.seq_len * world * args.steps  # packed: every position is a token
    tokens_per_second = tokens / result["elapsed"]
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    mfu = tokens_per_second * config.training_flops_per_token(shape.seq_len) / (peak * world)
    return {
        "bench": "train",
        "shape": shape.name,
        "impl": impl,
        "device": name,
        "gpus": world,
        "batch_size": shape.batch_size,
        "seq_len": shape.seq_len,
        "tokens_per_second": round(tokens_per_second),
        "mfu": round(mfu, 4),
        "peak_tflops": round(peak / 1e12, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": round(result["loss"], 4),
        "torch": torch.__version__,
        "commit": commit(),
        "date": dt.date.today().isoformat(),
        **(extra or {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="MicroBERT vs transformers training throughput")
    parser.add_argument("--shapes", default="bert-base,bert-mini,v4")
    parser.add_argument("--impls", default="microbert,hf_transformers")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="microbert: run the encoder eagerly")
    parser.add_argument("--hf-modes", default="eager,compile", help="which transformers modes to try")
    parser.add_argument("--ds-extra", default="{}", help="JSON merged into the DeepSpeed config")
    parser.add_argument("--batch-size", type=int, default=None, help="override the shape's batch")
    parser.add_argument("--flat", action="store_true", help="microbert: one flat parameter for DeepSpeed")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)"
    )
    parser.add_argument("--client-clip", action="store_true", help="microbert: clip in the optimizer")
    parser.add_argument(
        "--compile-scope",
        choices=("flat", "model", "encoder"),
        default="flat",
        help="microbert: compile the flat-parameter wrapper (with --flat), the model, or the encoder",
    )
    parser.add_argument("--sdpa-backend", choices=("flash", "efficient", "cudnn", "math"), default=None)
    parser.add_argument("--exact-head", action="store_true", help="microbert: head on the exact masked set")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table per run")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU's divisor per GPU (default: the datasheet)"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    # One process without the launcher: DeepSpeed needs the rendezvous variables or it tries MPI.
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ):
        os.environ.setdefault(key, value)
    rank, _, _ = rank_and_world()
    peak_flops(torch.cuda.get_device_name(0), args.peak_tflops)  # an unknown card stops here, not after a run
    records = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if args.batch_size:
            shape = Shape(shape.name, shape.config, shape.seq_len, args.batch_size)
        for impl in args.impls.split(","):
            if impl == "microbert":
                variant = {
                    "compiled": not args.no_compile,
                    "compile_mode": args.compile_mode or "default",
                    "compile_scope": args.compile_scope,
                    "sdpa_backend": args.sdpa_backend or "auto",
                    "flat": args.flat,
                    "client_clip": args.client_clip,
                    "ds_extra": args.ds_extra,
                }
                result = bench_microbert(shape, args)
                rec = record(shape, impl, result, args, {**variant, "head_slots": result["slots"]})
            else:
                best = None
                for mode in args.hf_modes.split(","):
                    rec = record(
                        shape, impl, bench_hf(shape, args, compiled=mode == "compile"), args, {"mode": mode}
                    )
                    if best is None or rec["tokens_per_second"] > best["tokens_per_second"]:
                        best = rec
                rec = best  # type: ignore[assignment]
            if rank == 0:
                print(json.dumps(rec), flush=True)
                records.append(rec)
            torch.cuda.empty_cache()
    if rank == 0:
        append_records(records, records[0]["device"] if records else "")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
