"""One flat parameter for DeepSpeed: its per-parameter work runs once per step instead of ~150 times.

DeepSpeed's ZeRO stage 1 registers a gradient hook, computes a norm and copies gradients for every
parameter tensor, each a few small kernel launches and Python calls. For a small BERT on a fast
GPU that host work (~40 ms per step for 8 layers) is longer than the GPU's (~14 ms): the GPU
waits. `FlatParameters` gives DeepSpeed a module with a single parameter holding every weight of
the model, and runs the model with views into it (`torch.func.functional_call`), so DeepSpeed
handles one tensor. The model itself is untouched: same code, same names; `sync_to_model()` copies
the trained values back into it for export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class FlatParameters(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        named = dict(model.named_parameters())  # tied parameters appear once
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.numels = [p.numel() for p in named.values()]
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in named.values()]))
        # Kept outside the module tree, so DeepSpeed sees only `flat`; its own copies of the
        # weights are not used in forward (functional_call swaps in the views).
        self.__dict__["model"] = model

    def views(self) -> dict[str, torch.Tensor]:
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(
                self.names, torch.split(self.flat, self.numels), self.shapes, strict=True
            )
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.views(), args, kwargs, tie_weights=True, strict=False)

    def train(self, mode: bool = True) -> FlatParameters:
        super().train(mode)
        self.model.train(mode)
        return self

    @torch.no_grad()
    def sync_to_model(self) -> nn.Module:
        """Copy the flat values into the model's own parameters (for export) and return it."""
        params = dict(self.model.named_parameters())
        for name, view in self.views().items():
            target = params[name]
            target.data = view.detach().to(target.device, target.dtype).clone()
        return self.model
