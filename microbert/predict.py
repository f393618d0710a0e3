"""Fill-mask prediction in the Hugging Face pipeline's exact output shapes, without its overhead.

`transformers.pipeline("fill-mask")` runs the full vocabulary projection at every position of every
input, one input at a time through its data loader. `FillMaskPredictor` pads per batch, runs the
encoder once per batch in inference mode, and projects onto the vocabulary only at [MASK]
positions. Results match the pipeline's: one mask gives a list of candidates, several masks give a
list per mask (whose `sequence` keeps the special tokens, as the pipeline's does), highest score
first. The service (`serve/`) uses the three steps `prepare` → `run` → `format` to batch requests
that arrive separately; `predict` chains them for a list of texts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from tokenizers import Tokenizer

from microbert.checkpoint import Artifact, load_artifact
from microbert.errors import InputError, InputTooLongError
from microbert.model import BertForMaskedLM


class Candidate(TypedDict):
    score: float
    token: int
    token_str: str
    sequence: str


# One text's answer: a list of candidates (one mask) or a list of such lists (several masks).
FillMaskResult = list[Candidate] | list[list[Candidate]]


@dataclass
class PreparedInput:
    """A validated, tokenized text and what to predict for it."""

    ids: list[int]
    mask_positions: list[int]
    top_k: int = 5
    target_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def clean_up_tokenization(text: str) -> str:
    """The clean-up `transformers` applies after decoding when `clean_up_tokenization_spaces` is set."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class FillMaskPredictor:
    def __init__(
        self,
        model: BertForMaskedLM,
        tokenizer: Tokenizer,
        *,
        mask_token: str = "[MASK]",
        clean_up_tokenization_spaces: bool = True,
        max_length: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.mask_token = mask_token
        mask_id = tokenizer.token_to_id(mask_token)
        if mask_id is None:
            raise InputError(f"the tokenizer has no mask token {mask_token!r}")
        self.mask_token_id: int = mask_id
        self.pad_token_id = model.config.pad_token_id
        self.clean_up = clean_up_tokenization_spaces
        self.max_length = min(
            max_length or model.config.max_position_embeddings, model.config.max_position_embeddings
        )

    @classmethod
    def from_artifact(cls, artifact: Artifact, **kwargs: Any) -> FillMaskPredictor:
        return cls(artifact.model, artifact.tokenizer, mask_token=artifact.mask_token, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FillMaskPredictor:
        """Load a run folder's newest export or an artifact folder (MicroBERT or `transformers`)."""
        artifact = load_artifact(path, device=device, dtype=dtype)
        clean_up = _clean_up_setting(artifact.path)
        return cls.from_artifact(artifact, clean_up_tokenization_spaces=clean_up)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- step 1: validate and tokenize -----------------------------------------------------------
    def target_ids(self, targets: Sequence[str]) -> list[int]:
        """Vocabulary ids for targets, as the pipeline resolves them (a word or its first piece)."""
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        ids: list[int] = []
        for target in targets:
            if not isinstance(target, str) or not target.strip():
                raise InputError(f"targets must be non-empty words, got {target!r}")
            token_id = vocab.get(target)
            if token_id is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False).ids
                if not pieces:
                    raise InputError(f"target {target!r} has no token in the vocabulary")
                token_id = pieces[0]
            if token_id not in ids:
                ids.append(token_id)
        if not ids:
            raise InputError("targets is empty: give at least one word, or leave it out")
        return ids

    def prepare(self, text: str, *, top_k: int = 5, target_ids: list[int] | None = None) -> PreparedInput:
        if not isinstance(text, str) or not text.strip():
            raise InputError("input text is empty")
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        ids = self.tokenizer.encode(text).ids
        positions = [i for i, token_id in enumerate(ids) if token_id == self.mask_token_id]
        if not positions:
            raise InputError(
                f"no {self.mask_token} in input: put {self.mask_token} where a word should be predicted"
            )
        if len(ids) > self.max_length:
            raise InputTooLongError(
                f"input has {len(ids)} tokens; the model accepts at most {self.max_length} "
                "(including [CLS] and [SEP])",
                num_tokens=len(ids),
                max_tokens=self.max_length,
            )
        vocab_size = self.tokenizer.get_vocab_size()
        k = min(top_k, len(target_ids) if target_ids else vocab_size)
        return PreparedInput(ids=ids, mask_positions=positions, top_k=k, target_ids=target_ids)

    # --- step 2: the model, batched ----------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Sequence[PreparedInput]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Scores and token ids of each input's top-k, per mask: [(values (m, k), ids (m, k)), ...]."""
        if not batch:
            return []
        device = self.device
        longest = max(p.num_tokens for p in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, cols = [], []
        for i, p in enumerate(batch):
            input_ids[i, : p.num_tokens] = torch.tensor(p.ids)
            attention_mask[i, : p.num_tokens] = 1
            rows += [i] * len(p.mask_positions)
            cols += p.mask_positions
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = self.model(input_ids, attention_mask, positions=positions).logits  # (M, V)
        probs = logits.float().softmax(dim=-1)  # (M, V)
        results: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        plain = [i for i, p in enumerate(batch) if p.target_ids is None]
        max_k = max((batch[i].top_k for i in plain), default=0)
        offsets = []
        for p in batch:
            offsets.append(start)
            start += len(p.mask_positions)
        top_values = top_ids = None
        if plain:
            top_values, top_ids = probs.topk(max_k, dim=-1)  # one topk for every plain input
            top_values, top_ids = top_values.cpu(), top_ids.cpu()
        for i, p in enumerate(batch):
            span = slice(offsets[i], offsets[i] + len(p.mask_positions))
            if p.target_ids is None:
                assert top_values is not None and top_ids is not None
                results.append((top_values[span, : p.top_k], top_ids[span, : p.top_k]))
            else:
                targets = torch.tensor(p.target_ids, device=probs.device)
                values, index = probs[span][:, targets].topk(p.top_k, dim=-1)
                results.append((values.cpu(), targets[index].cpu()))
        return results

    # --- step 3: the pipeline's output shape -----------------------------------------------------
    def format(self, prepared: PreparedInput, values: torch.Tensor, ids: torch.Tensor) -> FillMaskResult:
        single = len(prepared.mask_positions) == 1
        per_mask: list[list[Candidate]] = []
        for m, position in enumerate(prepared.mask_positions):
            candidate_ids = ids[m].tolist()
            sequences = []
            for token_id in candidate_ids:
                tokens = list(prepared.ids)
                tokens[position] = token_id
                sequences.append([t for t in tokens if t != self.pad_token_id])
            decoded = self.tokenizer.decode_batch(sequences, skip_special_tokens=single)
            token_strs = self.tokenizer.decode_batch([[t] for t in candidate_ids], skip_special_tokens=False)
            per_mask.append(
                [
                    Candidate(
                        score=float(score),
                        token=int(token_id),
                        token_str=self._clean(token_str),
                        sequence=self._clean(sequence),
                    )
                    for score, token_id, token_str, sequence in zip(
                        values[m].tolist(), candidate_ids, token_strs, decoded, strict=True
                    )
                ]
            )
        return per_mask[0] if single else per_mask

    def _clean(self, text: str) -> str:
        return clean_up_tokenization(text) if self.clean_up else text

    # --- all three ----------------------------------------------------------------------------------
    def predict(
        self,
        texts: str | Sequence[str],
        *,
        top_k: int = 5,
        targets: Sequence[str] | None = None,
        batch_size: int = 64,
    ) -> list[FillMaskResult]:
        """One result per text. Texts are sorted by length into batches to keep padding low."""
        if isinstance(texts, str):
            texts = [texts]
        target_ids = self.target_ids(targets) if targets is not None else None
        prepared = [self.prepare(text, top_k=top_k, target_ids=target_ids) for text in texts]
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].num_tokens)
        results: list[FillMaskResult | None] = [None] * len(prepared)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outputs = self.run([prepared[i] for i in chunk])
            for i, (values, ids) in zip(chunk, outputs, strict=True):
                results[i] = self.format(prepared[i], values, ids)
        return [r for r in results if r is not None]


def _clean_up_setting(folder: Path) -> bool:
    """`clean_up_tokenization_spaces` from the folder's tokenizer config, as `transformers` reads it."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("clean_up_tokenization_spaces", False))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
