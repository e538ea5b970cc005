"""ZeRO-1 distributed optimizer: fp32 master weights and Adam state sharded over data-parallel ranks.

Works with `DistributedDataParallel` built with ``use_distributed_optimizer=True``: every bucket
of a gradient buffer is split into equal per-rank shards (dense buffers over "dp", expert buffers
over "edp"). Per step:

1. the buckets' gradients are reduce-scattered (DDP's finish_grad_sync) so this rank's shard of
   each bucket holds the averaged gradient;
2. the global norm adds the shards' sums of squares over dp / edp too (`clip_grads`);
3. AdamW updates this rank's fp32 master shard (pieces of the parameters overlapping its shards);
4. the updated shard is written (rounded for bf16) into the flat parameter buffer and each bucket
   is all-gathered, so every rank holds the full updated parameters again.

Elementwise, this is exactly the non-distributed optimizer's arithmetic on a subset of elements.

State dict ("dp_shard" layout, one per rank): the "full" layout's header plus
    "dp_rank", "dp_size", "edp_rank", "edp_size", "ep_rank", "ep_size": ints
    "params": [ {name: entry} per model chunk ], only for parameters overlapping this rank's shards
    entry: {"shape": [param shape], "start": int, "end": int (element range of the flattened
            parameter held here), "is_expert": bool,
            "exp_avg", "exp_avg_sq" (, "master" for bf16 parameters): fp32 [end - start]}
The pieces of one parameter over the DP group (EDP group for experts) tile [0, numel). A rank can
load its own shard back directly; to change the DP size, `merge_optimizer_shards` the shards of a
DP group into the "full" layout, which any optimizer (sharded or not) loads by slicing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core.distributed.ddp import DistributedDataParallel
from megatron.core.optimizer.config import OptimizerConfig
from megatron.core.optimizer.optimizer import MegatronOptimizer, ModelChunk
from megatron.core.parallel_state import ParallelState


class DistributedOptimizer(MegatronOptimizer):
    """AdamW over this rank's DP shard of every gradient buffer (see module docstring)."""

    sharded = True

    def __init__(self, model_chunks: Sequence[ModelChunk], config: OptimizerConfig, parallel_state: ParallelState) -> None:
        for chunk in model_chunks:
            if not isinstance(chunk, DistributedDataParallel) or not chunk.ddp_config.use_distributed_optimizer:
                raise ValueError(
                    "the distributed optimizer needs every model chunk wrapped in DistributedDataParallel "
                    "with DDPConfig(use_distributed_optimizer=True)"
                )
        super().__init__(model_chunks, config, parallel_state)

    def _pieces(self) -> List[Tuple[nn.Parameter, int, int]]:
        pieces = []
        for chunk in self.model_chunks:
            for buffer in chunk.grad_buffers:
                pieces.extend((p, lo, hi) for p, _, _, lo, hi in buffer.local_shards())
        return pieces

    def _after_update(self) -> None:
        for chunk in self.model_chunks:
            chunk.all_gather_params()

    def _header(self) -> Dict[str, Any]:
        sd = super()._header()
        ps = self.parallel_state
        for kind in ("dp", "edp", "ep"):
            sd[f"{kind}_rank"], sd[f"{kind}_size"] = ps.rank_in(kind), ps.size(kind)
        return sd


def merge_optimizer_shards(shards: Sequence[Dict[str, Any]], ep_rank: Optional[int] = None) -> Dict[str, Any]:
    """Join "dp_shard" state dicts of one DP group (same tp / pp position) into the "full" layout.

    Dense entries are joined over all shards. Expert entries differ per EP rank (different experts
    under the same local name): they are joined over the shards whose "ep_rank" is `ep_rank`
    (required when the shards span several EP ranks and hold expert entries). With ETP < TP an
    EDP group is not inside one DP group: merge expert entries from the shards of their EDP group.
    """
    if not shards:
        raise ValueError("no shards to merge")
    first = shards[0]
    if any(s.get("layout") != "dp_shard" for s in shards):
        raise ValueError("merge_optimizer_shards takes 'dp_shard' state dicts")
    ep_ranks = {s["ep_rank"] for s in shards}
    if ep_rank is None and len(ep_ranks) == 1:
        ep_rank = next(iter(ep_ranks))
    merged: Dict[str, Any] = {k: first[k] for k in ("format", "step", "param_groups")}
    merged["layout"] = "full"
    merged["params"] = []
    for chunk in range(len(first["params"])):
        pieces: Dict[str, List[Dict[str, Any]]] = {}
        for shard in shards:
            for name, entry in shard["params"][chunk].items():
                if entry["is_expert"] and shard["ep_rank"] != ep_rank:
                    if ep_rank is None:
                        raise ValueError("shards span several EP ranks: pass ep_rank to pick one's experts")
                    continue
                pieces.setdefault(name, []).append(entry)
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, entries in pieces.items():
            entries.sort(key=lambda e: e["start"])
            shape = entries[0]["shape"]
            numel = 1
            for d in shape:
                numel *= d
            position = 0
            for e in entries:
                if e["start"] != position:
                    raise ValueError(f"{name}: shards do not tile the parameter (gap or overlap at {position})")
                position = e["end"]
            if position != numel:
                raise ValueError(f"{name}: shards cover {position} of {numel} elements; pass every DP rank's shard")
            out[name] = {
                key: torch.cat([e[key] for e in entries]).view(shape)
                for key in ("exp_avg", "exp_avg_sq", "master")
                if key in entries[0]
            }
        merged["params"].append(out)
    return merged
