"""BERT for masked-language modelling, in one file you can read top to bottom.

Post-LN encoder (Devlin et al. 2019) with `scaled_dot_product_attention`, so PyTorch picks the
flash / memory-efficient kernels where it can. Module and parameter names follow
`transformers`' `BertForMaskedLM` one to one, so a state dict moves between the two unchanged.

Two departures from `transformers`, both for speed and neither visible in the weights:
- with labels, the MLM head (a d×V matmul, the largest in small models) runs only on the masked
  positions, as in MosaicBERT and ModernBERT;
- without labels, `positions` restricts the head to the positions asked for (the fill-mask
  predictor asks for the [MASK] positions only).

Shapes in comments: B batch, T sequence length, d hidden size, nh heads, hs head size, V vocab,
M masked positions in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microbert.config import ModelConfig

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


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, attn_mask)
        return x


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
    ) -> torch.Tensor:
        attn_mask = None
        if attention_mask is not None:
            # (B, T) 1 = token, 0 = padding -> (B, 1, 1, T) True where a key may be attended to.
            attn_mask = attention_mask[:, None, None, :].to(torch.bool)
        return self.encoder(self.embeddings(input_ids, token_type_ids), attn_mask)  # (B, T, d)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))  # (..., V)


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
        max_masked_per_row: int | None = None,
    ) -> MaskedLMOutput:
        """MLM forward.

        labels (B, T): the loss over positions whose label is not -100; the head runs on those only.
        positions: without labels, a (B, T) boolean mask or a pair of index tensors selecting where
        the head runs; logits come back flattened to (M, V) in row-major order.
        max_masked_per_row: with labels, run the head on a fixed K positions per row instead (the
        masked ones first, padded with ignored slots): static shapes and no host synchronisation,
        for compiled GPU training. See `masked_positions_cap` for a K that never drops a label.
        """
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, d)
        if labels is not None and max_masked_per_row is not None:
            B, T, d = hidden.shape
            K = min(max_masked_per_row, T)
            # A stable sort puts each row's masked positions first, in order.
            order = torch.argsort((labels == IGNORE_INDEX).to(torch.uint8), dim=1, stable=True)[
                :, :K
            ]  # (B, K)
            targets = labels.gather(1, order).reshape(-1)  # (B*K,), -100 in the padding slots
            selected = hidden.gather(1, order.unsqueeze(-1).expand(B, K, d))  # (B, K, d)
            logits = self.cls(selected).reshape(B * K, -1)  # (B*K, V)
            loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
            return MaskedLMOutput(loss=loss, logits=logits, num_masked=(targets != IGNORE_INDEX).sum())
        if labels is not None:
            flat_labels = labels.reshape(-1)  # (B*T,)
            selected = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]  # (M,)
            logits = self.cls(hidden.reshape(-1, hidden.shape[-1]).index_select(0, selected))  # (M, V)
            targets = flat_labels.index_select(0, selected)
            loss = F.cross_entropy(logits.float(), targets)
            return MaskedLMOutput(loss=loss, logits=logits, num_masked=selected.new_tensor(len(selected)))
        if positions is not None:
            hidden = hidden[positions]  # (M, d)
        return MaskedLMOutput(loss=None, logits=self.cls(hidden))


def masked_positions_cap(seq_len: int, mlm_probability: float) -> int:
    """A per-row cap K on masked positions that a Bernoulli(p) masking exceeds with odds < 1e-9.

    Mean + 6.5 standard deviations of Binomial(T, p): at T=128, p=0.15 that is 47 of 128 positions,
    so the head still runs on about a third of the positions, with static shapes.
    """
    mean = seq_len * mlm_probability
    std = math.sqrt(seq_len * mlm_probability * (1 - mlm_probability))
    return min(seq_len, math.ceil(mean + 6.5 * std) + 1)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied decoder weight counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
