"""BERT for masked-language modelling, in one file you can read top to bottom.

Post-LN encoder (Devlin et al. 2019) with `scaled_dot_product_attention`, so PyTorch picks the
flash / memory-efficient kernels where it can. Module and parameter names follow
`transformers`' `BertForMaskedLM` one to one, so a state dict moves between the two unchanged.

Two departures from `transformers`, both for speed and neither visible in the weights:
- with labels, the MLM head (a d×V matmul, the largest in small models) runs only on the masked
  positions, as in MosaicBERT and ModernBERT;
- without labels, `positions` restricts the head to the positions asked for (the fill-mask
  predictor asks for the [MASK] positions only), and the last layer too: every position is still a
  key and a value there, but its queries, projection, feed-forward and norms run on those rows
  alone (in bert-tiny that is ~40% of the encoder's work on a one-mask sentence).

Shapes in comments: B batch, T sequence length, d hidden size, nh heads, hs head size, V vocab,
M masked positions in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microbert.config import (
    POSITION_INITS,
    SINUSOIDAL_POSITION_STD,
    UNIGRAM_SAMPLE_ROWS,
    ModelConfig,
    resolve_position_init,
)

if TYPE_CHECKING:
    from microbert.run_config import TrainConfig

IGNORE_INDEX = -100  # label of positions that are not predicted (the `transformers` convention)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported activation {name!r}")


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, d)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        nh = self.num_heads

        # One (d, 3d) matmul instead of three. The weights stay three parameters under their
        # transformers names and are concatenated per call: a copy of 3·d² values, small next to
        # the (B, T, 3d) activations, and fused away under torch.compile.
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))  # (3d, d)
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))  # (3d,)
        qkv = F.linear(x, weight, bias).view(B, T, 3, nh, d // nh)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, d)

    def attend_from(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """`forward(x, attn_mask)[rows, cols]`, (M, d), with queries at those positions only: keys
        and values for every position of the rows asked for, one query each."""
        B, T, d = x.shape
        nh, M = self.num_heads, rows.shape[0]
        q = F.linear(x[rows, cols], self.query.weight, self.query.bias).view(M, nh, 1, d // nh)
        weight = torch.cat((self.key.weight, self.value.weight))  # (2d, d)
        bias = torch.cat((self.key.bias, self.value.bias))  # (2d,)
        kv = F.linear(x, weight, bias).view(B, T, 2, nh, d // nh).index_select(0, rows)  # (M, T, 2, nh, hs)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (M, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attn_mask is None else attn_mask.index_select(0, rows),
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (M, nh, 1, hs)
        return y.reshape(M, d)


class BertSelfOutput(nn.Module):
    """Projection, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, config: ModelConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, attn_mask)  # (B, T, d)
        return self.output(self.intermediate(x), x)  # (B, T, d)

    def forward_at(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """`forward(x, attn_mask)[rows, cols]`, (M, d): everything after the keys and values runs
        on the M positions only."""
        attention = self.attention
        y = attention.output(attention.self.attend_from(x, attn_mask, rows, cols), x[rows, cols])  # (M, d)
        return self.output(self.intermediate(y), y)  # (M, d)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, T, d); with `positions` (rows, cols), only those positions' outputs, (M, d)."""
        layers = cast("list[BertLayer]", list(self.layer))
        if positions is None or not layers:
            for layer in layers:
                x = layer(x, attn_mask)
            return x if positions is None else x[positions]
        for layer in layers[:-1]:
            x = layer(x, attn_mask)
        return layers[-1].forward_at(x, attn_mask, *positions)


class BertModel(nn.Module):
    """Embeddings + encoder; no pooler (BertForMaskedLM has none)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, T, d); with `positions` (rows, cols), only those positions' outputs, (M, d)."""
        attn_mask = None
        if attention_mask is not None:
            # (B, T) 1 = token, 0 = padding -> (B, 1, 1, T) True where a key may be attended to.
            attn_mask = attention_mask[:, None, None, :].to(torch.bool)
        return self.encoder(self.embeddings(input_ids, token_type_ids), attn_mask, positions)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # decoder.weight is tied to the word embeddings by BertForMaskedLM; decoder.bias is `bias`
        # (the same Parameter under both names, as in transformers).
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias
        # Inference only, when asked (`BertForMaskedLM.keep_padded_decoder`): the decoder's weight
        # and bias padded once for `aligned_linear`, and what they were copied from.
        self.keep_padded = False
        self._padded: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if x.device.type == "cpu":
            return self.decoder(x)  # (..., V)
        if self.keep_padded and not torch.is_grad_enabled():
            weight, bias = self.padded_decoder()
            return F.linear(x, weight, bias)[..., : self.bias.shape[0]]  # (..., V)
        return aligned_linear(x, self.decoder.weight, self.bias)  # (..., V)

    def padded_decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's weight and bias padded as `aligned_linear` pads them, copied once and again
        only when the weights change (another tensor, device or dtype, or an in-place write): for
        bert-base on a GPU, 47 MB that every forward pass would otherwise copy."""
        weight, bias = self.decoder.weight, self.bias
        key = (
            weight.data_ptr(),
            weight._version,
            bias.data_ptr(),
            bias._version,
            weight.dtype,
            weight.device,
        )
        if self._padded is None or self._padded[0] != key:
            with torch.no_grad():
                self._padded = (key, *pad_rows(weight.detach(), bias.detach()))
        return self._padded[1], self._padded[2]


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor | None  # mean cross-entropy over the masked positions, when labels are given
    logits: torch.Tensor  # (M, V) with labels or positions, else (B, T, V)
    num_masked: torch.Tensor | None = None  # M, as a tensor (no host sync)


class BertForMaskedLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def keep_padded_decoder(self) -> None:
        """For inference: forward passes without autograd use a padded copy of the output layer made
        once (`BertLMPredictionHead.padded_decoder`) instead of padding it in each. Training (and
        any pass with autograd on) keeps padding per call, so gradients reach the weights as before.
        The copy follows the weights' tensor and version; a write through `.data` (which no version
        counter sees) must be followed by this call again, which drops the copy."""
        head = self.cls.predictions
        head.keep_padded, head._padded = True, None
        if head.decoder.weight.device.type != "cpu":  # made now, on the current stream, not mid-capture
            head.padded_decoder()

    def tie_weights(self) -> None:
        """Tie the decoder to the word embeddings and the output bias (after loading a state dict)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        masked_slots: int | None = None,
    ) -> MaskedLMOutput:
        """MLM forward.

        labels (B, T): the loss over positions whose label is not -100; the head runs on those only.
        positions: without labels, a (B, T) boolean mask or a pair of index tensors selecting where
        the head runs; logits come back flattened to (M, V) in row-major order.
        masked_slots: with labels, run the head on exactly this many positions of the batch instead
        (the masked ones first, in order, then ignored ones): static shapes and no host
        synchronisation, for compiled and CUDA-graph training. `masked_slots_for` gives a count
        that Bernoulli masking exceeds with odds below 1e-9; masked positions past it would be left
        out of the loss, and `num_masked` counts them all so a caller can tell.
        """
        if labels is None and positions is not None:
            if isinstance(positions, torch.Tensor):  # a (B, T) boolean mask: its indices, row-major
                rows, cols = positions.nonzero(as_tuple=True)
            else:
                rows, cols = positions
            hidden = self.bert(input_ids, attention_mask, token_type_ids, positions=(rows, cols))  # (M, d)
            return MaskedLMOutput(loss=None, logits=self.cls(hidden))
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, d)
        if labels is not None and masked_slots is not None:
            flat_labels = labels.reshape(-1)  # (B*T,)
            slots = min(masked_slots, flat_labels.numel())
            # A stable sort puts the masked positions first, in order: (S,) indices, no sync.
            order = torch.argsort((flat_labels == IGNORE_INDEX).to(torch.uint8), stable=True)[:slots]
            targets = flat_labels.index_select(0, order)  # (S,), -100 past the masked ones
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, order)  # (S, d)
            logits = self.cls(selected)  # (S, V)
            loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
            return MaskedLMOutput(loss=loss, logits=logits, num_masked=(flat_labels != IGNORE_INDEX).sum())
        if labels is not None:
            flat_labels = labels.reshape(-1)  # (B*T,)
            selected = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]  # (M,)
            logits = self.cls(hidden.reshape(-1, hidden.shape[-1]).index_select(0, selected))  # (M, V)
            targets = flat_labels.index_select(0, selected)
            loss = F.cross_entropy(logits.float(), targets)
            return MaskedLMOutput(loss=loss, logits=logits, num_masked=selected.new_tensor(len(selected)))
        return MaskedLMOutput(loss=None, logits=self.cls(hidden))


def masked_slots_for(num_tokens: int, mlm_probability: float) -> int:
    """Head slots for a batch of `num_tokens` positions that Bernoulli(p) masking overflows with odds < 1e-9.

    Mean + 6.5 standard deviations of Binomial(num_tokens, p), rounded up to a multiple of 64 for
    the matmul. The count of a whole batch is far tighter than a row's: at 256 × 128 tokens and
    p = 0.15 that is 5,376 slots for a mean of 4,915 (a per-row cap would need 12,032).
    """
    mean = num_tokens * mlm_probability
    std = math.sqrt(num_tokens * mlm_probability * (1 - mlm_probability))
    return min(num_tokens, 64 * math.ceil((mean + 6.5 * std + 1) / 64))


def aligned_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, multiple: int = 64
) -> torch.Tensor:
    """`F.linear` with the output dimension padded to `multiple` for the matmul, then sliced back.

    BERT's 30,522-token vocabulary leaves each row of the logits 61,044 bytes long, not a multiple
    of 16, and cuBLAS then falls back from the Hopper tensor-core kernels to ones about 3× slower
    for the largest matmul of the step (bench/NOTES.md). Padding the matmul, not the model, keeps
    the weights and their names as they are; the padded columns are sliced away.
    """
    out_features = weight.shape[0]
    if out_features % multiple == 0:
        return F.linear(x, weight, bias)
    logits = F.linear(x, *pad_rows(weight, bias, multiple))
    return logits[..., :out_features]


def pad_rows(
    weight: torch.Tensor, bias: torch.Tensor, multiple: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight and (out,) bias with zero rows appended up to a multiple of `multiple`."""
    pad = -weight.shape[0] % multiple
    return F.pad(weight, (0, 0, 0, pad)), F.pad(bias, (0, pad))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied decoder weight counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) sin/cos table with root-mean-square 1 (even dims sin, odd dims cos)."""
    pos = torch.arange(positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table * math.sqrt(2.0)


@torch.no_grad()
def init_position_embeddings(model: BertForMaskedLM, kind: str, std: float | None = None) -> None:
    """Re-initialise the position embeddings of a freshly built model (microbert.config explains
    the choice; "auto" picks by the model's width).

    `std` is the root-mean-square of the starting values: by default SINUSOIDAL_POSITION_STD for
    "sinusoidal" and the config's initializer range for "normal" (BERT's own init, left untouched).
    """
    weight = model.bert.embeddings.position_embeddings.weight
    kind = resolve_position_init(kind, model.config.hidden_size)
    if kind == "normal":
        if std is not None:
            weight.mul_(std / model.config.initializer_range)
    elif kind == "sinusoidal":
        table = sinusoid_table(weight.shape[0], weight.shape[1])
        weight.copy_(table * (SINUSOIDAL_POSITION_STD if std is None else std))
    else:
        raise ValueError(f"unknown position init {kind!r}; choose one of {', '.join(POSITION_INITS)}")


@torch.no_grad()
def scale_residual_branches(model: BertForMaskedLM, factor: float) -> None:
    """Multiply the weights that end each residual branch (attention output, feed-forward output) by
    `factor` in a freshly built model.

    With factor 1/√(2·layers) (GPT-2's scaled init) each post-LN layer starts close to the identity,
    which Liu et al. 2020 ("Understanding the difficulty of training transformers") show eases the
    early training of deep post-LN stacks. Only the starting values change: the architecture, the
    parameter names and the `transformers` export stay as they are.
    """
    for layer in model.bert.encoder.layer:
        assert isinstance(layer, BertLayer)
        layer.attention.output.dense.weight.mul_(factor)
        layer.output.dense.weight.mul_(factor)


@torch.no_grad()
def init_output_bias_unigram(model: BertForMaskedLM, rows: np.ndarray, special_ids: list[int]) -> None:
    """Start the MLM head's bias at the log-frequency of each token in the training rows.

    An untrained model spends its first steps learning the unigram distribution through this bias
    (the "unigram plateau" is that distribution); starting there gives those steps to context.
    `rows` is (N, T) token ids; up to UNIGRAM_SAMPLE_ROWS of them, evenly spread, are counted.
    Special tokens (and padding) are never targets and get the smallest log-frequency.
    """
    stride = max(1, -(-len(rows) // UNIGRAM_SAMPLE_ROWS))
    sample = np.asarray(rows[::stride]).reshape(-1)
    vocab = model.config.vocab_size
    counts = torch.from_numpy(np.bincount(sample, minlength=vocab)[:vocab].astype(np.float64))
    counts[special_ids] = 0
    log_freq = torch.log((counts + 1.0) / (counts.sum() + vocab))
    bias = model.cls.predictions.bias
    bias.copy_((log_freq - log_freq.mean()).to(bias.dtype))


def init_weights(
    model: BertForMaskedLM, settings: TrainConfig, rows: np.ndarray | None, special_ids: list[int]
) -> None:
    """The run's starting values beyond BERT's (positions, residual branches, head bias), in place.

    `settings`: the run's `position_init`, `position_init_std`, `residual_init` and `output_bias_init`
    (microbert.config says why each exists). `rows`: the training rows that
    the unigram bias is counted from (None: the bias stays zero).
    """
    init_position_embeddings(model, settings.position_init, settings.position_init_std)
    if settings.residual_init == "scaled":
        scale_residual_branches(model, 1.0 / math.sqrt(2 * model.config.num_hidden_layers))
    if settings.output_bias_init == "unigram" and rows is not None:
        init_output_bias_unigram(model, rows, special_ids)
