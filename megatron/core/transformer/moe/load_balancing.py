"""Load balancing for the MoE router: auxiliary losses and the aux-loss-free expert bias.

Auxiliary losses must change gradients but not the layer's output. `attach_aux_loss` ties a
scalar loss to an activation through an autograd function: forward returns the activation
unchanged, backward passes the activation's gradient through and feeds `scale` as the gradient
of the loss, so autograd adds `scale * d(aux)/d(params)` to every parameter the loss depends on
(router weight, and through the hidden states everything before the layer). The caller sets
`scale` (e.g. 1 / num_micro_batches, matching how the language-model loss is averaged) with
`set_aux_loss_scale`.

Scores used by the losses are the router's own scores (sigmoid for V3, softmax for V2),
normalised per token to sum to one (DeepSeek-V3 paper eq. 19), never a softmax recomputed
on the side. Padding tokens (token_mask False) are left out of every statistic.

Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): every optimizer step,
`expert_bias += rate * sign(mean_load - load)`, where load counts the routing choices of the
real tokens of all micro-batches of that step (see `TopKRouter` for the accumulation).

Which ranks' tokens count: the load must be the whole step's, i.e. summed over every rank that
routed DISTINCT tokens through the same (replicated) router: the TP x DP ranks of the pipeline
stage (under sequence parallelism each TP rank routes its own sequence chunk; expert parallelism
does not change who routes what, since the router runs before dispatch).
`DeepSeekModel.update_expert_bias` sums the loads over those groups (`ParallelContext.router_load_groups`). The
sequence-wise aux loss is per sequence and stays local; the V2 expert-level aux loss and the
z-loss are per micro-batch of this rank.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from megatron.core.tensor_parallel.mappings import Group, all_reduce, group_size, reduce_from_region

# Relative floor of the per-token score sum, so an all-zero row cannot divide by zero.
_NORM_EPS = 1e-20


class _AuxLossAttach(torch.autograd.Function):
    """Identity on `activation`; in backward, d(total)/d(aux_loss) = scale."""

    @staticmethod
    def forward(ctx: Any, activation: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, aux_grad, None


def attach_aux_loss(activation: torch.Tensor, aux_loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return `activation` unchanged, so that backward also differentiates `scale * aux_loss`.

    `activation` must reach the final loss (the router's probs do, through the combine), or the
    aux loss's gradient is silently lost. Without autograd (eval, no_grad) this is a no-op.
    """
    if not (torch.is_grad_enabled() and (activation.requires_grad or aux_loss.requires_grad)):
        return activation
    return _AuxLossAttach.apply(activation, aux_loss, float(scale))


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """s'_i = s_i / sum_j s_j over the last (expert) dim; a no-op up to rounding for softmax."""
    return scores / (scores.sum(dim=-1, keepdim=True) + _NORM_EPS)


def expert_counts(indices: torch.Tensor, num_experts: int, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many real tokens chose each expert: indices [..., T, k] -> counts [..., E] (int64).

    A scatter-add, not `bincount` (which reads the maximum back to the host on CUDA).
    """
    *lead, tokens, k = indices.shape
    flat = indices.reshape(*lead, tokens * k)
    if token_mask is None:
        ones = torch.ones_like(flat)
    else:
        ones = token_mask.to(torch.int64).unsqueeze(-1).expand(*lead, tokens, k).reshape(*lead, tokens * k)
    counts = torch.zeros(*lead, num_experts, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(-1, flat, ones)


def sequence_aux_loss(
    scores: torch.Tensor,
    indices: torch.Tensor,
    topk: int,
    coeff: float,
    token_mask: Optional[torch.Tensor] = None,
    sequence_group: Group = None,
) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (paper eq. 17-20), averaged over sequences.

    scores [B, S, E] (unnormalised router scores, with grad), indices [B, S, k], token_mask [B, S].
    Per sequence with T real tokens: f_i = E / (k T) * #tokens choosing i, P_i = mean_t s'_{i,t},
    loss = coeff * sum_i f_i P_i. Sequences without real tokens are left out of the mean.

    sequence_group: under sequence parallelism each rank of this (TP) group holds a slice of every
    sequence; the per-sequence counts and score sums are then summed over it, so every rank gets
    the loss of the whole sequences and backward reaches each rank's own tokens.
    """
    batch, seq, num_experts = scores.shape
    mask = torch.ones(batch, seq, dtype=torch.bool, device=scores.device) if token_mask is None else token_mask
    maskf = mask.to(scores.dtype)
    real = maskf.sum(dim=1)  # [B]
    counts = expert_counts(indices, num_experts, mask).to(scores.dtype)  # [B, E]
    score_sums = (normalized_scores(scores) * maskf.unsqueeze(-1)).sum(dim=1)  # [B, E]
    if group_size(sequence_group) > 1:
        real, counts = all_reduce(real, sequence_group), all_reduce(counts, sequence_group)
        score_sums = reduce_from_region(score_sums, sequence_group)  # backward: identity
    denom = real.clamp(min=1.0)
    f = counts * (num_experts / topk) / denom.unsqueeze(-1)
    p = score_sums / denom.unsqueeze(-1)  # [B, E]
    per_seq = (f * p).sum(dim=-1)  # [B]
    has_tokens = (real > 0).to(scores.dtype)
    return coeff * (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def expert_aux_loss(
    scores: torch.Tensor,
    indices: torch.Tensor,
    topk: int,
    coeff: float,
    token_mask: Optional[torch.Tensor] = None,
    sequence_group: Group = None,
) -> torch.Tensor:
    """DeepSeek-V2 expert-level balance loss over all tokens of the micro-batch.

    scores [T, E], indices [T, k], token_mask [T]. With T real tokens:
    f_i = E / (k T) * #tokens choosing i, P_i = mean_t s'_{i,t}, loss = coeff * sum_i f_i P_i.
    """
    loss = sequence_aux_loss(
        scores.unsqueeze(0),
        indices.unsqueeze(0),
        topk,
        coeff,
        None if token_mask is None else token_mask.unsqueeze(0),
        sequence_group,
    )
    return loss


def z_loss(
    logits: torch.Tensor, coeff: float, token_mask: Optional[torch.Tensor] = None, sequence_group: Group = None
) -> torch.Tensor:
    """Router z-loss: coeff * mean over real tokens of logsumexp(logits)^2. logits [T, E] fp32.

    Under sequence parallelism (`sequence_group`) the mean runs over the tokens of all its ranks.
    """
    lse_sq = torch.logsumexp(logits.float(), dim=-1).square()
    maskf = torch.ones_like(lse_sq) if token_mask is None else token_mask.to(lse_sq.dtype)
    total, count = (lse_sq * maskf).sum(), maskf.sum()
    if group_size(sequence_group) > 1:
        total, count = reduce_from_region(total, sequence_group), all_reduce(count, sequence_group)
    return coeff * total / count.clamp(min=1.0)


@torch.no_grad()
def apply_bias_update(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> None:
    """In place: expert_bias += rate * sign(mean_load - load). Under-loaded experts become more attractive."""
    load = tokens_per_expert.to(torch.float32)
    expert_bias.add_(torch.sign(load.mean() - load).to(expert_bias.dtype), alpha=rate)


def aux_loss_values(losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies for logging (no host sync: the values stay on the device)."""
    return {name: value.detach() for name, value in losses.items()}
