"""Gaudi's fused optimizer kernels behind the device layer, each with the plain path as fallback.

- Gradient clipping: Intel's FusedClipNorm computes the L2 norm of a list of gradients and scales
  them in place by max_norm / (norm + 1e-6) when that is below 1 (torch's clip_grad_norm_ rule,
  and `clip_grads.clip_grads_`'s) in one kernel. It only sees this rank's tensors, so it equals
  the global norm of `clip_grads.global_grad_norm` exactly when this rank holds one full copy of
  every gradient: no tensor, pipeline or expert parallelism and no optimizer sharding over data
  parallelism (`fused_clip_applicable`). Elsewhere the global-norm path runs.
- AdamW: `Device.fused_adamw()` returns Intel's FusedAdamW class (or None); the optimizer builds
  with it when present and asked for (`--optimizer fusedadamw`), its own AdamW otherwise.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron.core.device import Device
from megatron.core.parallel_state import ParallelState


class _GradHolder:
    """What FusedClipNorm reads from a parameter: `.grad` (and `.dtype`, for its max-norm tensor)."""

    __slots__ = ("grad", "dtype")

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad
        self.dtype = grad.dtype


def fused_clip_applicable(parallel_state: ParallelState, sharded_over_dp: bool) -> bool:
    """This rank's gradients are the whole model's gradient (so a local norm is the global one)."""
    grid = parallel_state.grid
    return not sharded_over_dp and grid.tp == 1 and grid.pp == 1 and grid.ep == 1 and grid.etp == 1


def fused_clip_grads(grads: Sequence[torch.Tensor], max_norm: float, device: Device) -> Optional[float]:
    """Clip `grads` in place with Gaudi's FusedClipNorm and return their total L2 norm.

    None when the device has no fused kernel, max_norm is 0 (clipping off) or there is nothing to
    clip: the caller then runs `global_grad_norm` + `clip_grads_`. Only call it where
    `fused_clip_applicable` holds. Reading the norm back is the same one host read the plain path does.
    """
    kernel = device.fused_clip_norm()
    if kernel is None or max_norm <= 0 or not grads:
        return None
    holders: List[_GradHolder] = [_GradHolder(g) for g in grads]
    clipper = kernel(holders, max_norm)
    total = clipper.clip_norm(holders)
    return float(total.float().item()) if isinstance(total, torch.Tensor) else float(total)


def fused_adamw_class(device: Device) -> Optional[type]:
    """Intel's FusedAdamW optimizer class on Gaudi, else None (the device layer's accessor)."""
    return device.fused_adamw()
