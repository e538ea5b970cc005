"""Rank grid arithmetic, layout validation, and real gloo groups built from it."""

import pytest
import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelConfig, ParallelState, RankGrid, validate_layout_for_model
from tests.dist_utils import spawn


def grid(world, tp=1, pp=1, ep=1, etp=None):
    return RankGrid.from_config(ParallelConfig(tp, pp, ep, etp), world)


def test_megatron_rank_order_tp_fastest_then_dp_then_pp():
    g = grid(8, tp=2, pp=2, etp=2)
    assert g.dp == 2
    assert g.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g.groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert g.groups("embedding") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g.coords(7) == {"tp": 1, "dp": 1, "pp": 1, "etp": 1, "ep": 0, "edp": 1}


def test_expert_grid_folds_into_data_and_tensor_ranks():
    # PP2 x EP2 x DP2 on 8 ranks (TP1): experts split over the 2 DP ranks... of 4 per stage
    g = grid(8, pp=2, ep=2)
    assert g.dp == 4 and g.edp == 2
    assert g.groups("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.groups("edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # TP2 x EP2 with expert-TP 1: experts use the tensor ranks as expert ranks
    g = grid(4, tp=2, ep=2, etp=1)
    assert g.groups("ep") == [[0, 1], [2, 3]]
    assert g.groups("etp") == [[0], [1], [2], [3]]
    # expert-TP = TP: expert ranks step over the TP ranks
    g = grid(4, tp=2, ep=2, etp=2)
    assert g.groups("etp") == [[0, 1], [2, 3]]
    assert g.groups("ep") == [[0, 2], [1, 3]]
    assert g.edp == 1


@pytest.mark.parametrize("world,tp,pp,ep", [(8, 2, 2, 2), (16, 2, 2, 4), (12, 1, 3, 2), (8, 1, 1, 8)])
def test_every_rank_in_exactly_one_group_of_each_kind(world, tp, pp, ep):
    g = grid(world, tp=tp, pp=pp, ep=ep)
    for kind in ("tp", "dp", "pp", "ep", "etp", "edp", "mp"):
        flat = sorted(r for ranks in g.groups(kind) for r in ranks)
        assert flat == list(range(world)), kind
    assert len(g.groups("ep")[0]) == ep


def test_impossible_layouts_fail_with_flag_names():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size / --pipeline-model-parallel-size"):
        grid(6, tp=4)
    with pytest.raises(ValueError, match="--expert-model-parallel-size"):
        grid(4, tp=1, ep=3)
    with pytest.raises(ValueError, match="expert-tensor-parallel-size must be 1 or"):
        grid(8, tp=4, etp=2)
    assert grid(4, tp=2).etp == 1  # default: whole experts per expert rank
    # --sequence-parallel with one TP rank has nothing to split: accepted, no effect (the flag
    # parser turns it off with a note, as Megatron does).
    assert RankGrid.from_config(ParallelConfig(sequence_parallel=True), 2).tp == 1
    with pytest.raises(ValueError, match=">= 1"):
        grid(2, tp=0)
    g = grid(8, tp=2, ep=2)
    with pytest.raises(ValueError, match="--num-experts"):
        validate_layout_for_model(g, num_layers=4, num_experts=7, num_attention_heads=8)
    with pytest.raises(ValueError, match="--num-attention-heads"):
        validate_layout_for_model(g, num_layers=4, num_experts=8, num_attention_heads=3)
    with pytest.raises(ValueError, match="--num-layers"):
        validate_layout_for_model(grid(4, pp=4), num_layers=2, num_experts=8, num_attention_heads=8)


def test_single_process_state_without_distributed():
    state = ParallelState.build(ParallelConfig())
    assert state.size("tp") == 1 and state.rank_in("dp") == 0
    assert state.is_first_stage and state.is_last_stage


def _worker(rank, world):
    state = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1))
    out = {}
    for kind in ("tp", "dp", "ep", "edp"):
        # Sum of (rank + 1) over the group proves the group holds exactly the expected ranks.
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=state.group(kind))
        out[kind] = (state.ranks[kind], t.item())
    return out


@pytest.mark.slow
def test_real_gloo_groups_match_the_grid():
    world = 4
    results = spawn(world, _worker)
    g = grid(world, tp=2, ep=2, etp=1)
    for rank in range(world):
        for kind, (ranks, total) in results[rank].items():
            assert ranks == g.group_of(kind, rank)
            assert total == sum(r + 1 for r in ranks)
