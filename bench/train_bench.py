"""Training throughput: MicroBERT's DeepSpeed step against Hugging Face `BertForMaskedLM`, one run.

    python bench/train_bench.py [--shapes bert-base,bert-mini,v4] [--impls microbert,hf_transformers]
    deepspeed --num_gpus 2 bench/train_bench.py --shapes bert-base --impls microbert   # scaling
    DS_ACCELERATOR=cpu python bench/train_bench.py --shapes bert-tiny --impls microbert --steps 5  # smoke

Both implementations train on the same kind of batches: packed sequences from MicroBERT's shard
cache (the embedded corpus, tokenized with a WordPiece vocabulary of the shape's size), read by
`ShardLoader` and masked on the device by `mask_tokens` (15%). Each runs `--warmup` steps, then
`--steps` timed steps with a device synchronisation only at both ends.

- microbert: what `microbert-train` runs, built by the trainer's own builders from settings like a
  run's (the shape's preset, sequence length and micro-batch; everything else the trainer's
  defaults): the run plan (`microbert.plan.plan_run`), the model and loader (`train.step`), the
  DeepSpeed engine with its config, client optimizer and schedule (`train.engine.build_engine`: flat
  parameters, ZeRO stage 1, bf16, the on-device clip, the compiled wrapper, CUDA graphs unless
  `MICROBERT_COMPILE` / `--compile-mode` says otherwise) and the step itself (`train.step.TrainStep`:
  masking, the MLM head on fixed slots, forward, backward, step). The embedding matrix is sized to
  the tokenizer, as in a training run.
- hf_transformers: `transformers.BertForMaskedLM` (SDPA attention), bf16 autocast, fused AdamW,
  the better of eager and `torch.compile` (CUDA only).

Tokens/s counts non-padding tokens of the global batch. MFU = tokens/s × (6·N + 12·L·d·S) / peak,
N = encoder matmul weights + MLM transform + d·V, peak = the card's datasheet dense bf16 rate from
the trainer's own table (`train.reporting.PEAK_FLOPS`: 989 TFLOP/s for an H100 or H200), so the MFU
here and in `train.log` divide by the same figure; `--peak-tflops` overrides it (e.g. a measured
matmul peak, about 790 on an H200), and each record says which figure it used (`peak_tflops`).
Records are appended to `bench/results/<date>-<gpu>.json` (and `$OUT` when set); a CPU run (a smoke
test of the benchmark itself) prints its records and keeps none.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

if __package__ in (None, ""):  # `python bench/train_bench.py` or the deepspeed launcher: repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.records import append_records, commit
from microbert.config import ModelConfig, get_preset
from microbert.data import ShardLoader, mask_tokens, prepare_dataset
from microbert.run_config import resolve
from train.reporting import peak_flops as trainer_peak_flops

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    preset: str  # microbert.config.PRESETS
    seq_len: int
    batch_size: int

    @property
    def config(self) -> ModelConfig:
        return get_preset(self.preset)


SHAPES = {
    "bert-tiny": Shape("bert-tiny", "bert-tiny", 32, 8),  # a CPU smoke test of the benchmark itself
    "bert-base": Shape("bert-base", "bert-base", 128, 256),
    "bert-mini": Shape("bert-mini", "bert-mini", 128, 256),
    "v4": Shape("v4", "hf-xl", 256, 96),
}


def peak_flops(device_name: str, override: float | None) -> float | None:
    """The figure MFU divides by: `--peak-tflops`, else the trainer's datasheet table (None on CPU)."""
    if override:
        return override * 1e12
    if device_name == "cpu":
        return None
    peak = trainer_peak_flops(device_name)
    if peak is None:
        raise SystemExit(f"no datasheet peak for {device_name!r}: pass --peak-tflops")
    return peak


def device_name() -> str:
    """The GPU's model name ("NVIDIA H200"), or "cpu" where DeepSpeed runs on the CPU."""
    if get_accelerator().device_name() == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(0)


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

    return next_batch, config.replace(
        vocab_size=vocab
    )  # the embedding sized to the tokenizer, as in training


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int) -> tuple[float, float]:
    accelerator = get_accelerator()
    for _ in range(warmup):
        step()
    accelerator.synchronize()
    accelerator.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    accelerator.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, float(loss)


def bench_microbert(shape: Shape, args: argparse.Namespace) -> dict:
    """The trainer's step on the trainer's engine, built by the trainer's builders (module doc)."""
    from microbert.plan import DataPlan, plan_run
    from train.engine import build_engine, compile_mode, init_distributed
    from train.step import TrainStep, build_loader, build_model

    _, _, local_rank = rank_and_world()
    settings = {
        "model": shape.preset,
        "seq_len": shape.seq_len,
        "micro_batch_size": shape.batch_size,
        "dataset": "embedded",
        "seed": args.seed,
        **({"dropout": args.dropout} if args.dropout is not None else {}),
    }
    resolved = resolve(profile=None, ds_config=None, run_file=None, flags=settings)
    extra = json.loads(args.ds_extra)
    if extra:  # merged into the layers' DeepSpeed config, which the trainer completes from the plan
        base = dict(resolved.deepspeed)
        for key, value in extra.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        resolved = dataclasses.replace(resolved, deepspeed=base)
    place = init_distributed(local_rank, resolved.train.precision)
    data = prepare_dataset("embedded", seq_len=shape.seq_len, vocab_size=resolved.model_config.vocab_size)
    plan = plan_run(resolved, place, DataPlan.of(data, "embedded"))
    parts = build_engine(build_model(plan, data), plan)
    train_step = TrainStep(parts.engine, plan, data, exact_head=args.exact_head)
    batches = iter(build_loader(plan, data))
    step_numbers = itertools.count()
    overflow = torch.zeros((), dtype=torch.long, device=place.device)

    def step() -> torch.Tensor:
        result = train_step(next(step_numbers), batches)
        if result.dropped is not None:
            overflow.add_(result.dropped)
        return result.loss

    with sdpa_backend(args.sdpa_backend):
        elapsed, loss = time_steps(step, args.warmup, args.steps)
        if args.profile:
            profile(step, f"microbert-{shape.name}")
    if int(overflow):
        print(
            f"warning: {int(overflow)} masked positions did not fit {train_step.masked_slots} slots",
            flush=True,
        )
    return {
        "elapsed": elapsed,
        "loss": loss,
        "world": place.world_size,
        "config": plan.model,
        "slots": train_step.masked_slots,
        "variant": {
            "builders": "trainer",
            "compile_mode": compile_mode(place) or "off",
            "precision": place.precision,
            "dropout": plan.model.hidden_dropout_prob,
            "vocab_size": plan.model.vocab_size,
        },
    }


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
    name = device_name()
    peak = peak_flops(name, args.peak_tflops)
    flops = config.training_flops_per_token(shape.seq_len)
    mfu = round(tokens_per_second * flops / (peak * world), 4) if peak else None
    return {
        "bench": "train",
        "shape": shape.name,
        "impl": impl,
        "device": name,
        "gpus": world,
        "batch_size": shape.batch_size,
        "seq_len": shape.seq_len,
        "tokens_per_second": round(tokens_per_second),
        "mfu": mfu,
        "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "peak_memory_gib": round(get_accelerator().max_memory_allocated() / 2**30, 2),
        "final_loss": round(result["loss"], 4),
        "torch": torch.__version__,
        "commit": commit(),
        "date": dt.date.today().isoformat(),
        **(extra or {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="MicroBERT vs transformers training throughput")
    parser.add_argument(
        "--shapes", default="bert-base,bert-mini,v4", help=f"comma-separated: {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--impls", default="microbert,hf_transformers", help="microbert, hf_transformers or both"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-compile", action="store_true", help="microbert: run eagerly (MICROBERT_COMPILE=off)"
    )
    parser.add_argument("--hf-modes", default="eager,compile", help="which transformers modes to try")
    parser.add_argument(
        "--ds-extra",
        default="{}",
        help="microbert: JSON merged into the DeepSpeed config the trainer completes",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the shape's batch")
    parser.add_argument(
        "--compile-mode",
        choices=("off", "default", "reduce-overhead"),
        default=None,
        help="microbert: MICROBERT_COMPILE for this run (default: the trainer's, CUDA graphs on CUDA)",
    )
    parser.add_argument(
        "--dropout", type=float, default=None, help="microbert: the run's dropout (default: the trainer's)"
    )
    for always in ("--flat", "--client-clip"):  # the trainer always does both; older command lines
        parser.add_argument(always, action="store_true", help="accepted, always on: the trainer's engine")
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
    if args.no_compile or args.compile_mode:  # read by train.engine.compile_mode, as in microbert-train
        os.environ["MICROBERT_COMPILE"] = "off" if args.no_compile else args.compile_mode
    rank, _, _ = rank_and_world()
    on_gpu = device_name() != "cpu"
    if not on_gpu and args.impls != "microbert":
        raise SystemExit("on a CPU only --impls microbert runs (the transformers side is CUDA only)")
    peak_flops(device_name(), args.peak_tflops)  # an unknown card stops here, not after a run
    records = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if args.batch_size:
            shape = dataclasses.replace(shape, batch_size=args.batch_size)
        for impl in args.impls.split(","):
            if impl == "microbert":
                result = bench_microbert(shape, args)
                extra = {
                    **result["variant"],
                    "sdpa_backend": args.sdpa_backend or "auto",
                    "ds_extra": args.ds_extra,
                    "head_slots": result["slots"],
                }
                rec = record(shape, impl, result, args, extra)
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
            if on_gpu:
                torch.cuda.empty_cache()
    if rank == 0 and on_gpu:
        append_records(records, records[0]["device"] if records else "")
    elif rank == 0:
        print("a CPU run checks the benchmark itself: its records are printed, not kept", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
