"""`sharded_state` / `load_sharded_state`: the optimizer describes its own state as element ranges
of each parameter with live views, and loads from a fill callback (what checkpoints use)."""

import copy

import pytest
import torch

from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from tests.unit.core.optimizer.test_optimizer_single_process import Net, loss_fn, state


def trained(dtype, dist_opt=False, steps=2):
    model = Net(dtype=dtype)
    chunk = DistributedDataParallel(model, DDPConfig(use_distributed_optimizer=dist_opt, bucket_size_mb=None), state()) if dist_opt else model
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, bf16=dtype == torch.bfloat16, use_distributed_optimizer=dist_opt)
    opt = build_optimizer([chunk], cfg, state())
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, step, dtype).backward()
        if dist_opt:
            chunk.finish_grad_sync()
        assert opt.step()[0]
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_are_live_views_covering_every_parameter(dtype):
    model, opt = trained(dtype)
    sharded = opt.sharded_state()
    assert sharded["header"]["step"] == 2 and len(sharded["header"]["param_groups"]) == 2
    names = {n for n, _ in model.named_parameters()}
    assert {p.name for p in sharded["pieces"]} == names
    for piece in sharded["pieces"]:
        assert (piece.lo, piece.hi) == (0, piece.param.numel())
        assert set(piece.tensors) == ({"exp_avg", "exp_avg_sq", "master"} if dtype == torch.bfloat16 else {"exp_avg", "exp_avg_sq"})
        assert all(t.dtype == torch.float32 and t.shape == (piece.hi - piece.lo,) for t in piece.tensors.values())
    # Live: the state dict (a copy) sees a write through a piece's view.
    piece = sharded["pieces"][0]
    piece.tensors["exp_avg"].fill_(7.0)
    assert (opt.state_dict()["params"][0][piece.name]["exp_avg"] == 7.0).all()


def test_distributed_optimizer_pieces_tile_their_buffer_shards():
    model, opt = trained(torch.float32, dist_opt=True)
    pieces = opt.sharded_state()["pieces"]
    covered = {}
    for piece in pieces:
        covered.setdefault(piece.name, []).append((piece.lo, piece.hi))
    for name, p in model.named_parameters():
        assert sorted(covered[name])[0][0] == 0 and sorted(covered[name])[-1][1] == p.numel()  # one DP rank: all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_through_fill_is_bitwise_and_master_falls_back_to_the_parameter(dtype):
    src_model, src = trained(dtype, steps=3)
    saved = {(p.name, k): t.clone() for p in src.sharded_state()["pieces"] for k, t in p.tensors.items()}
    header = copy.deepcopy(src.sharded_state()["header"])
    model, opt = trained(dtype, steps=1)
    model.load_state_dict(src_model.state_dict())
    calls = []

    def fill(piece, key, out):
        calls.append(key)
        out.copy_(saved[(piece.name, key)][piece.lo : piece.hi])
        return True

    opt.load_sharded_state(header, fill)
    a, b = opt.state_dict(), src.state_dict()
    assert a["step"] == b["step"] == 3 and a["param_groups"] == b["param_groups"]
    for name, entry in b["params"][0].items():
        for key, value in entry.items():
            assert torch.equal(a["params"][0][name][key], value), (name, key)
    assert ("master" in calls) == (dtype == torch.bfloat16)

    if dtype == torch.bfloat16:  # no saved master: taken from the (loaded) parameter
        def fill_without_master(piece, key, out):
            if key == "master":
                return False
            out.copy_(saved[(piece.name, key)])
            return True

        opt.load_sharded_state(header, fill_without_master)
        for name, p in model.named_parameters():
            assert torch.equal(opt.state_dict()["params"][0][name]["master"], p.detach().float())


def test_load_errors():
    _, opt = trained(torch.float32)
    header = opt.sharded_state()["header"]
    with pytest.raises(ValueError, match="lacks exp_avg"):
        opt.load_sharded_state(header, lambda piece, key, out: False)
    with pytest.raises(ValueError, match="format"):
        opt.load_sharded_state(dict(header, format="other"), lambda piece, key, out: True)
    with pytest.raises(ValueError, match="groups"):
        opt.load_sharded_state(dict(header, param_groups=[]), lambda piece, key, out: True)


def test_refresh_master_weights():
    model, opt = trained(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    opt.refresh_master_weights()
    for entry in opt.state_dict()["params"][0].values():
        assert (entry["master"] == 0.5).all()
