"""Token dispatch for MoE on one device, in the four steps an expert-parallel dispatcher reuses.

1. `dispatch_preprocess`: local permutation (and capacity drop): tokens [T, H] -> rows grouped
   by expert, plus a `DispatchPlan` remembering where every (token, choice) went.
2. `dispatch` (or `dispatch_async(...).wait()`): communication hook, identity here. The
   expert-parallel dispatchers (`alltoall_dispatcher.py`, `allgather_dispatcher.py`) override it,
   sending rows to the ranks owning their experts; they keep what they need to invert the exchange
   in `plan.extras` and describe the rows handed to the local experts in
   `plan.local_tokens_per_expert` / `plan.local_rows_valid` (read them with `plan.expert_input()`).
3. `combine`: the inverse communication hook, identity here.
4. `combine_postprocess`: unpermute and take the probability-weighted sum over the k choices.

Everything is computed on the device with static shapes; no Python loop over tokens and no host
synchronisation (no .item(), .tolist(), nonzero or boolean indexing), whatever the mode:
- dropless (capacity_factor None): the buffer holds all T*k assignments, stably sorted by expert;
- capacity drop: capacity = ceil(T * k / E * capacity_factor) per expert and per micro-batch on
  this rank (Megatron's formula; T counts every token of the micro-batch, padding included, so
  the capacity never depends on data). Policy "probs" keeps the `capacity` assignments with the
  highest routing weight, "position" the earliest tokens. Dropped assignments stay in the buffer
  as a tail of T*k rows (sorted after every kept row, excluded from `tokens_per_expert`; the
  experts zero them) and contribute exactly zero to the output and to every gradient;
- pad_to_capacity: every expert gets exactly `capacity` slots, buffer [E * capacity, H]; unused
  slots are zero rows, masked out at combine; shapes depend only on T, for HPU graphs.
Padding tokens (token_mask False) are dropped before the capacity is filled and never counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.config import MoEConfig
from megatron.core.tensor_parallel.mappings import Group, group_rank, group_size
from megatron.core.transformer.moe.ep_comm import Completed, PendingAllToAll

_DROP_POLICIES = ("probs", "position")


@dataclass
class DispatchPlan:
    """Where each (token, choice) went, produced by `dispatch_preprocess` and read by the later steps."""

    num_tokens: int  # T
    topk: int  # k
    assignment_row: torch.Tensor  # [T, k] int64 row of the expert buffer holding each assignment
    assignment_weight: torch.Tensor  # [T, k] fp32 routing weight (with grad)
    keep: Optional[torch.Tensor]  # [T, k] bool, None when every assignment is kept
    tokens_per_expert: torch.Tensor  # [E] int64 kept rows per expert
    dropped_fraction: torch.Tensor  # 0-dim fp32: dropped / routed assignments of real tokens
    capacity: Optional[int]  # per-expert capacity, None when dropless
    padded: bool  # buffer is [E * capacity, H], `capacity` slots per expert
    all_rows_valid: bool  # statically known: no tail of dropped rows in the buffer
    extras: Dict[str, Any] = field(default_factory=dict)  # state of communication hooks (EP dispatchers)
    # Set by an EP `dispatch`: the rows it returns, per LOCAL expert ([E_local] int64), and whether
    # statically every row is valid. None: the rows are the preprocess buffer (one device).
    local_tokens_per_expert: Optional[torch.Tensor] = None
    local_rows_valid: Optional[bool] = None

    def expert_input(self) -> Tuple[torch.Tensor, bool]:
        """(rows per local expert [E_local], all_rows_valid) of the buffer `dispatch` returned."""
        if self.local_tokens_per_expert is None:
            return self.tokens_per_expert, self.all_rows_valid
        return self.local_tokens_per_expert, bool(self.local_rows_valid)


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """ceil(T * k / E * capacity_factor) slots per expert, or None (dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(num_tokens * topk / num_experts * capacity_factor))


class TokenDispatcher:
    """Single-device dispatcher (the identity-communication base of the EP dispatchers).

    Usage: tokens, plan = d.dispatch_preprocess(x, probs, indices, token_mask); tokens = d.dispatch(tokens, plan);
    out = experts(...); out = d.combine(out, plan); y = d.combine_postprocess(out, plan).
    """

    def __init__(
        self,
        num_experts: int,
        topk: int,
        capacity_factor: Optional[float] = None,
        pad_to_capacity: bool = False,
        drop_policy: str = "probs",
    ) -> None:
        if num_experts <= 0 or not 0 < topk <= num_experts:
            raise ValueError(f"need 0 < topk <= num_experts, got topk={topk}, num_experts={num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity factor must be positive, got {capacity_factor}")
        if pad_to_capacity and capacity_factor is None:
            raise ValueError("pad_to_capacity needs a capacity factor")
        if drop_policy not in _DROP_POLICIES:
            raise ValueError(f"drop policy must be one of {_DROP_POLICIES}, got {drop_policy!r}")
        self.num_experts = num_experts
        self.topk = topk
        self.capacity_factor = capacity_factor
        self.pad_to_capacity = pad_to_capacity
        self.drop_policy = drop_policy

    @classmethod
    def from_config(cls, moe: MoEConfig) -> "TokenDispatcher":
        return cls(moe.num_experts, moe.topk, moe.capacity_factor, moe.pad_to_capacity, moe.drop_policy)

    def capacity(self, num_tokens: int) -> Optional[int]:
        return expert_capacity(num_tokens, self.topk, self.num_experts, self.capacity_factor)

    # ---- step 1 -----------------------------------------------------------------------------
    def dispatch_preprocess(
        self,
        hidden: torch.Tensor,
        probs: torch.Tensor,
        indices: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, DispatchPlan]:
        """hidden [T, H], probs [T, k], indices [T, k], token_mask [T] -> (rows [N, H], plan).

        N = T * k, or E * capacity with pad_to_capacity (rows of expert e at [e*C, (e+1)*C)).
        """
        num_tokens, topk = indices.shape
        capacity, real = self._check_inputs(hidden, probs, indices, token_mask)
        if self.pad_to_capacity:
            assert capacity is not None
            return self._preprocess_padded(hidden, probs, indices, real, capacity)

        keep = self._keep(probs, indices, real, capacity)
        flat_expert = indices.reshape(-1)
        # Stable sort by expert: rows of one expert stay in token order; dropped ones go last (key E).
        key = flat_expert if keep is None else torch.where(keep.reshape(-1), flat_expert, self.num_experts)
        order = torch.argsort(key, stable=True)  # [N]
        rows = hidden.index_select(0, torch.div(order, topk, rounding_mode="floor"))
        if keep is not None:
            rows = torch.where(keep.reshape(-1).index_select(0, order).unsqueeze(-1), rows, 0.0)
        assignment_row = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counted = torch.ones_like(flat_expert) if keep is None else keep.reshape(-1).to(torch.int64)
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=indices.device)
        tokens_per_expert.scatter_add_(0, flat_expert, counted)
        plan = DispatchPlan(
            num_tokens=num_tokens,
            topk=topk,
            assignment_row=assignment_row.view(num_tokens, topk),
            assignment_weight=probs,
            keep=keep,
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=self._dropped_fraction(keep, real, topk, indices.device),
            capacity=capacity,
            padded=False,
            all_rows_valid=keep is None,
        )
        return rows, plan

    def _check_inputs(
        self, hidden: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor, token_mask: Optional[torch.Tensor]
    ) -> Tuple[Optional[int], Optional[torch.Tensor]]:
        """Validate shapes; returns (capacity or None, real-token mask [T] bool or None)."""
        num_tokens, topk = indices.shape
        if topk != self.topk or probs.shape != indices.shape or hidden.shape[0] != num_tokens:
            raise ValueError(
                f"dispatcher (k={self.topk}) got hidden {tuple(hidden.shape)}, probs {tuple(probs.shape)}, "
                f"indices {tuple(indices.shape)}"
            )
        real = None if token_mask is None else token_mask.reshape(num_tokens).to(torch.bool)
        return self.capacity(num_tokens), real

    def _keep(
        self, probs: torch.Tensor, indices: torch.Tensor, real: Optional[torch.Tensor], capacity: Optional[int]
    ) -> Optional[torch.Tensor]:
        """[T, k] bool: assignments kept after padding and capacity drop; None when all are kept."""
        if capacity is not None:
            return self._select_within_capacity(probs, indices, real, capacity)[0]
        if real is not None:
            return real.unsqueeze(-1).expand(indices.shape)
        return None

    def _select_within_capacity(
        self, probs: torch.Tensor, indices: torch.Tensor, real: Optional[torch.Tensor], capacity: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per expert, the best `min(capacity, T)` assignments by the drop policy.

        Returns keep [T, k] bool, slot_token [C', E] int64 and slot_valid [C', E] bool (C' = min(capacity, T)):
        column e lists the tokens given expert e's slots, best first; invalid slots are unused.
        """
        num_tokens = indices.shape[0]
        routed = torch.zeros(num_tokens, self.num_experts, dtype=torch.bool, device=indices.device)
        routed.scatter_(1, indices, True)
        if real is not None:
            routed &= real.unsqueeze(-1)
        if self.drop_policy == "probs":
            priority = torch.zeros(num_tokens, self.num_experts, dtype=torch.float32, device=indices.device)
            priority.scatter_(1, indices, probs.detach().float())  # routing weights are >= 0
        else:  # "position": earlier tokens first
            exact = torch.float32 if num_tokens <= 2**24 else torch.int64  # fp32 counts exactly to 2^24
            first = torch.arange(num_tokens, 0, -1, device=indices.device, dtype=exact)
            priority = first.unsqueeze(-1).expand(num_tokens, self.num_experts).clone()
        priority = priority.masked_fill(~routed, -1)
        best = torch.topk(priority, k=min(capacity, num_tokens), dim=0)  # over tokens, per expert
        slot_valid = best.values >= 0
        keep_map = torch.zeros_like(routed).scatter_(0, best.indices, slot_valid)  # [T, E]
        return keep_map.gather(1, indices), best.indices, slot_valid

    def _preprocess_padded(
        self,
        hidden: torch.Tensor,
        probs: torch.Tensor,
        indices: torch.Tensor,
        real: Optional[torch.Tensor],
        capacity: int,
    ) -> Tuple[torch.Tensor, DispatchPlan]:
        num_tokens, topk = indices.shape
        keep, slot_token, slot_valid, assignment_row = self._padded_slots(probs, indices, real, capacity)
        rows = hidden.index_select(0, slot_token.reshape(-1))
        rows = torch.where(slot_valid.reshape(-1, 1), rows, 0.0)  # [E * C, H]
        plan = DispatchPlan(
            num_tokens=num_tokens,
            topk=topk,
            assignment_row=assignment_row,
            assignment_weight=probs,
            keep=keep,
            tokens_per_expert=slot_valid.sum(dim=1),
            dropped_fraction=self._dropped_fraction(keep, real, topk, indices.device),
            capacity=capacity,
            padded=True,
            all_rows_valid=False,
        )
        return rows, plan

    def _padded_slots(
        self, probs: torch.Tensor, indices: torch.Tensor, real: Optional[torch.Tensor], capacity: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed-capacity layout: keep [T, k], slot_token [E, C] (token in slot c of expert e),
        slot_valid [E, C] and assignment_row [T, k] = e * C + c of each kept assignment (0 if dropped)."""
        num_tokens = indices.shape[0]
        keep, slot_token, slot_valid = self._select_within_capacity(probs, indices, real, capacity)
        # Row of each kept assignment: slot c of expert e is row e * capacity + c; scatter the slot
        # rows back to [T, E] (tokens are distinct within a column), then read the k choices.
        slot_rows = torch.arange(slot_token.shape[0], device=indices.device).unsqueeze(1) + capacity * torch.arange(
            self.num_experts, device=indices.device
        )
        row_map = torch.zeros(num_tokens, self.num_experts, dtype=torch.int64, device=indices.device)
        row_map.scatter_(0, slot_token, torch.where(slot_valid, slot_rows, 0))
        short = capacity - slot_token.shape[0]  # capacity > T: the extra slots can only be empty
        if short > 0:
            slot_token = F.pad(slot_token, (0, 0, 0, short))
            slot_valid = F.pad(slot_valid, (0, 0, 0, short), value=False)
        return keep, slot_token.t(), slot_valid.t(), row_map.gather(1, indices)

    @staticmethod
    def _dropped_fraction(
        keep: Optional[torch.Tensor], real: Optional[torch.Tensor], topk: int, device: torch.device
    ) -> torch.Tensor:
        """(routed - kept) / routed over the assignments of real tokens; 0 when nothing was routed."""
        if keep is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        kept = keep.sum().float()
        if real is None:
            routed = torch.full((), float(keep.numel()), dtype=torch.float32, device=device)
        else:
            routed = real.sum().float() * topk
        return (routed - kept) / routed.clamp(min=1.0)

    # ---- steps 2 and 3: communication hooks ------------------------------------------------
    def dispatch(self, tokens: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Send rows to the ranks that own their experts (identity on one device)."""
        return tokens

    def dispatch_async(self, tokens: torch.Tensor, plan: DispatchPlan) -> PendingAllToAll:
        """Start `dispatch`; `.wait()` returns its rows. Work done before the wait (the shared
        experts) overlaps the exchange where the dispatcher supports it; here it is `dispatch`."""
        return Completed(self.dispatch(tokens, plan))

    def combine(self, expert_output: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Bring expert outputs back to the ranks that own their tokens (identity on one device)."""
        return expert_output

    # ---- step 4 -------------------------------------------------------------------------------
    def combine_postprocess(self, expert_output: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """expert_output [N, H] -> [T, H]: sum_j w_tj * out[row_tj] in fp32, cast to the output dtype.

        A gather followed by a fixed-order sum over k (deterministic, unlike an atomic index_add);
        its backward is the scatter-add into the expert rows. Dropped assignments are masked
        before the multiply, so neither the output nor any gradient sees their rows.
        """
        return weighted_unpermute(expert_output, plan.assignment_row, plan.assignment_weight, plan.keep)


class ExpertParallelDispatcher(TokenDispatcher):
    """Common state of the EP dispatchers: the EP group and this rank's slice of the experts."""

    def __init__(
        self,
        num_experts: int,
        topk: int,
        ep_group: Group,
        capacity_factor: Optional[float] = None,
        pad_to_capacity: bool = False,
        drop_policy: str = "probs",
    ) -> None:
        super().__init__(num_experts, topk, capacity_factor, pad_to_capacity, drop_policy)
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.ep_rank = group_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({self.ep_size})"
            )
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_start = self.ep_rank * self.num_local_experts

    @classmethod
    def from_config(cls, moe: MoEConfig, ep_group: Group = None) -> "ExpertParallelDispatcher":  # type: ignore[override]
        return cls(moe.num_experts, moe.topk, ep_group, moe.capacity_factor, moe.pad_to_capacity, moe.drop_policy)

    def dispatch(self, tokens: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return self.dispatch_async(tokens, plan).wait()


def weighted_unpermute(
    expert_output: torch.Tensor, row: torch.Tensor, weight: torch.Tensor, keep: Optional[torch.Tensor]
) -> torch.Tensor:
    """out[t] = sum_j keep_tj * weight_tj * expert_output[row_tj]: [N, H], [T, k] x3 -> [T, H].

    Summed in fp32 in a fixed order over k, cast to expert_output's dtype. Rows of dropped
    assignments (keep False) are masked before the multiply: no output, no gradient.
    """
    num_tokens, topk = row.shape
    gathered = expert_output.index_select(0, row.reshape(-1))
    gathered = gathered.view(num_tokens, topk, expert_output.shape[-1]).float()
    if keep is not None:
        gathered = torch.where(keep.unsqueeze(-1), gathered, 0.0)
    weighted = gathered * weight.float().unsqueeze(-1)
    return weighted.sum(dim=1).to(expert_output.dtype)
