"""The trainer's command line: one set of flags for `microbert-train`, `python -m train` and
`deepspeed train/main.py`. Flags left out are None, so lower layers (profile, DeepSpeed config, run
file) keep their values; only what the user typed overrides them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from microbert.config import POSITION_INITS
from microbert.data.sources import parse_count
from microbert.run_config import SCHEDULES


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _count(text: str) -> int:
    try:
        count = parse_count(text)
    except ValueError:
        count = None
    if count is None:  # "all" would read as a flag left out, so it is refused here as before
        raise argparse.ArgumentTypeError(f"expected a count such as 1000, 500k or 5M, got {text!r}")
    return count


def _batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _duration(text: str) -> float:
    """Seconds, as people write them: 600, 90s, 10m, 1.5h."""
    cleaned = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(cleaned[-1:], 1)
    try:
        value = float(cleaned[:-1] if cleaned[-1:] in "smh" else cleaned) * scale
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 10m or 1.5h, got {text!r}")
    return value


# flag -> TrainConfig field (flags whose name differs from the field)
FLAG_FIELDS = {"batch_size": "micro_batch_size", "model": "model", "time_budget": "time_budget_s"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microbert-train",
        description="Pre-train a BERT masked-language model with DeepSpeed (ZeRO-1; bf16 on GPUs). "
        "Settings: profile < DeepSpeed config < run file < these flags.",
    )
    p.add_argument("--profile", help="hardware profile (see `microbert configs list`) or a profile JSON path")
    p.add_argument("--ds-config", help="DeepSpeed config: a bundled name (v1.json … v4.json) or a path")
    p.add_argument("--config", dest="run_file", help="run file: JSON of TrainConfig settings")
    p.add_argument("--model", help="model preset (see `microbert configs list`)")
    p.add_argument(
        "--dataset", help="embedded (default), a local path, imdb, a Hub name, hf:<repo>[:<config>]"
    )
    p.add_argument("--max-samples", type=_count, help="cap on training texts: 1000, 500k, 5M …")
    p.add_argument(
        "--streaming",
        type=_bool,
        nargs="?",
        const=True,
        metavar="true|false",
        help="stream a Hub dataset instead of downloading it first (bare --streaming: true)",
    )
    p.add_argument("--seq-len", type=int, help="tokens per sequence (≤ the model's positions)")
    p.add_argument("--vocab-size", type=int, help="tokenizer (and embedding) size; default the preset's")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (the LR schedule spans them)")
    p.add_argument("--epochs", type=float, help="epochs to train when --max-steps is not given")
    p.add_argument(
        "--time-budget",
        type=_duration,
        help="train for this long (600, 90s, 10m, 1.5h): the LR schedule follows the clock, so the run "
        "ends decayed on any machine (steps then depend on its speed; --max-steps runs are exactly "
        "reproducible)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument(
        "--schedule", choices=SCHEDULES, help="LR decay after warm-up: cosine (default), linear, wsd"
    )
    p.add_argument("--dropout", type=float, help="hidden and attention dropout (default 0; BERT's is 0.1)")
    p.add_argument(
        "--position-init",
        choices=POSITION_INITS,
        help="how position embeddings start: sinusoidal (small models learn word order sooner), normal "
        "(BERT's N(0, 0.02)), or auto (default: sinusoidal up to hidden size 256, normal above)",
    )
    p.add_argument(
        "--position-init-std", type=float, help="root-mean-square of the starting position embeddings"
    )
    p.add_argument(
        "--mlm-probability", type=float, help="share of tokens masked in training (80/10/10 corruption)"
    )
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 6%% of the run)")
    p.add_argument("--batch-size", type=_batch, help="micro-batch per GPU (per process on CPU), or auto")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", help="run folder (checkpoints, export, logs); default runs/<profile>")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and exports)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, help="held-out batches per evaluation")
    p.add_argument("--keep-checkpoints", type=int, help="how many recent checkpoints to keep")
    p.add_argument("--resume", choices=("auto", "never"), help="auto: continue from the newest checkpoint")
    p.add_argument("--log-every", type=int, help="steps between log lines")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--stop-at-step", type=int, help="checkpoint and exit at this step, keeping the schedule")
    p.add_argument(
        "--report-to",
        choices=("none", "tensorboard"),
        help="also write the logged scalars for TensorBoard, into <run-dir>/tensorboard (default none)",
    )
    p.add_argument(
        "--verbose", action="store_true", default=None, help="show the libraries' info logs and warnings"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_launch_flags(p)
    return p


# --- several nodes (train/launcher.py): DeepSpeed's flag names, with dashes or underscores ----------
LAUNCH_FLAGS = ("hostfile", "node_rank", "master_addr", "master_port")  # not settings; num_nodes is one


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several nodes",
        "start every node from here over pdsh/ssh with --hostfile, or run the same command on every "
        "node with --num-nodes, --node-rank and --master-addr (README: Multi-node)",
    )
    g.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' per node): ranks over pdsh and ssh")
    g.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int, help="nodes in the run")
    g.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, help="this node: 0 … N-1")
    g.add_argument("--master-addr", "--master_addr", dest="master_addr", help="address of node 0")
    g.add_argument(
        "--master-port", "--master_port", dest="master_port", type=int, help="port on node 0 (default 29500)"
    )


NON_SETTINGS = ("profile", "ds_config", "run_file", "local_rank", "verbose", *LAUNCH_FLAGS)


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave, as TrainConfig field names."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in NON_SETTINGS or value is None:
            continue
        out[FLAG_FIELDS.get(key, key)] = value
    return out


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
