"""The AdamW update on lists of fp32 tensors, with torch.optim.AdamW's exact arithmetic.

Same operations, in the same order, with the same Python-float scalars as torch's reference
implementation (decoupled weight decay, amsgrad off, not maximising), so an fp32 run matches
``torch.optim.AdamW`` bit for bit on the same tensors:

    p   *= 1 - lr * wd
    m    = lerp(m, g, 1 - beta1)
    v    = v * beta2 + (1 - beta2) * g * g
    p   += -(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The tensors may have any shapes (the optimizers pass flat 1-D shards); they are updated in place
with foreach kernels (one launch per op for the whole list on CUDA / HPU).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def adamw_step_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    *,
    step: int,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One AdamW step (the `step`-th, counting from 1) on matching lists of fp32 tensors, in place."""
    if not params:
        return
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    t = float(step)  # torch keeps the step as a float tensor and reads it back as a Python float
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2**0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


class FusedAdamWRunner:
    """The same AdamW step through a fused optimizer class with torch.optim's interface
    (`cls(params, lr=, betas=, eps=, weight_decay=)`, `.state[p]`, `.step()`), e.g. Intel's
    FusedAdamW on Gaudi.

    The optimizer's own fp32 tensors stay the state: each master tensor is wrapped (storage
    shared) as a parameter of one `cls` instance per parameter group, whose state entries are the
    slot's exp_avg / exp_avg_sq tensors, so checkpoints read and restore the same memory. The step
    count is written into the state before every step (torch.optim keeps it as a tensor and adds 1).
    """

    def __init__(self, cls: type, groups: List[List[Tuple[Tensor, Tensor, Tensor]]], betas: Tuple[float, float],
                 eps: float) -> None:
        """groups: per parameter group, (master, exp_avg, exp_avg_sq) of each slot."""
        self.holders: List[List[torch.nn.Parameter]] = []
        self.optimizers = []
        for members in groups:
            holders = [torch.nn.Parameter(master, requires_grad=False) for master, _, _ in members]
            opt = cls(holders, lr=0.0, betas=betas, eps=eps, weight_decay=0.0) if holders else None
            if opt is not None:
                for holder, (_, exp_avg, exp_avg_sq) in zip(holders, members):
                    opt.state[holder] = {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            self.holders.append(holders)
            self.optimizers.append(opt)

    def step_(self, group: int, grads: List[Tensor], *, step: int, lr: float, weight_decay: float) -> None:
        """One step of parameter group `group` with these fp32 gradients (one per member, in order)."""
        opt = self.optimizers[group]
        if opt is None:
            return
        for pg in opt.param_groups:
            pg["lr"], pg["weight_decay"] = lr, weight_decay
        for holder, grad in zip(self.holders[group], grads):
            holder.grad = grad
            state = opt.state[holder]
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].fill_(step - 1)
            else:
                state["step"] = step - 1
        opt.step()
        for holder in self.holders[group]:
            holder.grad = None
