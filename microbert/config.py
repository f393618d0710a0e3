"""Model configuration: the shape of a BERT, with Hugging Face `BertConfig` field names.

The config is primitives only, so it round-trips through JSON and lands in the artifact's
`config.json` unchanged; `transformers` reads that file as a `BertConfig`. Hardware and training
settings live elsewhere (train profiles, `TrainConfig`): a model config says what the network is,
not where or how it is trained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microbert.errors import ConfigError, unknown_name

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Keys `transformers` writes into a BERT config.json that do not change the encoder-only MLM
# network we build; accepted (and dropped) when loading a Hugging Face folder.
_HF_IGNORED_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "classifier_dropout",
        "gradient_checkpointing",
        "_name_or_path",
        "_attn_implementation_autoset",
        "output_past",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "chunk_size_feed_forward",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "problem_type",
        "microbert",
    }
)
# Keys whose only supported value is the one given: anything else is another architecture.
_HF_REQUIRED_VALUES: dict[str, Any] = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


# How the position embeddings start. BERT draws them like every other weight, N(0, 0.02): they are
# then as small as the word embeddings, attention starts out blind to order, and a small model sits
# on the unigram plateau (predicting `the` everywhere) for a long time: bert-tiny is at 1.0x the
# constant guess after 24 M tokens. Starting them as a sinusoid table (Vaswani et al. 2017) four
# times larger gives attention a positional signal from the first step: bert-tiny reaches 2x the
# constant guess after 7 M tokens and 4.2x after 24 M, and bert-mini 27% held-out after 8 s on an
# H200 instead of 16%. bert-base is the other way round: with the table (RMS 0.08 or 0.02) it stays
# on the plateau for 80 s, with BERT's init it leaves it after about 20 s (BENCHMARKS.md, "Time to
# quality"). So "auto" takes the table up to SINUSOIDAL_MAX_HIDDEN, where it was measured to help,
# and BERT's own init above. Only the starting values change: the model stays a standard BERT with
# learned absolute positions.
POSITION_INITS = ("auto", "sinusoidal", "normal")
SINUSOIDAL_POSITION_STD = 0.08  # root-mean-square of the table: 4x BERT's initializer range
SINUSOIDAL_MAX_HIDDEN = 256  # bert-tiny (128) and bert-mini (256) measured; bert-base (768) not helped


def resolve_position_init(kind: str, hidden_size: int) -> str:
    """The init `kind` ("auto" resolved for a model of this width): "sinusoidal" or "normal"."""
    if kind == "auto":
        return "sinusoidal" if hidden_size <= SINUSOIDAL_MAX_HIDDEN else "normal"
    return kind


# How the encoder's residual branches and the MLM head's bias start. A post-LN BERT adds each
# layer's branch to its input and normalises the sum; with BERT's N(0, 0.02) everywhere the branches
# are as large as the stream they join, the deep stack starts far from the identity, and bert-base
# needs about 450 steps at lr 2e-4 to leave the unigram plateau. "scaled" multiplies the weights
# that end each branch (attention output, feed-forward output) by 1/sqrt(2 x layers), GPT-2's
# init, so each layer starts near the identity (Liu et al. 2020 on post-LN training); "unigram"
# starts the head's bias at the training data's log token frequency, the plateau the model would
# otherwise spend its first steps reaching. Measured (one H200, BENCHMARKS.md "Starting values"):
# bert-base at the 20 s run's horizon (410 steps x 256, lr 2e-4) 3.99% held-out with BERT's init
# (the plateau), 8.37% scaled, 5.83% unigram, 9.76% both; the trainer's 20 s run 9.65% against
# 4.36%, its 80 s run 31.6% against 28.1%; bert-mini 8 s 28.9% against 27.5%; the cpu profile's
# recipe per token (3 seeds) 2x the constant guess after 6 M tokens instead of 8 M, the same
# 3.7x at 20 M. Both are the default at every size. Only starting values change: the model, its
# parameter names and its `transformers` export stay a standard BERT.
RESIDUAL_INITS = ("scaled", "normal")
OUTPUT_BIAS_INITS = ("unigram", "zeros")
UNIGRAM_SAMPLE_ROWS = 65_536  # rows counted for the unigram bias: evenly spread, ~8 M tokens at 128


@dataclass(frozen=True)
class ModelConfig:
    """A BERT encoder with an MLM head. Field names are Hugging Face's."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every inconsistency in this config, as messages (empty when valid)."""
        p: list[str] = []
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.hidden_size, int)
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads > 0
            and self.hidden_size % self.num_attention_heads
        ):
            p.append(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            p.append(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                p.append(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, int | float) or self.layer_norm_eps <= 0:
            p.append(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.initializer_range, int | float) or self.initializer_range <= 0:
            p.append(f"initializer_range must be positive, got {self.initializer_range!r}")
        if isinstance(self.vocab_size, int) and not (
            isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size
        ):
            p.append(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id!r}")
        return p

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- parameter and FLOP accounting -------------------------------------------------------
    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied decoder weight once (as `transformers` does)."""
        d, v, i, n = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_hidden_layers
        embeddings = (v + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
        layer = 4 * (d * d + d) + 2 * d + (d * i + i) + (i * d + d) + 2 * d
        head = d * d + d + 2 * d + v  # transform dense + LayerNorm + output bias
        return embeddings + n * layer + head

    def matmul_parameters(self) -> int:
        """N in the MFU formula: encoder matmul weights + MLM transform + the d·V decoder."""
        d, v, i, n = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_hidden_layers
        return n * (4 * d * d + 2 * d * i) + d * d + d * v

    def training_flops_per_token(self, seq_len: int) -> int:
        """6·N + 12·L·d·S: forward + backward matmuls plus attention scores (PaLM appendix B)."""
        return 6 * self.matmul_parameters() + 12 * self.num_hidden_layers * self.hidden_size * seq_len

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """What goes into an artifact's `config.json`: loadable as a `transformers.BertConfig`."""
        return {
            "model_type": "bert",
            "architectures": ["BertForMaskedLM"],
            **self.to_dict(),
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, hf: bool = False) -> ModelConfig:
        """Build from a dict; unknown keys are an error (with `hf=True`, known HF extras pass)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif hf and key in _HF_IGNORED_KEYS:
                continue
            elif hf and key in _HF_REQUIRED_VALUES:
                if value != _HF_REQUIRED_VALUES[key]:
                    problems.append(f"{key}={value!r} is not supported (only {_HF_REQUIRED_VALUES[key]!r})")
            elif hf and key in ("id2label", "label2id"):
                continue
            else:
                problems.append(f"unknown model config key {key!r}")
        if hf and data.get("model_type", "bert") != "bert":
            problems.append(f"model_type must be 'bert', got {data.get('model_type')!r}")
        if problems:
            raise ConfigError(problems)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(str(exc)) from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"model config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, hf=True)


def _preset(layers: int, heads: int, hidden: int, **extra: Any) -> ModelConfig:
    return ModelConfig(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        **extra,
    )


# The trainer's peak learning rate when no layer (profile, DeepSpeed config, run file, flag) sets one.
# Post-LN BERT wants a lower peak as it grows: on one H200, batch 256, a short warm-up, bert-mini
# learns at 5e-4 and stays on the unigram plateau at 2e-3; bert-base stays on it for 80 s at 5e-4 and
# reaches 28% held-out at 2e-4 (BENCHMARKS.md, time to quality). Sizes without a measured row keep 5e-4.
DEFAULT_LR = 5e-4


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    description: str = field(default="")
    lr: float = DEFAULT_LR  # the trainer's default peak LR for this shape (see DEFAULT_LR)


# The seed's four setups keep their (tiny) shapes for parity; the bert-* sizes are the standard
# ones of Turc et al. 2019 ("Well-Read Students Learn Better") and BERT-base.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("imdb-small", _preset(2, 2, 4, max_position_embeddings=128), "seed v1 (IMDB)"),
        Preset("hf-medium", _preset(4, 4, 8, max_position_embeddings=128), "seed v2"),
        Preset("hf-large", _preset(6, 8, 16, max_position_embeddings=128), "seed v3"),
        Preset("hf-xl", _preset(8, 8, 256, max_position_embeddings=256, vocab_size=25000), "seed v4"),
        Preset("bert-tiny", _preset(2, 2, 128), "Turc et al. 2019"),
        Preset("bert-mini", _preset(4, 4, 256), "Turc et al. 2019"),
        Preset("bert-small", _preset(4, 8, 512), "Turc et al. 2019"),
        Preset("bert-medium", _preset(8, 8, 512), "Turc et al. 2019"),
        Preset("bert-base", _preset(12, 12, 768), "Devlin et al. 2019", lr=2e-4),
    )
}


def get_preset(name: str) -> ModelConfig:
    """The model config of a named preset; an unknown name lists the valid ones."""
    try:
        return PRESETS[name].config
    except KeyError:
        raise ConfigError(unknown_name("preset", name, PRESETS)) from None
