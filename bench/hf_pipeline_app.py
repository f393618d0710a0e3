"""The baseline service of the serving benchmark: what a user would write with `transformers`.

    MODEL_DIR=runs/x/export/step-N uvicorn bench.hf_pipeline_app:app --port 8001

A FastAPI app around `pipeline("fill-mask")` on one GPU (bf16 when CUDA is there), same request
and response shapes as `POST /fill-mask`. A plain `def` route, so FastAPI runs it in its thread
pool, one pipeline call per request. Used only by `bench/serve_bench.py`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class Request(BaseModel):
    inputs: str | list[str]
    parameters: dict[str, Any] = {}


cuda = torch.cuda.is_available()
fill_mask = pipeline(
    "fill-mask",
    model=os.environ["MODEL_DIR"],
    device=0 if cuda else -1,
    dtype=torch.bfloat16 if cuda else torch.float32,
)
app = FastAPI()


@app.get("/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/fill-mask")
def predict(request: Request) -> Any:
    return fill_mask(request.inputs, top_k=int(request.parameters.get("top_k", 5)))
