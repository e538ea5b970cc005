"""Expert-parallel token dispatch by all-gather (Megatron's --moe-token-dispatcher-type allgather).

Every EP rank gathers the tokens, routing weights and routing decisions of all W ranks of its EP
group, runs its local experts on the assignments that chose them, and reduce-scatters the
probability-weighted partial outputs: rank r receives, for its own tokens, the sum over ranks of
their local experts' contributions. Simpler than all-to-all and never synchronises with the host
(all shapes are static), at the price of moving W * T tokens per rank.

1. `dispatch_preprocess` (local): capacity drop and padding decided on this rank's T tokens, with
   the same capacity C = ceil(T_local * k / E * capacity_factor) per expert and per source rank as
   the all-to-all dispatcher; returns the tokens unchanged ([T, H]; assignment (t, j) lives in row t).
2. `dispatch`: all-gather tokens [W*T, H] and weights [W*T, k] (backward: reduce-scatter, each
   rank's gradient being a partial sum over its experts) and the routing decisions (no grad);
   permute the local experts' assignments:
   - no padding: a static buffer of W*T*min(k, E_local) rows grouped by local expert, then a tail
     of unused rows (excluded from `plan.local_tokens_per_expert`);
   - pad_to_capacity: [E_local, W * C, H], slot c of source rank s of expert e at row
     e * W * C + s * C + c.
3. `combine`: weighted unpermute over the gathered tokens ([W*T, H], zero where no local expert
   was chosen), then reduce-scatter to this rank's [T, H].
4. `combine_postprocess`: nothing left to do.
All ranks of the EP group must pass the same T.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.core.tensor_parallel.mappings import (
    all_gather_along_dim,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.ep_comm import Completed, PendingAllToAll
from megatron.core.transformer.moe.token_dispatcher import DispatchPlan, ExpertParallelDispatcher, weighted_unpermute


class AllGatherTokenDispatcher(ExpertParallelDispatcher):
    """Gather all tokens of the EP group, compute the local experts, reduce-scatter (see module doc)."""

    def dispatch_preprocess(
        self,
        hidden: torch.Tensor,
        probs: torch.Tensor,
        indices: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, DispatchPlan]:
        """hidden [T, H], probs [T, k], indices [T, k], token_mask [T] -> (hidden, plan).

        `plan.extras["route"]` (int64, gathered by `dispatch`) encodes the routing: without padding
        [T*k] the expert of each assignment (E if dropped); with padding [E*C + T*k] the slot
        table (token of slot c of expert e, -1 if empty) followed by each assignment's row
        e * C + c (-1 if dropped).
        """
        num_tokens, topk = indices.shape
        capacity, real = self._check_inputs(hidden, probs, indices, token_mask)
        if self.pad_to_capacity:
            assert capacity is not None
            keep, slot_token, slot_valid, slot_row = self._padded_slots(probs, indices, real, capacity)
            route = torch.cat(
                [torch.where(slot_valid, slot_token, -1).reshape(-1), torch.where(keep, slot_row, -1).reshape(-1)]
            )
            tokens_per_expert = slot_valid.sum(dim=1)
        else:
            keep = self._keep(probs, indices, real, capacity)
            route = (indices if keep is None else torch.where(keep, indices, self.num_experts)).reshape(-1)
            counted = torch.ones_like(route) if keep is None else keep.reshape(-1).to(torch.int64)
            tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=indices.device)
            tokens_per_expert.scatter_add_(0, indices.reshape(-1), counted)
        token_row = torch.arange(num_tokens, device=indices.device).unsqueeze(1).expand(num_tokens, topk)
        plan = DispatchPlan(
            num_tokens=num_tokens,
            topk=topk,
            assignment_row=token_row,
            assignment_weight=probs,
            keep=keep,
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=self._dropped_fraction(keep, real, topk, indices.device),
            capacity=capacity,
            padded=self.pad_to_capacity,
            all_rows_valid=False,
            extras={"route": route},
        )
        return hidden, plan

    def dispatch_async(self, tokens: torch.Tensor, plan: DispatchPlan) -> PendingAllToAll:
        return Completed(self._gather_and_permute(tokens, plan))

    def _gather_and_permute(self, tokens: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        group = self.ep_group
        all_tokens = gather_from_sequence_parallel_region(tokens, group, 0, True)  # [W*T, H]
        all_weights = gather_from_sequence_parallel_region(plan.assignment_weight, group, 0, True)  # [W*T, k]
        route = all_gather_along_dim(plan.extras["route"].unsqueeze(0), 0, group)  # [W, L]
        if plan.padded:
            rows, row, keep = self._permute_padded(all_tokens, route, plan)
        else:
            rows, row, keep = self._permute_dynamic(all_tokens, route, plan)
        plan.extras.update(gathered_row=row, gathered_keep=keep, gathered_weight=all_weights)
        return rows

    def _permute_dynamic(
        self, all_tokens: torch.Tensor, route: torch.Tensor, plan: DispatchPlan
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the local experts' assignments, stably sorted by local expert; static size."""
        topk, local, start = plan.topk, self.num_local_experts, self.local_expert_start
        expert = route.reshape(-1, topk)  # [W*T, k], E for dropped
        is_local = (expert >= start) & (expert < start + local)
        key = torch.where(is_local, expert - start, local).reshape(-1)
        order = torch.argsort(key, stable=True)
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # A token picks each expert at most once, so at most min(k, E_local) of its choices are local.
        kept = order[: all_tokens.shape[0] * min(topk, local)]
        rows = all_tokens.index_select(0, torch.div(kept, topk, rounding_mode="floor"))
        rows = torch.where((key.index_select(0, kept) < local).unsqueeze(-1), rows, 0.0)
        counts = torch.zeros(local, dtype=torch.int64, device=route.device)
        counts.scatter_add_(0, torch.where(is_local, expert - start, 0).reshape(-1), is_local.reshape(-1).to(torch.int64))
        plan.local_tokens_per_expert, plan.local_rows_valid = counts, False
        return rows, torch.where(is_local, position.view_as(expert), 0), is_local

    def _permute_padded(
        self, all_tokens: torch.Tensor, route: torch.Tensor, plan: DispatchPlan
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[E_local * W * C, H] slots of the local experts; no data-dependent shape."""
        world, local, start = self.ep_size, self.num_local_experts, self.local_expert_start
        capacity, num_tokens, topk = plan.capacity, plan.num_tokens, plan.topk
        assert capacity is not None
        table = self.num_experts * capacity
        slots = route[:, :table].reshape(world, self.num_experts, capacity)[:, start : start + local]
        source = torch.arange(world, device=route.device).view(world, 1, 1)
        token = torch.where(slots >= 0, slots + source * num_tokens, 0).transpose(0, 1).reshape(-1)
        valid = (slots >= 0).transpose(0, 1).reshape(-1, 1)
        rows = torch.where(valid, all_tokens.index_select(0, token), 0.0)
        slot_row = route[:, table:].reshape(world * num_tokens, topk)  # e * C + c, -1 if dropped
        expert = torch.div(slot_row, capacity, rounding_mode="floor")
        is_local = (slot_row >= 0) & (expert >= start) & (expert < start + local)
        source_of_token = torch.div(
            torch.arange(world * num_tokens, device=route.device), num_tokens, rounding_mode="floor"
        ).unsqueeze(1)
        row = (expert - start) * (world * capacity) + source_of_token * capacity + (slot_row - expert * capacity)
        return rows, torch.where(is_local, row, 0), is_local

    def combine(self, expert_output: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Local experts' rows -> this rank's tokens [T, H], summed over the EP group."""
        extras = plan.extras
        partial = weighted_unpermute(
            expert_output, extras["gathered_row"], extras["gathered_weight"], extras["gathered_keep"]
        )  # [W*T, H]
        return reduce_scatter_to_sequence_parallel_region(partial, self.ep_group, 0)

    def combine_postprocess(self, expert_output: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """`combine` already weighted and summed the k choices: [T, H] unchanged."""
        return expert_output
