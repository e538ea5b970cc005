"""Optimizer configuration for `build_optimizer` (AdamW, clipping, precision, ZeRO-1 sharding).

The training package builds it from its run configuration (megatron/training/model_builder.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and how the optimizer holds its state.

    lr: initial learning rate; the training loop's scheduler overrides it each step (`set_lr`).
    min_lr: kept for the scheduler's benefit; the optimizer itself does not read it.
    weight_decay: decoupled (AdamW) decay, applied to every parameter except biases and 1-D ones.
    clip_grad: clip by the global L2 norm of all gradients to this value; 0 disables clipping
        (the norm is still computed, for logging and the non-finite check).
    bf16: the model holds bf16 (or other low-precision) weights; the optimizer keeps fp32 master
        weights and fp32 Adam state. fp32 parameters are always updated in place without a copy.
    use_distributed_optimizer: shard master weights and Adam state over DP ranks (ZeRO-1).
    log_num_zeros_in_grad: also return the number of zero gradient entries (one more reduction).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    use_distributed_optimizer: bool = False
    log_num_zeros_in_grad: bool = False
    # Run the AdamW update through the device's fused kernel (Intel's FusedAdamW on Gaudi) when the
    # device has one; the arithmetic is AdamW's either way (--optimizer fusedadamw).
    use_fused_adamw: bool = False

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not self.min_lr >= 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if not self.clip_grad >= 0:
            raise ValueError(f"clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
