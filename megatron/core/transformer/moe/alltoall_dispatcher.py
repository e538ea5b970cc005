"""Expert-parallel token dispatch by all-to-all (Megatron's --moe-token-dispatcher-type alltoall).

With EP size W, EP rank r holds the E_local = E / W experts [r * E_local, (r + 1) * E_local).
The tokens entering the layer are this rank's own [T, H] (sequence parallelism makes them distinct
on every rank of the stage); every EP rank must have the same T.

1. `dispatch_preprocess` (inherited, local): rows sorted by global expert, which is also by
   destination rank; capacity drop and padding applied to this rank's T tokens.
2. `dispatch`: exchange the rows so each rank receives the rows of its local experts.
   - dropless / capacity without padding: all_to_all the per-expert counts, read the per-rank
     split sizes to the host (the ONE host synchronisation per layer, as in Megatron's dropless
     mode), all_to_all the kept rows, then regroup them from (source rank, expert) to
     (expert, source rank) order for the grouped GEMM;
   - pad_to_capacity: every rank sends exactly E_local * C rows to every rank, so the split sizes
     are static, no count exchange and NO host synchronisation; the received [W, E_local, C, H]
     is transposed to [E_local, W * C, H] for the batched expert GEMM.
3. `combine`: the inverse regrouping and all_to_all (differentiable: backward of each exchange is
   the reverse exchange).
4. `combine_postprocess` (inherited): unpermute, probability-weighted sum over the k choices.

Capacity (token drop) across EP: C = ceil(T_local * k / E * capacity_factor) per expert and per
SOURCE rank, applied to this rank's T_local tokens before anything is sent (Megatron's alltoall
drop). An expert therefore receives at most W * C rows, and the result equals one device running
the layer separately on each rank's tokens (the same "token groups").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.ep_comm import (
    Deferred,
    PendingAllToAll,
    all_to_all,
    all_to_all_async,
    all_to_all_raw,
)
from megatron.core.transformer.moe.token_dispatcher import DispatchPlan, ExpertParallelDispatcher


class AllToAllTokenDispatcher(ExpertParallelDispatcher):
    """Send each kept (token, choice) row only to the rank owning its expert (see module doc)."""

    def dispatch_async(self, tokens: torch.Tensor, plan: DispatchPlan) -> PendingAllToAll:
        """rows [N, H] from `dispatch_preprocess` -> pending rows of the local experts.

        Padded: [E_local * W * C, H], expert-major (view as [E_local, W * C, H]).
        Otherwise: [sum of received counts, H] grouped by local expert (counts in
        `plan.local_tokens_per_expert`), source-rank order inside an expert.
        """
        world, local, hidden = self.ep_size, self.num_local_experts, tokens.shape[-1]
        if plan.padded:
            capacity = plan.capacity
            assert capacity is not None

            def to_expert_major(rows: torch.Tensor) -> torch.Tensor:
                # (source rank, expert, slot) -> (expert, source rank, slot)
                return rows.view(world, local, capacity, hidden).transpose(0, 1).reshape(-1, hidden)

            return Deferred(all_to_all_async(tokens, self.ep_group), to_expert_major)

        sent_counts = plan.tokens_per_expert  # [E]: kept rows of this rank per (global) expert
        recv_counts = all_to_all_raw(sent_counts, self.ep_group).view(world, local)  # [source rank, local expert]
        # The one host synchronisation: split sizes must be host ints for all_to_all_single.
        sizes = torch.cat([sent_counts.view(world, local).sum(dim=1), recv_counts.sum(dim=1)]).tolist()
        input_splits, output_splits = sizes[:world], sizes[world:]
        num_sent, num_received = sum(input_splits), sum(output_splits)
        plan.extras.update(input_splits=input_splits, output_splits=output_splits, num_sent=num_sent)
        plan.local_tokens_per_expert = recv_counts.sum(dim=0)
        plan.local_rows_valid = True
        # Rows [num_sent:] are dropped assignments (sorted last by the preprocess): not sent.
        pending = all_to_all_async(tokens[:num_sent], self.ep_group, output_splits, input_splits)
        if local == 1:
            plan.extras["order"] = None
            return pending
        # Received rows come as [source rank][local expert] chunks; a stable sort by expert makes
        # them [local expert][source rank]. The permutation is computed while the rows travel.
        chunk_expert = torch.arange(local, device=tokens.device).repeat(world)
        row_expert = torch.repeat_interleave(chunk_expert, recv_counts.reshape(-1), output_size=num_received)
        order = torch.argsort(row_expert, stable=True)
        plan.extras["order"] = order
        return Deferred(pending, lambda rows: rows.index_select(0, order))

    def combine(self, expert_output: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Local experts' outputs -> this rank's rows in the preprocess layout ([N, H])."""
        world, local, hidden = self.ep_size, self.num_local_experts, expert_output.shape[-1]
        if plan.padded:
            capacity = plan.capacity
            assert capacity is not None
            rows = expert_output.view(local, world, capacity, hidden).transpose(0, 1).reshape(-1, hidden)
            return all_to_all(rows, self.ep_group)
        order = plan.extras["order"]
        if order is not None:
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            expert_output = expert_output.index_select(0, inverse)
        back = all_to_all(expert_output, self.ep_group, plan.extras["input_splits"], plan.extras["output_splits"])
        dropped = plan.num_tokens * plan.topk - plan.extras["num_sent"]
        # Dropped assignments' rows: zeros (masked by `keep` in combine_postprocess anyway).
        return F.pad(back, (0, 0, 0, dropped)) if dropped else back
