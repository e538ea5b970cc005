"""Box geometry of distributed checkpoints: flat ranges -> boxes, clipping, tiling, one writer per
element, and `sharding.placement_of` agreeing with `shard_of` for every kind of split."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from megatron.core.models.deepseek.sharding import ShardInfo, placement_of, shard_of
from megatron.training.checkpoint_boxes import (
    Offer, assign_writers, clip_rows, disjoint_cover, flat_range_boxes, intersect, numel, shift,
)


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 5), (2, 3, 1, 4), ()])
def test_flat_range_boxes_cover_the_range_in_order(shape):
    total = numel(shape)
    ref = torch.arange(total).reshape(shape)
    for lo, hi in itertools.combinations(range(total + 1), 2):
        boxes = flat_range_boxes(shape, lo, hi)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
        position = lo
        for start, off, size in boxes:
            assert start == position
            index = tuple(slice(o, o + s) for o, s in zip(off, size))
            assert torch.equal(ref[index].reshape(-1), torch.arange(start, start + numel(size)))
            position += numel(size)
        assert position == hi
    assert flat_range_boxes(shape, 0, 0) == []
    with pytest.raises(ValueError):
        flat_range_boxes(shape, 0, total + 1)


def test_example_from_the_docstring():
    assert flat_range_boxes((4, 5), 3, 17) == [(3, (0, 3), (1, 2)), (5, (1, 0), (2, 5)), (15, (3, 0), (1, 2))]


def test_clip_intersect_and_tiling():
    assert clip_rows((4, 0), (4, 3), 6) == (2, 3)
    assert clip_rows((6, 0), (1, 3), 6) is None
    assert clip_rows((0, 0), (4, 3), None) == (4, 3)
    assert intersect((0, 0), (4, 4), (2, 3), (5, 5)) == ((2, 3), (2, 1))
    assert intersect((0,), (2,), (2,), (2,)) is None
    assert shift((1, 2), (10, 20)) == (11, 22)
    assert disjoint_cover((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]) is None
    assert "cover" in disjoint_cover((4, 4), [((0, 0), (2, 4))])
    # Right volume, but row 1 twice and row 2 never.
    assert "overlap" in disjoint_cover((4, 4), [((0, 0), (2, 4)), ((1, 0), (1, 4)), ((3, 0), (1, 4))])


def test_assign_writers_one_writer_per_element_balanced():
    # Replicated whole tensors over 4 ranks: each written once, spread over the ranks.
    offers = [Offer(r, i, f"w{i}", (0,), (100,), 4, ((0, 100),)) for r in range(4) for i in range(8)]
    plan = assign_writers(offers)
    written = sorted((i, lo, hi) for r in plan for i, lo, hi in plan[r])
    assert written == [(i, 0, 100) for i in range(8)]
    assert sorted(len(v) for v in plan.values()) == [2, 2, 2, 2]
    # Overlapping DP shards of TP-replicated state: cut at every endpoint, no element twice.
    offers = [Offer(0, 0, "s", (0,), (10,), 4, ((0, 6),)), Offer(1, 0, "s", (0,), (10,), 4, ((4, 10),)),
              Offer(2, 0, "s", (0,), (10,), 4, ((0, 3), (3, 10)))]
    plan = assign_writers(offers)
    cover = sorted((lo, hi) for r in plan for _, lo, hi in plan[r])
    assert cover[0][0] == 0 and cover[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(cover, cover[1:]))
    with pytest.raises(ValueError, match=r"no rank holds elements \[6, 10\)"):
        assign_writers([Offer(0, 0, "s", (0,), (10,), 4, ((0, 6),))])


def _param(shape, **attrs):
    p = nn.Parameter(torch.randn(shape))
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


CASES = [
    ("layers.0.self_attn.q_proj.weight", (8, 6), dict(tensor_model_parallel=True, partition_dim=0)),
    ("layers.0.self_attn.o_proj.weight", (6, 8), dict(tensor_model_parallel=True, partition_dim=1)),
    ("layers.0.mlp.gate_up_proj.weight", (16, 6), dict(tensor_model_parallel=True, partition_dim=0)),
    ("layers.1.mlp.experts.gate_up_proj", (8, 10, 6), dict(is_expert=True)),
    ("layers.1.mlp.experts.down_proj", (8, 6, 5), dict(is_expert=True)),
    ("layers.0.input_layernorm.weight", (6,), {}),
]


@pytest.mark.parametrize("name,shape,attrs", CASES, ids=[c[0].split(".")[-2] + "." + c[0].split(".")[-1] for c in CASES])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_placement_of_matches_shard_of(name, shape, attrs, tp, ep):
    full = torch.arange(numel(shape), dtype=torch.float32).reshape(shape)
    fused = name.endswith("gate_up_proj.weight")
    stored = full.reshape(2, shape[0] // 2, shape[1]) if fused else full
    for tp_rank, ep_rank in itertools.product(range(tp), range(ep)):
        info = ShardInfo(tp_rank=tp_rank, tp_size=tp, ep_rank=ep_rank, ep_size=ep)
        probe = _param(shape, **attrs)
        local = shard_of(name, probe, full, info)
        param = _param(tuple(local.shape), **attrs)
        pl = placement_of(name, param, info)
        assert pl.global_shape == tuple(stored.shape)
        index = tuple(slice(o, o + s) for o, s in zip(pl.offsets, pl.view_shape))
        assert torch.equal(stored[index].reshape(-1), local.reshape(-1)), (tp_rank, ep_rank)


def test_placement_logical_rows_clips_the_global_shape():
    p = _param((72, 4), tensor_model_parallel=True, partition_dim=0, logical_rows=129)
    pl = placement_of("embedding.weight", p, ShardInfo(tp_rank=1, tp_size=2))
    assert pl.global_shape == (129, 4) and pl.offsets == (72, 0) and pl.logical_rows == 129
    with pytest.raises(ValueError, match="logical_rows"):
        placement_of("embedding.weight", _param((4, 4), logical_rows=5), ShardInfo())


def test_random_flat_ranges_of_3d_boxes():
    rng = random.Random(0)
    shape = (3, 7, 5)
    for _ in range(200):
        lo = rng.randrange(numel(shape))
        hi = rng.randrange(lo, numel(shape)) + 1
        boxes = flat_range_boxes(shape, lo, hi)
        assert sum(numel(s) for _, _, s in boxes) == hi - lo
        # With the complementary ranges the boxes tile the whole tensor.
        rest = flat_range_boxes(shape, 0, lo) + flat_range_boxes(shape, hi, numel(shape))
        assert disjoint_cover(shape, [(o, s) for _, o, s in boxes + rest]) is None
