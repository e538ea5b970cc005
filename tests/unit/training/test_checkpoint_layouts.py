"""Every layout loads every other, at the storage level, in one process.

Virtual ranks of a layout (TP, EP, DP, PP) hold synthetic tensors of every kind of split: a
vocabulary-parallel embedding / output head with TP-dependent padding rows (`logical_rows`), a
column-parallel fused SwiGLU gate_up, a row-parallel weight, stacked experts, replicated norms and
a buffer, the embedding duplicated on the first and last stage; their optimizer state is cut
into distributed-optimizer shards at arbitrary element boundaries. The save path of each rank
(`checkpoint_shards.holdings` / `plan` / `write_share`, the index of `checkpointing._finish`) runs
for every virtual rank, then every virtual rank of another layout reads its own tensors back.
Tiny read buffers and odd checksum blocks force split reads and partly covered blocks.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

from megatron.core.models.deepseek.sharding import ShardInfo, shard_of
from megatron.core.optimizer import ShardPiece
from megatron.training import checkpoint_shards as shards
from megatron.training import checkpointing as ckpt
from megatron.training.checkpoint_format import FORMAT, CheckpointReader, read_index

H, F, E, LOGICAL = 6, 8, 8, 13  # hidden, ffn, experts, vocabulary rows that are data

# name: (full logical shape, attributes, pipeline stages holding it)
TENSORS = {
    "embedding.weight": ((LOGICAL, H), dict(tensor_model_parallel=True, partition_dim=0, vocab=True), (0, -1)),
    "layers.0.mlp.gate_up_proj.weight": ((2 * F, H), dict(tensor_model_parallel=True, partition_dim=0), (0,)),
    "layers.0.self_attn.o_proj.weight": ((H, F), dict(tensor_model_parallel=True, partition_dim=1), (0,)),
    "layers.0.input_layernorm.weight": ((H,), {}, (0,)),
    "layers.1.mlp.experts.gate_up_proj": ((E, 2 * F, H), dict(is_expert=True), (-1,)),
    "layers.1.mlp.experts.down_proj": ((E, H, F), dict(is_expert=True), (-1,)),
    "output_layer.weight": ((LOGICAL, H), dict(tensor_model_parallel=True, partition_dim=0, vocab=True), (-1,)),
}
BUFFERS = {"layers.1.mlp.router.expert_bias": ((E,), (-1,))}
SENTINEL = -7.0


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    dp: int = 1
    pp: int = 1

    def ranks(self) -> List[Tuple[int, int, int, int]]:
        return list(itertools.product(range(self.pp), range(self.tp), range(self.ep), range(self.dp)))


LAYOUTS = [Layout(), Layout(tp=2), Layout(tp=4, pp=2), Layout(ep=2, dp=2), Layout(tp=2, ep=4, dp=3, pp=2), Layout(dp=4)]


def padded(tp: int) -> int:
    multiple = 4 * tp  # padding rows depend on TP, as Megatron's make-vocab-size-divisible-by x TP
    return -(-LOGICAL // multiple) * multiple


def full_values(seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(shape, generator=g) for name, (shape, _, _) in TENSORS.items()}
    out.update({name: torch.randn(shape, generator=g) for name, (shape, _) in BUFFERS.items()})
    return out


def _set(root: nn.Module, dotted: str, value, buffer: bool = False) -> None:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if buffer:
        module.register_buffer(leaf, value)
    else:
        module.register_parameter(leaf, value)


def _holds(stages, pp_rank: int, pp: int) -> bool:
    return any((s % pp) == pp_rank for s in stages)


def local_tensor(name, full, attrs, layout, tp_rank, ep_rank, fill_padding):
    """This rank's tensor: shard_of the padded full tensor (padding rows = `fill_padding`)."""
    if attrs.get("vocab"):
        rows = torch.full((padded(layout.tp),) + tuple(full.shape[1:]), fill_padding)
        rows[:LOGICAL] = full
        full = rows
    probe = nn.Parameter(torch.empty(0))
    for k, v in attrs.items():
        if k != "vocab":
            setattr(probe, k, v)
    local = nn.Parameter(shard_of(name, probe, full, ShardInfo(tp_rank, layout.tp, ep_rank, layout.ep)).clone())
    for k, v in attrs.items():
        if k != "vocab":
            setattr(local, k, v)
    if attrs.get("vocab"):
        local.logical_rows = LOGICAL
    return local


class FakeOptimizer:
    """`sharded_state()` of a distributed optimizer: each parameter's flat range cut at seeded
    random points into one piece per data-parallel replica of it."""

    def __init__(self, pieces: List[ShardPiece]) -> None:
        self.pieces = pieces

    def sharded_state(self):
        return {"header": {"format": "test", "step": 3, "param_groups": []}, "pieces": self.pieces}


def _cuts(numel: int, parts: int, seed: int) -> List[int]:
    rng = random.Random(seed)
    inner = sorted(rng.randint(0, numel) for _ in range(parts - 1))
    return [0] + inner + [numel]


def build_rank(layout: Layout, coords, weights, state, fill_padding: float):
    pp_rank, tp_rank, ep_rank, dp_rank = coords
    module, pieces = nn.Module(), []
    for name, (shape, attrs, stages) in TENSORS.items():
        if not _holds(stages, pp_rank, layout.pp):
            continue
        param = local_tensor(name, weights[name], attrs, layout, tp_rank, ep_rank, fill_padding)
        _set(module, name, param)
        # Data-parallel replicas of this tensor: experts over (tp, dp), dense over (ep, dp).
        replica, replicas = ((tp_rank * layout.dp + dp_rank, layout.tp * layout.dp) if attrs.get("is_expert")
                             else (ep_rank * layout.dp + dp_rank, layout.ep * layout.dp))
        cuts = _cuts(param.numel(), replicas, seed=hash((name, layout)) % 1000)
        lo, hi = cuts[replica], cuts[replica + 1]
        tensors = {}
        for sub in ("exp_avg", "exp_avg_sq"):
            local = local_tensor(name, state[sub][name], attrs, layout, tp_rank, ep_rank, fill_padding)
            tensors[sub] = local.detach().reshape(-1)[lo:hi].clone()
        pieces.append(ShardPiece(name=name, param=param, lo=lo, hi=hi, tensors=tensors))
    for name, (shape, stages) in BUFFERS.items():
        if _holds(stages, pp_rank, layout.pp):
            _set(module, name, weights[name].clone(), buffer=True)
    return module, FakeOptimizer(pieces), ShardInfo(tp_rank, layout.tp, ep_rank, layout.ep)


def save_virtual(tmp_path, layout: Layout, weights, state, block_bytes=100, buffer_bytes=64) -> str:
    directory = tmp_path / f"saved_tp{layout.tp}_ep{layout.ep}_dp{layout.dp}_pp{layout.pp}"
    directory.mkdir()
    ranks = [build_rank(layout, c, weights, state, float("nan")) for c in layout.ranks()]
    held = [shards.holdings([m], o, info) for m, o, info in ranks]
    tensors, plan = shards.plan([h[1] for h in held], [h[2] for h in held])
    results = []
    for r, (items, _, _) in enumerate(held):
        result = shards.write_share(str(directory), r, items, plan.get(r, []), block_bytes, buffer_bytes)
        results.append(dict(result, rng={}))
    common = json.dumps({"format": FORMAT, "iteration": 3, "optimizer": {"format": "test"}, "world_size": len(ranks)})
    ckpt._finish(str(directory), 3, tensors, results, common, block_bytes)
    return str(directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    weights = full_values(0)
    state = {"exp_avg": full_values(1), "exp_avg_sq": full_values(2)}
    root = tmp_path_factory.mktemp("layouts")
    return weights, state, {layout: save_virtual(root, layout, weights, state) for layout in LAYOUTS}


@pytest.mark.parametrize("source", LAYOUTS, ids=str)
def test_every_layout_loads_every_other(saved, source):
    weights, state, dirs = saved
    index = read_index(dirs[source])
    # Stored once: the boxes of every tensor tile its logical shape (padding rows not stored).
    assert index.tensors["model/embedding.weight"].shape == (LOGICAL, H)
    for target in LAYOUTS:
        with CheckpointReader(index, buffer_bytes=64) as reader:
            for coords in target.ranks():
                module, opt, info = build_rank(target, coords, {k: torch.zeros_like(v) for k, v in weights.items()},
                                               {k: {n: torch.zeros_like(v) for n, v in d.items()} for k, d in state.items()},
                                               SENTINEL)
                expected, _, _ = build_rank(target, coords, weights, state, SENTINEL)
                shards.load_model_tensors(reader, [module], info)
                got = dict(module.named_parameters()) | dict(module.named_buffers())
                want = dict(expected.named_parameters()) | dict(expected.named_buffers())
                for name in want:
                    assert torch.equal(got[name].detach(), want[name].detach()), (source, target, coords, name)
                fill = shards.optimizer_fill(reader, info)
                _, want_opt, _ = build_rank(target, coords, weights, state, SENTINEL)
                for piece, want_piece in zip(opt.sharded_state()["pieces"], want_opt.sharded_state()["pieces"]):
                    for sub in ("exp_avg", "exp_avg_sq"):
                        out = torch.full_like(piece.tensors[sub], SENTINEL)
                        assert fill(piece, sub, out)
                        assert torch.equal(out, want_piece.tensors[sub]), (source, target, coords, piece.name, sub)
                    assert not fill(piece, "master", torch.empty_like(piece.tensors["exp_avg"])) or piece.param.dtype == torch.float32


def test_padding_rows_are_never_written_or_read(saved):
    """Sources' padding rows are NaN; targets' padding rows keep their sentinel."""
    weights, state, dirs = saved
    index = read_index(dirs[Layout(tp=4, pp=2)])
    with CheckpointReader(index) as reader:
        layout = Layout(tp=2)
        module, _, info = build_rank(layout, (0, 1, 0, 0), {k: torch.zeros_like(v) for k, v in weights.items()},
                                     {k: {n: torch.zeros_like(v) for n, v in d.items()} for k, d in state.items()}, SENTINEL)
        shards.load_model_tensors(reader, [module], info)
        local = module.embedding.weight.detach()  # rows 8..15 of the 16 padded rows: 8..12 data, 13..15 padding
        assert torch.equal(local[:LOGICAL - 8], weights["embedding.weight"][8:])
        assert (local[LOGICAL - 8:] == SENTINEL).all() and not local.isnan().any()


def test_replicated_tensors_are_written_once_and_spread(saved):
    _, _, dirs = saved
    index = read_index(dirs[Layout(ep=2, dp=2)])
    norm = index.tensors["model/layers.0.input_layernorm.weight"]
    assert len(norm.boxes) == 1  # 4 replicas, one writer
    writers = {box.file for entry in index.tensors.values() for box in entry.boxes if entry.shape and len(entry.boxes) == 1}
    assert len(writers) > 1  # whole replicated tensors went to different ranks
