"""Trainer run settings: one flat `TrainConfig` from four layers, every problem reported at once.

Precedence, lowest first: hardware profile < DeepSpeed config < run file (`--config`) < command-line
flags. Each layer is a partial dict of `TrainConfig` field names; a DeepSpeed config contributes its
batch, optimizer and scheduler numbers plus an optional `"microbert"` section (the model preset and
data settings of the seed's v1–v4 setups). The resolved result is plain JSON, written into the run
folder before the first step so a run can always be explained after the fact.

It lives in `microbert/` (not `train/`) so `microbert configs show PROFILE` can resolve a profile
without importing the trainer or DeepSpeed; profiles and DeepSpeed configs stay data files in `train/`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microbert.config import POSITION_INITS, PRESETS, ModelConfig
from microbert.errors import ConfigError, unknown_name


def _train_data_dir() -> Path:
    """The trainer's folder, found without importing it (microbert never imports train/)."""
    spec = importlib.util.find_spec("train")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "train"  # a source checkout


TRAIN_DIR = _train_data_dir()
PROFILES_DIR = TRAIN_DIR / "profiles"  # hardware profiles: data files, one per machine
CONFIGS_DIR = TRAIN_DIR / "configs"  # DeepSpeed configs (v1.json … v4.json, zero1.json)

SCHEDULES = ("cosine", "linear", "wsd")  # LR decay after warm-up (train/engine.py `decay_factor`)

# Keys of a DeepSpeed config that the trainer owns (it always passes a client optimizer and
# scheduler); their numbers are read into TrainConfig and the keys removed before DeepSpeed sees them.
_DS_CLIENT_KEYS = ("optimizer", "scheduler", "microbert")


@dataclass
class TrainConfig:
    """Everything a run needs besides the data itself. Primitives only: it round-trips to JSON."""

    # model
    model: str = "bert-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Hidden and attention dropout of the run (None = the preset's, BERT's 0.1). MicroBERT
    # pre-trains without dropout by default, as ModernBERT and Cramming do: with 0.1, whether a
    # small BERT leaves the unigram plateau within a short run is a lottery over seeds (BENCHMARKS.md).
    dropout: float | None = 0.0
    # How the position embeddings start (microbert.config.POSITION_INITS): "auto" takes a sinusoid
    # table for small models (they leave the unigram plateau within minutes on a CPU) and BERT's
    # N(0, 0.02) for large ones, as measured.
    position_init: str = "auto"
    position_init_std: float | None = None  # None: the init's own default (microbert.config)
    # data
    dataset: str = "embedded"
    max_samples: int | None = None
    streaming: bool = False
    text_column: str = "text"
    seq_len: int = 128
    vocab_size: int | None = None  # tokenizer size; None = the preset's
    # 15%: at short budgets it beat 30% (MosaicBERT's and ModernBERT's rate) by far, bert-mini on
    # one H200, 8 s of training: 15.8% held-out against 9.3% (BENCHMARKS.md, time to quality)
    mlm_probability: float = 0.15
    # optimiser and schedule
    lr: float = 5e-4
    schedule: str = "cosine"  # one of SCHEDULES
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the share of the run spent decaying
    warmup_steps: int | None = None  # None = 6% of the run
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    # batch and length
    micro_batch_size: int | str = 32  # per GPU (per process on CPU), or "auto"
    grad_accum: int = 1
    train_batch_size: int | None = None  # global; must equal micro × accum × world when given
    max_steps: int | None = None
    epochs: float | None = None
    time_budget_s: float | None = None  # train for this many seconds; the LR schedule follows the clock
    seed: int = 42
    # hardware
    num_gpus: int = 1  # per node
    num_nodes: int = 1  # machines the run spans (launched with --hostfile or --node-rank)
    precision: str = "auto"  # auto: bf16 on an accelerator that supports it, fp32 on CPU
    zero_stage: int = 1
    # cadence and outputs
    run_dir: str = "runs/default"
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_batches: int = 50
    keep_checkpoints: int = 3
    resume: str = "auto"
    log_every: int = 10
    stop_at_step: int | None = None  # checkpoint and exit here without changing the schedule
    probe_texts: list[str] = field(default_factory=list)
    report_to: str = "none"  # also write the history's scalars for: none | tensorboard

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
    """Check every setting; append each problem; return the model config when it can be built."""

    def positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> bool:
        if value is None and allow_none:
            return True
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            problems.append(f"{name} must be an integer ≥ {minimum}, got {value!r}")
            return False
        return True

    model_config: ModelConfig | None = None
    if t.model not in PRESETS:
        problems.append(unknown_name("preset", t.model, PRESETS))
    else:
        overrides = dict(t.model_overrides or {})
        if t.vocab_size is not None:
            overrides["vocab_size"] = t.vocab_size
        if isinstance(t.dropout, int | float) and not isinstance(t.dropout, bool) and 0 <= t.dropout < 1:
            # model_overrides name one of the two exactly, so they win over the run's dropout
            overrides.setdefault("hidden_dropout_prob", float(t.dropout))
            overrides.setdefault("attention_probs_dropout_prob", float(t.dropout))
        try:
            model_config = ModelConfig.from_dict({**PRESETS[t.model].config.to_dict(), **overrides})
        except ConfigError as exc:
            problems.extend(f"model {t.model}: {p}" for p in exc.problems)

    seq_ok = positive_int("seq_len", t.seq_len, minimum=8)
    if seq_ok and model_config is not None and t.seq_len > model_config.max_position_embeddings:
        problems.append(
            f"seq_len {t.seq_len} is above the {model_config.max_position_embeddings} positions of model "
            f"{t.model}: lower --seq-len or pick a preset with more positions"
        )
    positive_int("max_samples", t.max_samples, allow_none=True)
    positive_int("vocab_size", t.vocab_size, allow_none=True, minimum=16)
    positive_int("grad_accum", t.grad_accum)
    positive_int("train_batch_size", t.train_batch_size, allow_none=True)
    positive_int("max_steps", t.max_steps, allow_none=True)
    positive_int("warmup_steps", t.warmup_steps, allow_none=True, minimum=0)
    positive_int("num_gpus", t.num_gpus)
    positive_int("num_nodes", t.num_nodes)
    positive_int("checkpoint_every", t.checkpoint_every)
    positive_int("eval_every", t.eval_every)
    positive_int("eval_batches", t.eval_batches)
    positive_int("keep_checkpoints", t.keep_checkpoints)
    positive_int("log_every", t.log_every)
    positive_int("stop_at_step", t.stop_at_step, allow_none=True)
    if not isinstance(t.seed, int) or isinstance(t.seed, bool) or t.seed < 0:
        problems.append(f"seed must be a non-negative integer, got {t.seed!r}")
    micro_ok = t.micro_batch_size == "auto" or positive_int("micro_batch_size", t.micro_batch_size)
    nodes = t.num_nodes if isinstance(t.num_nodes, int) and isinstance(t.num_gpus, int) else 1
    world = world_size or t.num_gpus * nodes
    if (
        micro_ok
        and isinstance(t.micro_batch_size, int)
        and isinstance(t.grad_accum, int)
        and isinstance(t.train_batch_size, int)
        and isinstance(world, int)
        and t.train_batch_size != t.micro_batch_size * t.grad_accum * world
    ):
        problems.append(
            f"contradictory batch settings: train_batch_size {t.train_batch_size} ≠ micro-batch "
            f"{t.micro_batch_size} × gradient accumulation {t.grad_accum} × {world} GPU(s) = "
            f"{t.micro_batch_size * t.grad_accum * world}; drop train_batch_size or make them agree"
        )
    for name in ("lr", "adam_eps"):
        value = getattr(t, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            problems.append(f"{name} must be a positive number, got {value!r}")
    for name, low, high in (
        ("min_lr_ratio", 0.0, 1.0),
        ("weight_decay", 0.0, 1.0),
        ("adam_beta1", 0.0, 1.0),
        ("adam_beta2", 0.0, 1.0),
        ("mlm_probability", 0.0, 1.0),
    ):
        value = getattr(t, name)
        if not isinstance(value, int | float) or not low <= value <= high:
            problems.append(f"{name} must be in [{low}, {high}], got {value!r}")
    if not isinstance(t.grad_clip, int | float) or t.grad_clip < 0:
        problems.append(f"grad_clip must be ≥ 0 (0 = off), got {t.grad_clip!r}")
    if t.dropout is not None and (
        not isinstance(t.dropout, int | float) or isinstance(t.dropout, bool) or not 0 <= t.dropout < 1
    ):
        problems.append(f"dropout must be in [0, 1), got {t.dropout!r}")
    if t.schedule not in SCHEDULES:
        problems.append(unknown_name("schedule", str(t.schedule), SCHEDULES))
    if t.position_init not in POSITION_INITS:
        problems.append(unknown_name("position_init", str(t.position_init), POSITION_INITS))
    if t.position_init_std is not None and (
        not isinstance(t.position_init_std, int | float)
        or isinstance(t.position_init_std, bool)
        or not 0 < t.position_init_std <= 1
    ):
        problems.append(f"position_init_std must be in (0, 1], got {t.position_init_std!r}")
    if not isinstance(t.decay_fraction, int | float) or not 0 < t.decay_fraction <= 1:
        problems.append(f"decay_fraction must be in (0, 1], got {t.decay_fraction!r}")
    if t.time_budget_s is not None and (
        not isinstance(t.time_budget_s, int | float)
        or isinstance(t.time_budget_s, bool)
        or t.time_budget_s <= 0
    ):
        problems.append(f"time_budget_s must be a positive number of seconds, got {t.time_budget_s!r}")
    if t.epochs is not None and (not isinstance(t.epochs, int | float) or t.epochs <= 0):
        problems.append(f"epochs must be a positive number, got {t.epochs!r}")
    if t.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision must be auto, bf16 or fp32, got {t.precision!r}")
    if t.zero_stage not in (0, 1, 2):
        problems.append(f"zero_stage must be 0, 1 or 2 (whole weights on every rank), got {t.zero_stage!r}")
    if t.resume not in ("auto", "never"):
        problems.append(f"resume must be auto or never, got {t.resume!r}")
    if t.report_to not in ("none", "tensorboard"):
        problems.append(f"report_to must be none or tensorboard, got {t.report_to!r}")
    elif t.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        problems.append(
            "--report-to tensorboard needs the tensorboard package: pip install 'microbert[tensorboard]'"
        )
    if not isinstance(t.streaming, bool):
        problems.append(f"streaming must be true or false, got {t.streaming!r}")
    if not isinstance(t.probe_texts, list) or not all(isinstance(x, str) for x in t.probe_texts):
        problems.append("probe_texts must be a list of strings")
    _check_run_dir(t.run_dir, problems)
    return model_config


def _check_run_dir(run_dir: str, problems: list[str]) -> None:
    """The run folder must be creatable and writable: found now, not after an hour of data prep."""
    path = Path(run_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        problems.append(f"run folder {run_dir}: {probe} is a file, not a folder")
        return
    if not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"run folder {run_dir} is not writable ({probe}): pick another --run-dir")
