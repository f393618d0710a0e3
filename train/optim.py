"""AdamW that clips the global gradient norm itself, without a host synchronisation.

DeepSpeed's ZeRO optimizer clips with `if is_invalid_grad_norm(norm)`, which reads the norm back
to the host every step: the CPU waits for the GPU to finish the backward pass before it may queue
the next step's kernels, and for a small BERT the GPU then idles while the CPU catches up. Here the
norm stays on the device: each rank takes the squared norm of the gradient partition it owns,
one all-reduce sums them, and the scale `min(1, max_norm / norm)` multiplies the gradients in
place. DeepSpeed is then configured with `gradient_clipping: 0` and `compute_grad_norm: false`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


class ClippedAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable[Any], *, max_grad_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None  # on the device; read it only when logging

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2.0)
            total = torch.stack([n.float() for n in norms]).square().sum()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total)  # ZeRO-1: each rank holds one partition of the gradients
            norm = total.sqrt()
            self.last_grad_norm = norm
            if self.max_grad_norm > 0:
                scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, scale)
        return super().step(closure)
