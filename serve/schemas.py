"""Request and response bodies, in the Hugging Face Inference API's fill-mask convention.

`huggingface_hub.InferenceClient(model=URL).fill_mask(text, top_k=, targets=)` posts
`{"inputs": text, "parameters": {...}}` and reads a list of candidates, so these shapes are the contract.
The models are strict: a number where a string belongs, or an unknown key, is a 422 that names it,
rather than a guess.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel


class FillMaskParameters(BaseModel):
    """What to predict; both optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(
        default=None,
        ge=1,
        description="how many candidates per mask (default 5; at most the server's max_top_k)",
    )
    targets: list[str] | str | None = Field(
        default=None,
        description="score only these words (a word not in the vocabulary scores its first piece)",
    )


class FillMaskRequest(BaseModel):
    """One text or a list of texts, each with at least one mask token (`[MASK]`)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"inputs": "The [MASK] of the ship."},
                {"inputs": ["To be or not to [MASK].", "A [MASK] and a [MASK]."], "parameters": {"top_k": 3}},
                {"inputs": "The [MASK] was calm.", "parameters": {"targets": ["sea", "land"]}},
            ]
        },
    )

    inputs: str | list[str] = Field(description="a text, or a list of texts, each with [MASK] in it")
    parameters: FillMaskParameters | None = None
    options: dict[str, Any] | None = Field(
        default=None,
        description="accepted for Inference API compatibility (wait_for_model, use_cache) and ignored",
    )


class Candidate(BaseModel):
    """One candidate for one mask, exactly as `transformers.pipeline("fill-mask")` returns it."""

    score: float = Field(description="probability of this token at the mask")
    token: int = Field(description="vocabulary id")
    token_str: str = Field(description="the token as text")
    sequence: str = Field(description="the input with the mask replaced by this token")


class FillMaskResponse(RootModel[list[Candidate] | list[list[Candidate]] | list[list[list[Candidate]]]]):
    """One input, one mask: candidates. Several masks: a list per mask. A list of inputs: one per input."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                [
                    {"score": 0.21, "token": 1012, "token_str": "sea", "sequence": "the sea was calm."},
                    {"score": 0.09, "token": 2045, "token_str": "wind", "sequence": "the wind was calm."},
                ]
            ]
        }
    )


class ErrorBody(BaseModel):
    """Every error: a message a person can act on and a stable type a program can switch on."""

    error: str = Field(examples=["no [MASK] in input: put [MASK] where a word should be predicted"])
    error_type: str = Field(examples=["no_mask"])
    estimated_time: float | None = Field(
        default=None, description="503 only: seconds until the model is expected"
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    step: int | None = None


class Limits(BaseModel):
    max_input_tokens: int
    max_inputs: int
    max_top_k: int
    max_predictions: int
    max_response_bytes: int
    max_batch_size: int
    max_batch_tokens: int
    max_queue_tokens: int
    max_queue: int | None
    max_concurrent_requests: int = Field(description="fill-mask requests at once, all HTTP workers")
    max_concurrent_requests_per_worker: int
    max_body_bytes: int
    request_timeout_s: float


class Info(BaseModel):
    """What is being served and within which limits."""

    model: str = Field(description="artifact folder being served", examples=["runs/demo/export/step-1000"])
    model_dir: str = Field(description="the folder the server was given (a run folder is watched)")
    step: int | None
    dtype: str
    device: str
    mask_token: str
    vocab_size: int
    num_hidden_layers: int
    hidden_size: int
    max_position_embeddings: int
    limits: Limits
    version: str
    loaded_at: float = Field(description="Unix time the model was loaded")
