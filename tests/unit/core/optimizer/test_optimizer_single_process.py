"""The optimizer in one process: torch.optim.AdamW parity, bf16 master weights, clipping, skipping,
state-dict round trips, shard merging and configuration errors."""

import copy

import pytest
import torch
from torch import nn

from megatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import (
    DistributedOptimizer,
    MegatronOptimizer,
    OptimizerConfig,
    build_optimizer,
    merge_optimizer_shards,
)
from megatron.core.parallel_state import ParallelConfig, ParallelState

LRS = (1e-2, 3e-3, 5e-3, 1e-3)


class Net(nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(6, 10)
        self.norm = nn.Parameter(torch.ones(10))
        self.fc2 = nn.Linear(10, 4)
        self.expert = nn.Parameter(torch.empty(4, 6))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p is self.norm else 0.0))
        self.expert.is_expert = True
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.norm) + x @ self.expert.t()


def data(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 4, generator=gen).to(dtype)


def loss_fn(model, step, dtype=torch.float32):
    x, y = data(step, dtype)
    return (model(x) - y).square().mean()


def state():
    return ParallelState.build(ParallelConfig())


def torch_reference(steps, clip, wd=0.1, dtype=torch.float32):
    """torch.optim.AdamW + clip_grad_norm_ on fp32 master copies of a (possibly bf16) Net."""
    model = Net(dtype=dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    named = list(zip([n for n, _ in model.named_parameters()], masters))
    decay = [m for n, m in named if m.dim() > 1]
    no_decay = [m for n, m in named if m.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LRS[0], betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    losses, norms = [], []
    for step in range(steps):
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
        model.zero_grad()
        loss = loss_fn(model, step, dtype)
        loss.backward()
        for p, m in zip(model.parameters(), masters):
            m.grad = p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(masters, clip if clip > 0 else float("inf"))
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return model, masters, losses, norms


def run(model_chunks, opt, steps, dtype=torch.float32, start=0):
    losses, norms = [], []
    for step in range(start, start + steps):
        opt.zero_grad()
        loss = sum(loss_fn(c, step, dtype) for c in model_chunks)
        loss.backward()
        finalize_model_grads(model_chunks, state())
        opt.set_lr(LRS[step])
        ok, norm, _ = opt.step()
        assert ok
        losses.append(loss.item())
        norms.append(norm)
    return losses, norms


def config(**kw):
    base = dict(lr=LRS[0], weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.5)
    base.update(kw)
    return OptimizerConfig(**base)


def make(kind, dtype=torch.float32, **kw):
    """A fresh Net wrapped for `kind` ("plain", "ddp", "dist") and its optimizer."""
    model = Net(dtype=dtype)
    bf16 = dtype == torch.bfloat16
    if kind == "plain":
        chunk = model
    else:
        chunk = DistributedDataParallel(
            model, DDPConfig(bucket_size_mb=2e-4, use_distributed_optimizer=kind == "dist", grad_reduce_in_fp32=kw.pop("fp32_grads", False)),
            state(),
        )
    return [chunk], build_optimizer([chunk], config(bf16=bf16, use_distributed_optimizer=kind == "dist", **kw), state())


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fp32_matches_torch_adamw_step_by_step(clip):
    _, masters, ref_losses, ref_norms = torch_reference(4, clip)
    for kind in ("plain", "ddp", "dist"):
        chunks, opt = make(kind, clip_grad=clip)
        assert isinstance(opt, DistributedOptimizer) == (kind == "dist")
        losses, norms = run(chunks, opt, 4)
        assert losses == pytest.approx(ref_losses, rel=1e-7, abs=0)
        assert norms == pytest.approx(ref_norms, rel=1e-6)
        for p, m in zip(chunks[0].parameters(), masters):
            torch.testing.assert_close(p.detach(), m.detach(), rtol=0, atol=1e-7)


def test_bf16_master_weights_are_fp32_adamw_on_bf16_grads():
    model, masters, ref_losses, _ = torch_reference(4, 0.5, dtype=torch.bfloat16)
    _, _, fp32_losses, _ = torch_reference(4, 0.5)
    for kind, fp32_grads in (("plain", False), ("ddp", False), ("ddp", True), ("dist", True)):
        chunks, opt = make(kind, torch.bfloat16, fp32_grads=fp32_grads) if kind != "plain" else make(kind, torch.bfloat16)
        losses, _ = run(chunks, opt, 4, torch.bfloat16)
        assert losses == pytest.approx(ref_losses, rel=1e-6)
        assert losses == pytest.approx(fp32_losses, rel=3e-2), "bf16 training should track fp32"
        for s in opt.slots:
            m = masters[[id(p) for p in chunks[0].parameters()].index(id(s.param))]
            assert s.owns_master and s.master.dtype == torch.float32
            torch.testing.assert_close(s.master, m.detach().reshape(-1)[s.lo : s.hi], rtol=0, atol=1e-7)
            assert torch.equal(s.param.detach().reshape(-1)[s.lo : s.hi], s.master.bfloat16()), "param = bf16(master)"


def test_state_dict_round_trip_is_bitwise():
    for kind, dtype in (("plain", torch.float32), ("ddp", torch.bfloat16), ("dist", torch.float32), ("dist", torch.bfloat16)):
        chunks, opt = make(kind, dtype)
        run(chunks, opt, 4, dtype)
        expected = [p.detach().clone() for p in chunks[0].parameters()]

        chunks, opt = make(kind, dtype)
        run(chunks, opt, 2, dtype)
        model_sd = copy.deepcopy(chunks[0].state_dict())
        opt_sd = copy.deepcopy(opt.state_dict())
        _check_plain(opt_sd)
        assert opt_sd["layout"] == ("dp_shard" if kind == "dist" else "full") and opt_sd["step"] == 2
        assert ("master" in opt_sd["params"][0]["fc1.weight"]) == (dtype == torch.bfloat16)

        chunks, opt = make(kind, dtype)
        chunks[0].load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        run(chunks, opt, 2, dtype, start=2)
        for p, e in zip(chunks[0].parameters(), expected):
            assert torch.equal(p, e), f"{kind} {dtype}: resumed training differs"


def _check_plain(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            _check_plain(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v)
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), type(obj)


def test_full_state_loads_into_distributed_and_back():
    chunks, opt = make("plain")
    run(chunks, opt, 2)
    full = opt.state_dict()
    model_sd = chunks[0].state_dict()
    dist_chunks, dist_opt = make("dist")
    dist_chunks[0].load_state_dict(model_sd)
    dist_opt.load_state_dict(full)
    merged = merge_optimizer_shards([dist_opt.state_dict()])
    for name, entry in full["params"][0].items():
        for key, value in entry.items():
            assert torch.equal(merged["params"][0][name][key], value)
    run(chunks, opt, 1, start=2)
    run(dist_chunks, dist_opt, 1, start=2)
    for p, q in zip(chunks[0].parameters(), dist_chunks[0].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="merge"):
        opt.load_state_dict(dist_opt.state_dict())


def test_merge_optimizer_shards_joins_and_validates():
    def shard(rank, start, end, ep_rank=0, is_expert=False):
        values = torch.arange(12, dtype=torch.float32)
        entry = {"shape": [3, 4], "start": start, "end": end, "is_expert": is_expert,
                 "exp_avg": values[start:end], "exp_avg_sq": -values[start:end]}
        return {"format": "megatron-deepseek-optimizer/1", "layout": "dp_shard", "step": 3, "param_groups": [],
                "dp_rank": rank, "dp_size": 2, "edp_rank": 0, "edp_size": 1, "ep_rank": ep_rank, "ep_size": 2,
                "params": [{"w": entry}]}

    merged = merge_optimizer_shards([shard(1, 5, 12), shard(0, 0, 5)])
    assert merged["layout"] == "full" and merged["step"] == 3
    assert torch.equal(merged["params"][0]["w"]["exp_avg"], torch.arange(12.0).view(3, 4))
    with pytest.raises(ValueError, match="cover"):
        merge_optimizer_shards([shard(0, 0, 5)])
    with pytest.raises(ValueError, match="tile"):
        merge_optimizer_shards([shard(0, 0, 5), shard(1, 6, 12)])
    experts = [shard(0, 0, 12, ep_rank=0, is_expert=True), shard(1, 0, 12, ep_rank=1, is_expert=True)]
    with pytest.raises(ValueError, match="ep_rank"):
        merge_optimizer_shards(experts)
    assert torch.equal(merge_optimizer_shards(experts, ep_rank=1)["params"][0]["w"]["exp_avg_sq"], -torch.arange(12.0).view(3, 4))


def test_non_finite_gradient_skips_the_step():
    for kind in ("plain", "ddp", "dist"):
        chunks, opt = make(kind, log_num_zeros_in_grad=True)
        run(chunks, opt, 1)
        before = [p.detach().clone() for p in chunks[0].parameters()]
        state_before = copy.deepcopy(opt.state_dict())
        for bad in (float("nan"), float("inf")):
            opt.zero_grad()
            loss_fn(chunks[0], 1).backward()
            finalize_model_grads(chunks, state())
            grad = chunks[0].fc2.weight.main_grad if kind != "plain" else chunks[0].fc2.weight.grad
            grad[0, 0] = bad
            ok, norm, zeros = opt.step()
            assert not ok and zeros is None and not (norm == norm and abs(norm) < float("inf"))
            for p, b in zip(chunks[0].parameters(), before):
                assert torch.equal(p, b)
            after = opt.state_dict()
            assert after["step"] == state_before["step"] == 1
            for name, entry in after["params"][0].items():
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, state_before["params"][0][name][key])
        run(chunks, opt, 1, start=1)  # recovers


def test_num_zeros_lr_zero_and_weight_decay_groups():
    chunks, opt = make("ddp", log_num_zeros_in_grad=True, clip_grad=0.0)
    assert [s.name for s in opt.slots if s.group == 1] == sorted(
        [s.name for s in opt.slots if s.param.dim() <= 1 or s.name.endswith(".bias")], key=[s.name for s in opt.slots].index
    )
    assert opt.param_groups[1]["weight_decay"] == 0.0
    opt.set_weight_decay(0.2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    opt.zero_grad()
    loss_fn(chunks[0], 0).backward()
    finalize_model_grads(chunks, state())
    chunks[0].fc1.weight.main_grad[:2] = 0
    expected = sum(int((p.main_grad == 0).sum()) for p in chunks[0].parameters())
    before = [p.detach().clone() for p in chunks[0].parameters()]
    opt.set_lr(0.0)
    assert opt.get_lr() == 0.0
    ok, _, zeros = opt.step()
    assert ok and zeros == expected >= 12
    for p, b in zip(chunks[0].parameters(), before):
        assert torch.equal(p, b), "lr 0 must leave the weights unchanged"


def test_config_errors_and_run_config():
    for bad in (dict(lr=-1), dict(adam_beta1=1.0), dict(adam_beta2=-0.1), dict(adam_eps=0), dict(clip_grad=-1),
                dict(weight_decay=-0.1), dict(min_lr=-1)):
        with pytest.raises(ValueError):
            OptimizerConfig(**bad)
    with pytest.raises(ValueError, match="bf16"):
        MegatronOptimizer([Net(dtype=torch.bfloat16)], OptimizerConfig(), state())
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        build_optimizer([Net()], OptimizerConfig(use_distributed_optimizer=True), state())
    ddp = DistributedDataParallel(Net(), DDPConfig(), state())
    with pytest.raises(ValueError, match="agree"):
        build_optimizer([ddp], OptimizerConfig(use_distributed_optimizer=True), state())
    chunks, opt = make("plain")
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict({"format": "x", "params": [{}]})

