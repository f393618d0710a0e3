"""Trainer run settings: one flat `TrainConfig` from four layers, every problem reported at once.

Precedence, lowest first: hardware profile < DeepSpeed config < run file (`--config`) < command-line
flags. Each layer is a partial dict of `TrainConfig` field names; a DeepSpeed config contributes its
batch, optimizer and scheduler numbers plus an optional `"microbert"` section (the model preset and
data settings of the seed's v1–v4 setups). The resolved result is plain JSON, written into the run
folder before the first step so a run can always be explained after the fact.

Each `TrainConfig` field is declared once (microbert/setting.py): type, default, help, section, flag
and checks. `train/args.py` builds the command line from those declarations and `resolve` runs the
checks on the merged layers; what no single field can check (the model built from its preset, the
sequence length against its positions, the global batch) is in `_cross_checks`.

It lives in `microbert/` (not `train/`) so `microbert configs show PROFILE` can resolve a profile
without importing the trainer or DeepSpeed; profiles and DeepSpeed configs stay data files in `train/`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microbert.config import (
    DEFAULT_LR,
    OUTPUT_BIAS_INITS,
    POSITION_INITS,
    PRESETS,
    RESIDUAL_INITS,
    ModelConfig,
)
from microbert.errors import ConfigError, unknown_name
from microbert.setting import (
    BOOLEAN,
    STRING_LIST,
    Flag,
    Rule,
    Section,
    at_least_zero,
    declared,
    integer,
    known,
    one_of,
    parse_batch,
    parse_duration,
    parse_flag_count,
    positive,
    within,
)


def _train_data_dir() -> Path:
    """The trainer's folder, found without importing it (microbert never imports train/)."""
    spec = importlib.util.find_spec("train")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "train"  # a source checkout


TRAIN_DIR = _train_data_dir()
PROFILES_DIR = TRAIN_DIR / "profiles"  # hardware profiles: data files, one per machine
CONFIGS_DIR = TRAIN_DIR / "configs"  # DeepSpeed configs (v1.json … v4.json, zero1.json)

WARMUP_SHARE = 0.06  # warm-up when none is given: 6% of the run (RoBERTa's), in steps or in time
SCHEDULES = ("cosine", "linear", "wsd")  # LR decay after warm-up (train/engine.py `decay_factor`)

# Keys of a DeepSpeed config that the trainer owns (it always passes a client optimizer and
# scheduler); their numbers are read into TrainConfig and the keys removed before DeepSpeed sees them.
_DS_CLIENT_KEYS = ("optimizer", "scheduler", "microbert")


MODEL = Section("model")
DATA = Section("data")
OPTIMIZER = Section("optimizer")
SCHEDULE = Section("schedule")
BATCH = Section("batch")
LENGTH = Section("length")
HARDWARE = Section("hardware")
RUN = Section("run folder")
EVALUATION = Section("evaluation and logging")
SECTIONS = (MODEL, DATA, OPTIMIZER, SCHEDULE, BATCH, LENGTH, HARDWARE, RUN, EVALUATION)  # help order


def _preset(_name: str, value: Any) -> str | None:
    if isinstance(value, str) and value in PRESETS:
        return None
    return unknown_name("preset", value, PRESETS)  # as given: a number in a run file shows as one


def _tensorboard_installed(_name: str, value: Any) -> str | None:
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "--report-to tensorboard needs the tensorboard package: pip install 'microbert[tensorboard]'"
    return None


def _writable_run_dir(name: str, run_dir: Any) -> str | None:
    """The run folder must be creatable and writable: found now, not after an hour of data prep."""
    if not isinstance(run_dir, str):
        return f"{name} must be a folder path, got {run_dir!r}"
    path = Path(run_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"run folder {run_dir}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"run folder {run_dir} is not writable ({probe}): pick another --run-dir"
    return None


@dataclass
class TrainConfig:
    """Everything a run needs besides the data itself. Primitives only: it round-trips to JSON.

    A field is `SECTION(default, help, flag=…, check=…)`; None is a valid value where the type says
    `| None` (it means "the preset's" or "derived", as the help says), so no check needs to say so.
    """

    # --- model
    model: str = MODEL(
        "bert-tiny", "model preset (see `microbert configs list`)", flag=Flag(choices=False), check=_preset
    )  # no argparse choices: a typo gets resolve's message, which lists the presets
    model_overrides: dict[str, Any] = MODEL(  # noqa: RUF009 (a Section returns a dataclasses.field)
        factory=dict,
        help="ModelConfig fields that replace the preset's (Hugging Face names: hidden_size, …)",
        check=Rule("a JSON object of ModelConfig fields", lambda v: v is None or isinstance(v, dict)),
    )
    # MicroBERT pre-trains without dropout by default, as ModernBERT and Cramming do: with 0.1, whether
    # a small BERT leaves the unigram plateau within a short run is a lottery over seeds (BENCHMARKS.md).
    dropout: float | None = MODEL(
        0.0,
        "hidden and attention dropout (default {default}; BERT's is 0.1)",
        flag=True,
        check=within(0, 1, open_high=True),
    )  # None: the preset's
    # "auto" takes a sinusoid table for small models (they leave the unigram plateau within minutes
    # on a CPU) and BERT's N(0, 0.02) for large ones, as measured (microbert.config.POSITION_INITS).
    position_init: str = MODEL(
        "auto",
        "how position embeddings start: sinusoidal (small models learn word order sooner), normal "
        "(BERT's N(0, 0.02)), or auto (sinusoidal up to hidden size 256, normal above); default {default}",
        flag=True,
        check=known("position_init", POSITION_INITS),
    )
    position_init_std: float | None = MODEL(
        None,
        "root-mean-square of the starting position embeddings",
        flag=True,
        check=within(0, 1, open_low=True),
    )  # None: the init's own default (microbert.config)
    # Measured at bert-base, bert-mini and the cpu recipe (microbert.config.RESIDUAL_INITS).
    residual_init: str = MODEL(
        "scaled",
        "how the weights that end each residual branch start: scaled (by 1/sqrt(2 x layers), each "
        "layer near the identity) or normal (BERT's N(0, 0.02)); default {default}",
        flag=True,
        check=known("residual_init", RESIDUAL_INITS),
    )
    output_bias_init: str = MODEL(
        "unigram",
        "how the MLM head's bias starts: unigram (the training data's log token frequency) or zeros "
        "(BERT's); default {default}",
        flag=True,
        check=known("output_bias_init", OUTPUT_BIAS_INITS),
    )
    # --- data
    dataset: str = DATA(
        "embedded", "{default} (default), a local path, imdb, a Hub name, hf:<repo>[:<config>]", flag=True
    )
    max_samples: int | None = DATA(
        None,
        "cap on training texts: 1000, 500k, 5M …",
        flag=Flag(parse=parse_flag_count),
        check=integer(),
    )
    streaming: bool = DATA(
        False,
        "stream a Hub dataset instead of downloading it first (bare --streaming: true)",
        flag=True,
        check=BOOLEAN,
    )
    text_column: str = DATA("text", "the column holding the text in a table or Hub dataset")
    seq_len: int = DATA(128, "tokens per sequence (≤ the model's positions)", flag=True, check=integer(8))
    vocab_size: int | None = DATA(
        None, "tokenizer (and embedding) size; default the preset's", flag=True, check=integer(16)
    )
    # 15%: at short budgets it beat 30% (MosaicBERT's and ModernBERT's rate) by far, bert-mini on
    # one H200, 8 s of training: 15.8% held-out against 9.3% (BENCHMARKS.md, time to quality)
    mlm_probability: float = DATA(
        0.15, "share of tokens masked in training (80/10/10 corruption)", flag=True, check=within(0.0, 1.0)
    )
    # --- optimizer
    lr: float = OPTIMIZER(
        DEFAULT_LR,
        "peak learning rate; when no layer sets one, the model preset's ({default}; "
        + ", ".join(f"{p.name} {p.lr:g}" for p in PRESETS.values() if p.lr != DEFAULT_LR)
        + ")",
        flag=True,
        check=positive(),
    )
    weight_decay: float = OPTIMIZER(
        0.01, "AdamW weight decay (none on biases and LayerNorm weights)", check=within(0.0, 1.0)
    )
    adam_beta1: float = OPTIMIZER(0.9, "AdamW β1", check=within(0.0, 1.0))
    adam_beta2: float = OPTIMIZER(0.98, "AdamW β2", check=within(0.0, 1.0))
    adam_eps: float = OPTIMIZER(1e-6, "AdamW ε", check=positive())
    grad_clip: float = OPTIMIZER(
        1.0, "clip the gradient norm to this (0 = off)", check=at_least_zero("≥ 0 (0 = off)")
    )
    # --- schedule
    schedule: str = SCHEDULE(
        "cosine", "LR decay after warm-up: {choices}", flag=True, check=known("schedule", SCHEDULES)
    )
    min_lr_ratio: float = SCHEDULE(0.1, "the LR decays to this share of the peak", check=within(0.0, 1.0))
    decay_fraction: float = SCHEDULE(
        0.2, "wsd: the share of the run spent decaying", check=within(0, 1, open_low=True)
    )
    warmup_steps: int | None = SCHEDULE(
        None, f"linear warm-up steps (default {WARMUP_SHARE:.0%} of the run)", flag=True, check=integer(0)
    )
    # --- batch
    micro_batch_size: int | str = BATCH(
        32,
        "micro-batch per GPU (per process on CPU), or auto",
        flag=Flag(names=("--batch-size",), parse=parse_batch),
        check=integer(also=("auto",)),
    )
    grad_accum: int = BATCH(1, "gradient accumulation steps", flag=True, check=integer())
    train_batch_size: int | None = BATCH(
        None, "global batch; when given, it must equal micro-batch × accumulation × GPUs", check=integer()
    )
    # --- length
    max_steps: int | None = LENGTH(
        None, "optimizer steps to train (the LR schedule spans them)", flag=True, check=integer()
    )
    epochs: float | None = LENGTH(
        None, "epochs to train when --max-steps is not given", flag=True, check=positive()
    )
    time_budget_s: float | None = LENGTH(
        None,
        "train for this long (600, 90s, 10m, 1.5h): the LR schedule follows the clock, so the run ends "
        "decayed on any machine (steps then depend on its speed; --max-steps runs are exactly reproducible)",
        flag=Flag(names=("--time-budget",), parse=parse_duration),
        check=positive("a positive number of seconds"),
    )
    stop_at_step: int | None = LENGTH(
        None, "checkpoint and exit at this step, keeping the schedule", flag=True, check=integer()
    )
    # --- hardware
    num_gpus: int = HARDWARE(1, "GPUs per node (one process each)", check=integer())
    num_nodes: int = HARDWARE(
        1,
        "nodes in the run",
        flag=Flag(names=("--num-nodes", "--num_nodes"), group="several nodes"),
        check=integer(),
    )  # machines the run spans (launched with --hostfile or --node-rank)
    precision: str = HARDWARE(
        "auto",
        "auto: bf16 on an accelerator that supports it, fp32 on CPU",
        flag=True,
        check=one_of(("auto", "bf16", "fp32")),
    )
    zero_stage: int = HARDWARE(
        1, "DeepSpeed ZeRO stage", check=one_of((0, 1, 2), note=" (whole weights on every rank)")
    )
    # --- run folder
    run_dir: str = RUN(
        "runs/default",
        "run folder (checkpoints, export, logs); default runs/<profile>",
        flag=True,
        check=_writable_run_dir,
    )  # resolve() names it after the profile or DeepSpeed config when no layer sets it
    seed: int = RUN(
        42,
        "seed of the initial weights, the data order and the masking",
        flag=True,
        check=integer(0, words="a non-negative integer"),
    )
    resume: str = RUN(
        "auto", "auto: continue from the newest checkpoint", flag=True, check=one_of(("auto", "never"))
    )
    checkpoint_every: int = RUN(500, "steps between checkpoints (and exports)", flag=True, check=integer())
    keep_checkpoints: int = RUN(3, "how many recent checkpoints to keep", flag=True, check=integer())
    # --- evaluation and logging
    eval_every: int = EVALUATION(500, "steps between evaluations", flag=True, check=integer())
    eval_batches: int = EVALUATION(50, "held-out batches per evaluation", flag=True, check=integer())
    probe_texts: list[str] = EVALUATION(  # noqa: RUF009 (a Section returns a dataclasses.field)
        factory=list,
        help="texts with [MASK] whose top-5 predictions the log shows at the end (none: a built-in set)",
        check=STRING_LIST,
    )
    log_every: int = EVALUATION(10, "steps between log lines", flag=True, check=integer())
    report_to: str = EVALUATION(
        "none",
        "also write the logged scalars for TensorBoard, into <run-dir>/tensorboard (default {default})",
        flag=True,
        check=(one_of(("none", "tensorboard")), _tensorboard_installed),
    )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Resolved:
    """The outcome of resolution: settings, model shape, the DeepSpeed config and where each came from."""

    train: TrainConfig
    model_config: ModelConfig
    deepspeed: dict[str, Any]
    profile: str | None
    ds_config_path: str | None
    sources: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "ds_config": self.ds_config_path,
            "layers": self.sources,
            "train": self.train.to_dict(),
            "model": {"preset": self.train.model, **self.model_config.to_dict()},
            "deepspeed": self.deepspeed,
        }


# --- finding profiles and DeepSpeed configs -------------------------------------------------------
def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def config_names() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.glob("*.json"))


def _read_json(path: Path, what: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{what} {path} does not exist")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{what} {path} cannot be read: {exc}")
        return None
    except json.JSONDecodeError as exc:
        problems.append(f"{what} {path} is not valid JSON: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
        return None
    return data


def find_profile(name: str, problems: list[str]) -> Path | None:
    """A bundled profile name, or a path to a profile JSON file."""
    if name.endswith(".json") or "/" in name:
        return Path(name)
    path = PROFILES_DIR / f"{name}.json"
    if path.is_file():
        return path
    problems.append(unknown_name("profile", name, profile_names()))
    return None


def find_ds_config(name: str, problems: list[str]) -> Path | None:
    """A bare name (`v4.json` or `v4`) resolves to the bundled configs; a path is used as it is."""
    path = Path(name)
    if path.is_file() or "/" in name:
        return path
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    problems.append(
        f"DeepSpeed config {name!r} is neither a file nor a bundled config; "
        f"bundled: {', '.join(config_names())}"
    )
    return None


# --- layers ----------------------------------------------------------------------------------------
def profile_layer(data: dict[str, Any], where: str, problems: list[str]) -> tuple[dict[str, Any], str | None]:
    """A profile's settings, and the DeepSpeed config it names (if any)."""
    layer = {k: v for k, v in data.items() if k not in ("name", "description", "ds_config", "hardware")}
    _check_keys(layer, where, problems)
    ds_config = data.get("ds_config")
    if ds_config is not None and not isinstance(ds_config, str):
        problems.append(f"{where}: ds_config must be a file name, got {ds_config!r}")
        ds_config = None
    return layer, ds_config


def ds_config_layer(
    data: dict[str, Any], where: str, problems: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings taken from a DeepSpeed config, and the config DeepSpeed itself will be given."""
    layer: dict[str, Any] = {}
    if "train_micro_batch_size_per_gpu" in data:
        layer["micro_batch_size"] = data["train_micro_batch_size_per_gpu"]
    if "gradient_accumulation_steps" in data:
        layer["grad_accum"] = data["gradient_accumulation_steps"]
    if "train_batch_size" in data:
        layer["train_batch_size"] = data["train_batch_size"]
    if "gradient_clipping" in data:
        layer["grad_clip"] = data["gradient_clipping"]
    zero = data.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        layer["zero_stage"] = zero["stage"]
    bf16 = data.get("bf16")
    if isinstance(bf16, dict) and "enabled" in bf16:
        names = {True: "bf16", False: "fp32", "auto": "auto"}
        layer["precision"] = names.get(bf16["enabled"], bf16["enabled"])
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.get("params", {})
        if isinstance(params, dict):
            for src, dst in (("lr", "lr"), ("weight_decay", "weight_decay"), ("eps", "adam_eps")):
                if src in params:
                    layer[dst] = params[src]
            betas = params.get("betas")
            if isinstance(betas, list) and len(betas) == 2:
                layer["adam_beta1"], layer["adam_beta2"] = betas
    scheduler = data.get("scheduler")
    if isinstance(scheduler, dict) and isinstance(scheduler.get("params"), dict):
        params = scheduler["params"]
        if "warmup_num_steps" in params:
            layer["warmup_steps"] = params["warmup_num_steps"]
        if "total_num_steps" in params:
            layer["max_steps"] = params["total_num_steps"]
    section = data.get("microbert", {})
    if not isinstance(section, dict):
        problems.append(f'{where}: the "microbert" section must be a JSON object')
        section = {}
    _check_keys(section, f'{where} ("microbert" section)', problems)
    layer.update(section)
    engine_config = {k: v for k, v in data.items() if k not in _DS_CLIENT_KEYS}
    return layer, engine_config


def _check_keys(layer: dict[str, Any], where: str, problems: list[str]) -> None:
    valid = TrainConfig.field_names()
    for key in layer:
        if key not in valid:
            problems.append(f"{where}: unknown setting {key!r}")


# --- resolution --------------------------------------------------------------------------------------
def resolve(
    *,
    profile: str | None,
    ds_config: str | None,
    run_file: str | None,
    flags: dict[str, Any],
    world_size: int | None = None,
) -> Resolved:
    """Merge the layers and validate the result; raises one ConfigError listing every problem.

    world_size: the number of processes actually running (under a launcher); None = the profile's.
    """
    problems: list[str] = []
    merged: dict[str, Any] = {}
    sources = ["defaults"]
    engine_config: dict[str, Any] = {}
    profile_ds: str | None = None

    if profile is not None:
        path = find_profile(profile, problems)
        data = _read_json(path, "profile", problems) if path else None
        if data is not None:
            layer, profile_ds = profile_layer(data, f"profile {profile}", problems)
            merged.update(layer)
            sources.append(f"profile {path}")

    ds_path: Path | None = None
    ds_name = ds_config if ds_config is not None else profile_ds
    if ds_name is not None:
        ds_path = find_ds_config(ds_name, problems)
        data = _read_json(ds_path, "DeepSpeed config", problems) if ds_path else None
        if data is not None:
            layer, engine_config = ds_config_layer(data, f"DeepSpeed config {ds_path}", problems)
            merged.update(layer)
            sources.append(f"ds-config {ds_path}")
        elif ds_path is not None:
            ds_path = None

    if run_file is not None:
        data = _read_json(Path(run_file), "run file", problems)
        if data is not None:
            run_layer = data.get("train", data)  # a resolved.json from an earlier run works too
            _check_keys(run_layer, f"run file {run_file}", problems)
            merged.update({k: v for k, v in run_layer.items() if k in TrainConfig.field_names()})
            sources.append(f"run file {run_file}")

    merged.update({k: v for k, v in flags.items() if v is not None})
    if flags:
        sources.append("flags")
    if "run_dir" not in merged:
        name = Path(profile).stem if profile else Path(ds_name).stem if ds_name else "default"
        merged["run_dir"] = f"runs/{name}"

    preset = PRESETS.get(str(merged.get("model", TrainConfig.model)))
    if "lr" not in merged and preset is not None:  # no layer chose a peak LR: the shape's own
        merged["lr"] = preset.lr
    train = TrainConfig(**{k: v for k, v in merged.items() if k in TrainConfig.field_names()})
    model_config = _validate(train, problems, world_size)
    if problems:
        raise ConfigError(problems)
    assert model_config is not None
    return Resolved(
        train=train,
        model_config=model_config,
        deepspeed=engine_config,
        profile=profile,
        ds_config_path=str(ds_path) if ds_path else None,
        sources=sources,
    )


def _validate(t: TrainConfig, problems: list[str], world_size: int | None) -> ModelConfig | None:
    """Check every setting (its own checks, then those across settings); append each problem; return
    the model config when it can be built."""
    bad: set[str] = set()
    for setting in declared(TrainConfig):
        problem = setting.problem(getattr(t, setting.name))
        if problem is not None:
            problems.append(problem)
            bad.add(setting.name)
    return _cross_checks(t, bad, problems, world_size)


def _cross_checks(
    t: TrainConfig, bad: set[str], problems: list[str], world_size: int | None
) -> ModelConfig | None:
    """What no one setting can check alone: the model built from its preset and overrides, the sequence
    length against its positions, and the global batch against its factors (when those are valid)."""
    model_config: ModelConfig | None = None
    if bad.isdisjoint({"model", "model_overrides"}):
        overrides = dict(t.model_overrides or {})  # null in a run file: none, as before
        if t.vocab_size is not None:
            overrides["vocab_size"] = t.vocab_size
        if t.dropout is not None and "dropout" not in bad:
            # model_overrides name one of the two exactly, so they win over the run's dropout
            overrides.setdefault("hidden_dropout_prob", float(t.dropout))
            overrides.setdefault("attention_probs_dropout_prob", float(t.dropout))
        try:
            model_config = ModelConfig.from_dict({**PRESETS[t.model].config.to_dict(), **overrides})
        except ConfigError as exc:
            problems.extend(f"model {t.model}: {p}" for p in exc.problems)
    if "seq_len" not in bad and model_config is not None and t.seq_len > model_config.max_position_embeddings:
        problems.append(
            f"seq_len {t.seq_len} is above the {model_config.max_position_embeddings} positions of model "
            f"{t.model}: lower --seq-len or pick a preset with more positions"
        )
    world = world_size or (t.num_gpus * t.num_nodes if bad.isdisjoint({"num_gpus", "num_nodes"}) else None)
    if (
        bad.isdisjoint({"micro_batch_size", "grad_accum", "train_batch_size"})
        and isinstance(t.micro_batch_size, int)
        and t.train_batch_size is not None
        and world is not None
        and t.train_batch_size != t.micro_batch_size * t.grad_accum * world
    ):
        problems.append(
            f"contradictory batch settings: train_batch_size {t.train_batch_size} ≠ micro-batch "
            f"{t.micro_batch_size} × gradient accumulation {t.grad_accum} × {world} GPU(s) = "
            f"{t.micro_batch_size * t.grad_accum * world}; drop train_batch_size or make them agree"
        )
    return model_config
