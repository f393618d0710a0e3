"""Flat parameters for DeepSpeed: its per-parameter work runs twice per step instead of ~150 times.

DeepSpeed's ZeRO stage 1 registers a gradient hook, computes a norm and copies gradients for every
parameter tensor, each a few small kernel launches and Python calls. For a small BERT on a fast
GPU that host work is longer than the GPU's (measured on an H100, v4 shape: 0.53 -> 0.92 M
tokens/s with flat parameters; bench/NOTES.md). `FlatParameters` gives DeepSpeed a module with two
parameters, the weights that take weight decay and those that do not (biases, LayerNorm), and
runs the model with views into them (`torch.func.functional_call`). The model itself is untouched:
same code, same names; `sync_to_model()` copies the trained values back into it for export.
The same wrapper is used on every device, so CPU tests exercise the GPU code path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from microbert.config import ModelConfig
from microbert.model import BertForMaskedLM


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The BERT recipe: matrices decay; biases and LayerNorm weights do not."""
    return param.ndim >= 2 and "LayerNorm" not in name


class FlatParameters(nn.Module):
    GROUPS = ("decay", "no_decay")
    # Declared for the type checker: set by register_parameter and through __dict__ in __init__.
    flat_decay: nn.Parameter
    flat_no_decay: nn.Parameter
    model: BertForMaskedLM

    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        named = dict(model.named_parameters())  # tied parameters appear once
        self.layout: dict[str, list[tuple[str, torch.Size]]] = {group: [] for group in self.GROUPS}
        for name, param in named.items():
            group = "decay" if takes_weight_decay(name, param) else "no_decay"
            self.layout[group].append((name, param.shape))
        for group, entries in self.layout.items():
            values = [named[name].detach().reshape(-1) for name, _ in entries]
            self.register_parameter(f"flat_{group}", nn.Parameter(torch.cat(values)))
        # Kept outside the module tree, so DeepSpeed sees only the flat parameters; the model's own
        # tensors are not used in forward (functional_call swaps in the views).
        self.__dict__["model"] = model

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def views(self) -> dict[str, torch.Tensor]:
        views: dict[str, torch.Tensor] = {}
        for group, entries in self.layout.items():
            flat = getattr(self, f"flat_{group}")
            chunks = torch.split(flat, [shape.numel() for _, shape in entries])
            views.update(
                {name: chunk.view(shape) for (name, shape), chunk in zip(entries, chunks, strict=True)}
            )
        return views

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.views(), args, kwargs, tie_weights=True, strict=False)

    def train(self, mode: bool = True) -> FlatParameters:
        super().train(mode)
        self.model.train(mode)
        return self

    @torch.no_grad()
    def sync_to_model(self) -> BertForMaskedLM:
        """Copy the flat values into the model's own parameters (fp32, CPU) and return the model."""
        params = dict(self.model.named_parameters())
        for name, view in self.views().items():
            params[name].data = view.detach().to("cpu", torch.float32).clone()
        return self.model
