"""Process groups built once from a rank grid and passed explicitly to the modules that need them.

Rank order (Megatron's): tensor-parallel rank fastest, then data-parallel, then pipeline:

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

Inside one pipeline stage the TP x DP ranks are re-read for MoE layers as an expert grid,
expert-tensor rank fastest, then expert-parallel, then expert-data-parallel:

    stage_local_rank = etp_rank + ETP * (ep_rank + EP * edp_rank),   TP * DP = ETP * EP * EDP

`RankGrid` is pure arithmetic (testable without processes); `ParallelState.build` creates the
torch.distributed groups from it, calling `new_group` for every group in the same order on every
rank as torch.distributed requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

GROUP_KINDS = ("tp", "dp", "pp", "ep", "etp", "edp", "mp", "embedding")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout sizes (Megatron flags in brackets)."""

    tensor_model_parallel_size: int = 1  # --tensor-model-parallel-size
    pipeline_model_parallel_size: int = 1  # --pipeline-model-parallel-size
    expert_model_parallel_size: int = 1  # --expert-model-parallel-size
    # --expert-tensor-parallel-size. None means 1: experts are whole on each expert rank and the
    # TP ranks (which hold distinct tokens under the sequence parallelism MoE requires) act as
    # expert-parallel / expert-data-parallel ranks.
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False  # --sequence-parallel (no effect with one TP rank)

    @property
    def etp(self) -> int:
        return 1 if self.expert_tensor_parallel_size is None else self.expert_tensor_parallel_size


@dataclass(frozen=True)
class RankGrid:
    """The rank arithmetic of one layout over `world_size` ranks."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> "RankGrid":
        grid = cls(
            world_size=world_size,
            tp=config.tensor_model_parallel_size,
            pp=config.pipeline_model_parallel_size,
            ep=config.expert_model_parallel_size,
            etp=config.etp,
        )
        grid.validate(config)
        return grid

    def validate(self, config: Optional[ParallelConfig] = None) -> None:
        for flag, value in (
            ("--tensor-model-parallel-size", self.tp),
            ("--pipeline-model-parallel-size", self.pp),
            ("--expert-model-parallel-size", self.ep),
            ("--expert-tensor-parallel-size", self.etp),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor ({self.tp}) x pipeline ({self.pp}) "
                "parallel sizes; change --tensor-model-parallel-size / --pipeline-model-parallel-size"
            )
        if self.etp not in (1, self.tp):
            raise ValueError(f"--expert-tensor-parallel-size must be 1 or the tensor-parallel size ({self.tp}), got {self.etp}")
        stage = self.tp * self.dp
        if stage % (self.etp * self.ep):
            raise ValueError(
                f"expert parallel size {self.ep} x expert tensor size {self.etp} must divide the "
                f"{stage} ranks of a pipeline stage (TP {self.tp} x DP {self.dp}); change --expert-model-parallel-size"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        return (self.tp * self.dp) // (self.etp * self.ep)

    def coords(self, rank: int) -> Dict[str, int]:
        """This rank's position on every axis."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        local = rank % (self.tp * self.dp)
        return {
            "tp": tp_rank,
            "dp": dp_rank,
            "pp": pp_rank,
            "etp": local % self.etp,
            "ep": (local // self.etp) % self.ep,
            "edp": local // (self.etp * self.ep),
        }

    def groups(self, kind: str) -> List[List[int]]:
        """All groups of one kind, each a sorted rank list, in a deterministic order."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}")
        if kind == "embedding":
            # First and last stage ranks with the same (tp, dp): they share the embedding
            # (the output layer / MTP on the last stage reuse the first stage's embedding).
            if self.pp == 1:
                return [[r] for r in range(self.world_size)]
            stage = self.tp * self.dp
            return [[r, r + (self.pp - 1) * stage] for r in range(stage)]
        buckets: Dict[tuple, List[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = {
                "tp": (c["dp"], c["pp"]),
                "dp": (c["tp"], c["pp"]),
                "pp": (c["tp"], c["dp"]),
                "mp": (c["dp"],),  # tensor x pipeline: every rank holding a distinct model piece
                "ep": (c["etp"], c["edp"], c["pp"]),
                "etp": (c["ep"], c["edp"], c["pp"]),
                "edp": (c["etp"], c["ep"], c["pp"]),
            }[kind]
            buckets.setdefault(key, []).append(rank)
        return sorted(buckets.values())

    def group_of(self, kind: str, rank: int) -> List[int]:
        for ranks in self.groups(kind):
            if rank in ranks:
                return ranks
        raise AssertionError(f"rank {rank} is in no {kind} group")


def validate_layout_for_model(grid: RankGrid, num_layers: int, num_experts: int, num_attention_heads: int) -> None:
    """Checks that need both the layout and the model, run before any group is created."""
    if num_experts % grid.ep:
        raise ValueError(
            f"--num-experts ({num_experts}) must be divisible by --expert-model-parallel-size ({grid.ep})"
        )
    if num_attention_heads % grid.tp:
        raise ValueError(
            f"--num-attention-heads ({num_attention_heads}) must be divisible by --tensor-model-parallel-size ({grid.tp})"
        )
    if num_layers < grid.pp:
        raise ValueError(f"--num-layers ({num_layers}) must be >= --pipeline-model-parallel-size ({grid.pp})")


@dataclass
class ParallelState:
    """This rank's process groups and coordinates. Built once; passed to modules explicitly."""

    grid: RankGrid
    rank: int
    groups: Dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    ranks: Dict[str, List[int]] = field(default_factory=dict)
    sequence_parallel: bool = False

    @classmethod
    def build(cls, config: ParallelConfig, world_size: Optional[int] = None, rank: Optional[int] = None) -> "ParallelState":
        """Create every group (collective over all ranks). Without torch.distributed, a 1-rank state."""
        initialized = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        grid = RankGrid.from_config(config, world_size)
        state = cls(grid=grid, rank=rank, sequence_parallel=config.sequence_parallel)
        for kind in GROUP_KINDS:
            for ranks in grid.groups(kind):
                # new_group must be called by all ranks for all groups, in the same order.
                group = dist.new_group(ranks) if initialized else None
                if rank in ranks:
                    state.groups[kind] = group
                    state.ranks[kind] = ranks
        return state

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def rank_in(self, kind: str) -> int:
        return self.ranks[kind].index(self.rank)

    def group(self, kind: str) -> Optional[dist.ProcessGroup]:
        return self.groups[kind]

    @property
    def is_first_stage(self) -> bool:
        return self.grid.coords(self.rank)["pp"] == 0

    @property
    def is_last_stage(self) -> bool:
        return self.grid.coords(self.rank)["pp"] == self.grid.pp - 1
