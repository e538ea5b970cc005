"""Top-k router of DeepSeek-V3 (sigmoid, expert bias, group-limited) and DeepSeek-V2 (softmax).

Numerics follow HF transformers' DeepseekV3TopkRouter / DeepseekV2TopkRouter exactly: logits in
fp32 with both the input and the gate weight upcast (bf16 logits flip expert choices), the bias
added in fp32 for the choice only, routing weights gathered from the unbiased scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import DeepSeekConfig
from megatron.core.tensor_parallel.mappings import Group
from megatron.core.transformer.moe import load_balancing as lb

# Added to the sum of the k selected sigmoid scores before normalising (as HF / DeepSeek do).
_TOPK_NORM_EPS = 1e-20
# Buffers kept in fp32 even when the module is cast to bf16 (`model.to(torch.bfloat16)`).
_FP32_BUFFERS = ("expert_bias", "local_tokens_per_expert")


@dataclass
class RouterOutput:
    """What the router hands to the dispatcher (T = batch * seq tokens, E experts, k = topk)."""

    probs: torch.Tensor  # [T, k] fp32 routing weights; aux losses are attached to it
    indices: torch.Tensor  # [T, k] int64 chosen experts
    logits: torch.Tensor  # [T, E] fp32
    scores: torch.Tensor  # [T, E] fp32 unbiased sigmoid / softmax scores
    tokens_per_expert: torch.Tensor  # [E] int64 routing choices of real tokens, before any drop
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached values, coeff included


def compute_routing(
    logits: torch.Tensor,
    *,
    score_function: str,
    topk: int,
    num_groups: int = 1,
    group_topk: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    expert_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts from fp32 logits [T, E]; returns (probs [T, k] fp32, indices [T, k], scores [T, E]).

    sigmoid (V3): choice = sigmoid + bias; groups scored by the sum of their top-2 choice values;
    experts outside the best `group_topk` groups get -inf; weights come from the unbiased scores,
    optionally normalised (sum + 1e-20), then scaled.
    softmax (V2): greedy top-k, or with groups: group score = max, other groups set to 0.0;
    weights scaled; `norm_topk_prob` is ignored (as in HF and DeepSeek-V2).
    """
    num_tokens, num_experts = logits.shape
    per_group = num_experts // num_groups
    if score_function == "sigmoid":
        scores = logits.sigmoid()
        choice = scores if expert_bias is None else scores + expert_bias.float()
        if num_groups > 1:
            group_scores = choice.view(num_tokens, num_groups, per_group).topk(2, dim=-1).values.sum(dim=-1)
            choice = choice.masked_fill(~_group_mask(group_scores, group_topk, per_group), float("-inf"))
        indices = torch.topk(choice, k=topk, dim=-1, sorted=False).indices
        probs = scores.gather(1, indices)
        if norm_topk_prob:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + _TOPK_NORM_EPS)
    elif score_function == "softmax":
        if expert_bias is not None:
            raise ValueError("the expert bias is only defined for sigmoid routing")
        scores = logits.softmax(dim=-1)
        choice = scores
        if num_groups > 1:
            group_scores = scores.view(num_tokens, num_groups, per_group).max(dim=-1).values
            choice = scores.masked_fill(~_group_mask(group_scores, group_topk, per_group), 0.0)
        probs, indices = torch.topk(choice, k=topk, dim=-1, sorted=False)
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    return probs * routed_scaling_factor, indices, scores


def _group_mask(group_scores: torch.Tensor, group_topk: int, per_group: int) -> torch.Tensor:
    """[T, G] group scores -> [T, G * per_group] bool, True for experts of the best `group_topk` groups."""
    best = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand(-1, -1, per_group).reshape(group_scores.shape[0], -1)


class TopKRouter(nn.Module):
    """Gate `weight` [E, H] plus routing, load statistics and auxiliary losses of one MoE layer.

    forward(hidden [B, S, H] or [T, H], token_mask [B, S] / [T] bool, True = real token)
    -> RouterOutput over the T = B * S flattened tokens. 2-D input counts as one sequence for the
    sequence-wise aux loss.

    With `enable_expert_bias`, `expert_bias` (fp32 buffer [E], saved in checkpoints; HF's
    `e_score_correction_bias`) shifts the choice, and `local_tokens_per_expert` (fp32 buffer [E],
    not saved) accumulates the choices of real tokens over the micro-batches of one optimizer
    step, on the device, without host sync. Only training forwards with autograd enabled count:
    eval passes do not, and neither does the no-grad first pass of reentrant activation
    checkpointing (a non-reentrant recompute counts every token twice, which scales all loads
    alike and so leaves sign(mean - load) unchanged). `update_expert_bias()` applies
    the step's update and resets the buffer.
    """

    def __init__(self, config: DeepSeekConfig, sequence_group: Optional[Group] = None) -> None:
        """sequence_group: the TP group under sequence parallelism (its ranks hold slices of the
        same sequences; the auxiliary losses are computed over whole sequences across it)."""
        super().__init__()
        self.sequence_group = sequence_group
        moe = config.moe
        self.config = moe
        self.hidden_size = config.hidden_size
        self.num_experts = moe.num_experts
        self.topk = moe.topk
        self.aux_loss_scale = 1.0
        self.weight = nn.Parameter(torch.empty(moe.num_experts, config.hidden_size))
        if moe.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))
            self.register_buffer(
                "local_tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.float32), persistent=False
            )
        else:
            self.expert_bias: Optional[torch.Tensor] = None
            self.local_tokens_per_expert: Optional[torch.Tensor] = None

    # ---- dtype handling ---------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "TopKRouter":
        """Follow device moves but keep the bias and load buffers in exact fp32 under dtype casts."""
        saved = {name: self._buffers[name] for name in _FP32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in saved.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self

    # ---- load balancing controls --------------------------------------------------------------
    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient factor of the aux losses in backward (e.g. 1 / num_micro_batches); read at forward."""
        self.aux_loss_scale = float(scale)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """expert_bias += rate * sign(mean_load - load), then reset the accumulated load.

        `tokens_per_expert` [E] overrides the local buffer (e.g. after an all-reduce over DP);
        `DeepSeekModel.update_expert_bias` does that for every router of a model stage.
        """
        if self.expert_bias is None or self.local_tokens_per_expert is None:
            raise ValueError("update_expert_bias needs enable_expert_bias=True in the MoE config")
        load = self.local_tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        lb.apply_bias_update(self.expert_bias, load, self.config.bias_update_rate)
        self.local_tokens_per_expert.zero_()

    # ---- forward --------------------------------------------------------------------------------
    def route(self, flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing rule alone (no load counting, no aux losses), for flat tokens [T, H]:
        (logits [T, E] fp32, probs [T, k], indices [T, k], scores [T, E])."""
        moe = self.config
        logits = F.linear(flat.float(), self.weight.float())  # [T, E] fp32
        probs, indices, scores = compute_routing(
            logits,
            score_function=moe.score_function,
            topk=moe.topk,
            num_groups=moe.num_groups,
            group_topk=moe.group_topk,
            norm_topk_prob=moe.norm_topk_prob,
            routed_scaling_factor=moe.routed_scaling_factor,
            expert_bias=self.expert_bias,
        )
        return logits, probs, indices, scores

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> RouterOutput:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"router expects hidden size {self.hidden_size}, got input of shape {tuple(hidden.shape)}")
        if hidden.dim() == 3:
            batch, seq = hidden.shape[:2]
        elif hidden.dim() == 2:
            batch, seq = 1, hidden.shape[0]
        else:
            raise ValueError(f"router input must be [B, S, H] or [T, H], got shape {tuple(hidden.shape)}")
        flat_mask = None
        if token_mask is not None:
            if token_mask.numel() != batch * seq:
                raise ValueError(f"token_mask of shape {tuple(token_mask.shape)} does not match {batch}x{seq} tokens")
            flat_mask = token_mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)

        logits, probs, indices, scores = self.route(hidden.reshape(-1, self.hidden_size))
        counting = self.local_tokens_per_expert is not None and self.training and torch.is_grad_enabled()
        with torch.no_grad():
            tokens_per_expert = lb.expert_counts(indices, self.num_experts, flat_mask)
            if counting:
                self.local_tokens_per_expert += tokens_per_expert

        losses = self._aux_losses(logits, scores, indices, flat_mask, batch, seq)
        if losses:
            total = torch.stack(list(losses.values())).sum()
            probs = lb.attach_aux_loss(probs, total, self.aux_loss_scale)
        return RouterOutput(
            probs=probs,
            indices=indices,
            logits=logits,
            scores=scores,
            tokens_per_expert=tokens_per_expert,
            aux_losses=lb.aux_loss_values(losses),
        )

    def _aux_losses(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        indices: torch.Tensor,
        flat_mask: Optional[torch.Tensor],
        batch: int,
        seq: int,
    ) -> Dict[str, torch.Tensor]:
        """The configured auxiliary losses (coefficient included), each a 0-dim fp32 tensor with grad."""
        moe = self.config
        losses: Dict[str, torch.Tensor] = {}
        if moe.load_balancing_type == "seq_aux_loss":
            losses["seq_aux_loss"] = lb.sequence_aux_loss(
                scores.view(batch, seq, -1),
                indices.view(batch, seq, -1),
                moe.topk,
                moe.aux_loss_coeff,
                None if flat_mask is None else flat_mask.view(batch, seq),
                self.sequence_group,
            )
        elif moe.load_balancing_type == "aux_loss":
            losses["aux_loss"] = lb.expert_aux_loss(
                scores, indices, moe.topk, moe.aux_loss_coeff, flat_mask, self.sequence_group
            )
        if moe.z_loss_coeff is not None and moe.z_loss_coeff > 0:
            losses["z_loss"] = lb.z_loss(logits, moe.z_loss_coeff, flat_mask, self.sequence_group)
        return losses
