"""Global grad norm, clipping, the distributed optimizer and its state on real gloo groups (world 2).

Cases (one process group, one ParallelState per layout):
- the global norm over synthetic gradients for TP2, EP2, TP2 x EP2 with ETP1, TP2 with ETP2,
  PP2 with a shared embedding, and DP2 shards: each element counted exactly once;
- a TP2 + sequence-parallel model trained 3 steps with clipping == torch AdamW on the full model
  (SP grads summed over TP, replicated params counted once in the norm), plain and distributed;
- DP2 distributed optimizer: state_dict round trip (bitwise), merged shards loaded by the
  non-distributed optimizer, a NaN in one rank's shard skips the step on every rank, and bf16
  with fp32 master weights equal to the non-distributed bf16 optimizer.
"""

import copy
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, build_optimizer, global_grad_norm, merge_optimizer_shards
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, gather_from_sequence_parallel_region

LRS = (1e-2, 5e-3, 2e-3, 1e-3)
S, B, H, F, O = 4, 2, 6, 8, 3


def assert_close(a, b, name, tol=1e-6):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert b.norm() > 0, f"{name}: vacuous reference"
    err = ((a - b).norm() / b.norm()).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


# ---- global norm on synthetic gradients ------------------------------------------------------------
def _param(shape, **attrs):
    p = nn.Parameter(torch.zeros(shape))
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def _vals(seed, n=5):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def check_norm_layouts(rank):
    sq = lambda t: float(t.double().square().sum())  # noqa: E731
    other = 1 - rank
    layouts = [
        # (config, sharded_over_dp, items per rank as (grad, attrs), expected sum of squares)
        (dict(tensor_model_parallel_size=2), False,
         lambda r: [(_vals(10 + r), dict(tensor_model_parallel=True)), (_vals(20), {})],
         sq(_vals(10)) + sq(_vals(11)) + sq(_vals(20))),
        (dict(expert_model_parallel_size=2), False,
         lambda r: [(_vals(30), {}), (_vals(40 + r), dict(is_expert=True))],
         sq(_vals(30)) + sq(_vals(40)) + sq(_vals(41))),
        (dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1), False,
         lambda r: [(_vals(50 + r), dict(tensor_model_parallel=True)), (_vals(60), {}), (_vals(70 + r), dict(is_expert=True))],
         sq(_vals(50)) + sq(_vals(51)) + sq(_vals(60)) + sq(_vals(70)) + sq(_vals(71))),
        (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2), False,
         lambda r: [(_vals(80 + r), dict(is_expert=True, tensor_model_parallel=True)), (_vals(90), dict(is_expert=True))],
         sq(_vals(80)) + sq(_vals(81)) + sq(_vals(90))),
        (dict(pipeline_model_parallel_size=2), False,
         lambda r: [(_vals(100 + r), {}), (_vals(110), dict(shared_embedding=True))],
         sq(_vals(100)) + sq(_vals(101)) + sq(_vals(110))),
        (dict(), True,  # DP2 shards of the reduced grads (dense over dp, experts over edp = dp here)
         lambda r: [(_vals(120 + r), {}), (_vals(130 + r), dict(is_expert=True))],
         sq(_vals(120)) + sq(_vals(121)) + sq(_vals(130)) + sq(_vals(131))),
    ]
    for config, sharded, items, expected in layouts:
        ps = ParallelState.build(ParallelConfig(**config))
        mine = [(g, _param(g.shape, **attrs)) for g, attrs in items(rank)]
        norm = global_grad_norm(mine, ps, sharded_over_dp=sharded)
        assert math.isclose(norm, math.sqrt(expected), rel_tol=1e-6), f"{config}: {norm} != {math.sqrt(expected)}"
    # Non-finite anywhere -> non-finite everywhere.
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2))
    g = _vals(1)
    if rank == 1:
        g[2] = float("inf")
    assert not math.isfinite(global_grad_norm([(g, _param(5, tensor_model_parallel=True))], ps))


# ---- TP2 + SP model ------------------------------------------------------------------------------
class TPNet(nn.Module):
    """norm (SP, replicated) -> column -> tanh -> row (+ residual) -> gather -> head (replicated)."""

    def __init__(self, group=None, sp=False):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        full = {k: torch.randn(*shape, generator=gen) * 0.4 for k, shape in
                (("cw", (F, H)), ("cb", (F,)), ("rw", (H, F)), ("rb", (H,)), ("norm", (H,)))}
        self.group, self.sp = group, sp
        self.norm = nn.Parameter(1 + full["norm"])
        self.norm.sequence_parallel = sp
        self.col = ColumnParallelLinear(H, F, group, sequence_parallel=sp)
        self.row = RowParallelLinear(F, H, group, input_is_parallel=True, sequence_parallel=sp)
        self.col.load_full_weight(full["cw"], full["cb"])
        self.row.load_full_weight(full["rw"], full["rb"])
        self.head = nn.Linear(H, O)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(O, H, generator=gen) * 0.4)
            self.head.bias.copy_(torch.randn(O, generator=gen) * 0.4)

    def forward(self, x):  # x: [s/tp, b, H] with SP, else [s, b, H]
        h = x * self.norm
        o = self.row(torch.tanh(self.col(h))) + h
        if self.sp:
            o = gather_from_sequence_parallel_region(o, self.group, tensor_parallel_output_grad=False)
        return self.head(o)


def tp_batch(step):
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(S, B, H, generator=gen), torch.randn(S, B, O, generator=gen)


def opt_config(**kw):
    base = dict(lr=LRS[0], weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=0.2)
    base.update(kw)
    return OptimizerConfig(**base)


def check_tp2_sp_training(rank):
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    ref = TPNet()
    decay = [p for n, p in ref.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in ref.named_parameters() if p.dim() <= 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=LRS[0], betas=(0.9, 0.95))
    ref_norms, ref_grads = [], []
    for step in range(3):
        ref_opt.zero_grad()
        x, y = tp_batch(step)
        (ref(x) - y).square().mean().backward()
        ref_grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2).item())
        for g in ref_opt.param_groups:
            g["lr"] = LRS[step]
        ref_opt.step()

    def shard(name, full):
        if name in ("col.weight", "col.bias"):
            return full.chunk(2, 0)[rank]
        return full.chunk(2, 1)[rank] if name == "row.weight" else full

    for dist_opt in (False, True):
        net = TPNet(ps.group("tp"), sp=True)
        ddp = DistributedDataParallel(net, DDPConfig(overlap_grad_reduce=True, use_distributed_optimizer=dist_opt), ps)
        opt = build_optimizer([ddp], opt_config(use_distributed_optimizer=dist_opt), ps)
        for step in range(3):
            opt.zero_grad()
            x, y = tp_batch(step)
            (ddp(x.chunk(2, 0)[rank]) - y).square().mean().backward()
            finalize_model_grads([ddp], ps)
            for name, p in net.named_parameters():
                assert_close(p.main_grad, shard(name, ref_grads[step][name]), f"step {step} grad {name}")
            opt.set_lr(LRS[step])
            ok, norm, _ = opt.step()
            assert ok and math.isclose(norm, ref_norms[step], rel_tol=1e-6), (norm, ref_norms[step])
        assert ref_norms[0] > 0.2, "clipping must be active"
        for name, p in net.named_parameters():
            assert_close(p.detach(), shard(name, dict(ref.named_parameters())[name].detach()), f"TP2 {name}")


# ---- DP2 distributed optimizer state -------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.fc1, self.fc2 = nn.Linear(H, F), nn.Linear(F, O)
        self.norm = nn.Parameter(torch.ones(F))
        self.expert = nn.Parameter(torch.zeros(O, H))
        self.expert.is_expert = True
        with torch.no_grad():
            for p in self.parameters():  # deterministic, independent of the global RNG
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p is self.norm else 0.0))
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.norm) + x @ self.expert.t()


def make(ps, dist_opt, dtype=torch.float32, clip=0.2):
    ddp = DistributedDataParallel(Net(dtype), DDPConfig(bucket_size_mb=1e-4, use_distributed_optimizer=dist_opt,
                                                        grad_reduce_in_fp32=True), ps)
    return ddp, build_optimizer([ddp], opt_config(use_distributed_optimizer=dist_opt, clip_grad=clip,
                                                  bf16=dtype == torch.bfloat16), ps)


def backward(ddp, ps, step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(700 + step)
    x, y = torch.randn(8, H, generator=gen).to(dtype), torch.randn(8, O, generator=gen).to(dtype)
    r = ps.rank_in("dp")
    (ddp(x[4 * r : 4 * r + 4]) - y[4 * r : 4 * r + 4]).square().mean().backward()
    finalize_model_grads([ddp], ps)


def train(ddp, opt, ps, steps, start=0, dtype=torch.float32):
    for step in range(start, start + steps):
        opt.zero_grad()
        backward(ddp, ps, step, dtype)
        opt.set_lr(LRS[step])
        assert opt.step()[0]


def check_distributed_optimizer_state(rank):
    ps = ParallelState.build(ParallelConfig())
    ddp, opt = make(ps, True)
    train(ddp, opt, ps, 3)
    expected = [p.detach().clone() for p in ddp.parameters()]

    ddp, opt = make(ps, True)
    train(ddp, opt, ps, 2)
    model_sd, opt_sd = copy.deepcopy(ddp.state_dict()), copy.deepcopy(opt.state_dict())
    assert opt_sd["layout"] == "dp_shard" and (opt_sd["dp_rank"], opt_sd["dp_size"]) == (rank, 2)
    for entry in opt_sd["params"][0].values():
        assert entry["exp_avg"].numel() == entry["end"] - entry["start"]
    sizes = torch.tensor([sum(e["exp_avg"].numel() for e in opt_sd["params"][0].values())])
    dist.all_reduce(sizes)
    assert sizes.item() == sum(p.numel() for p in ddp.parameters()), "shards must tile every parameter"

    ddp, opt = make(ps, True)
    ddp.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
    train(ddp, opt, ps, 1, start=2)
    for p, e in zip(ddp.parameters(), expected):
        assert torch.equal(p, e), "resumed distributed optimizer must match bitwise"

    shards = [None, None]
    dist.all_gather_object(shards, opt_sd)
    full = merge_optimizer_shards(shards)
    for dist_opt in (False, True):  # the merged state loads into either optimizer (DP resharding path)
        ddp, opt = make(ps, dist_opt)
        ddp.load_state_dict(model_sd)
        opt.load_state_dict(full)
        train(ddp, opt, ps, 1, start=2)
        for p, e in zip(ddp.parameters(), expected):
            assert_close(p.detach(), e, f"merged state, dist_opt={dist_opt}")

    # A NaN in rank 1's shard only: every rank skips the step.
    ddp, opt = make(ps, True)
    train(ddp, opt, ps, 1)
    before = [p.detach().clone() for p in ddp.parameters()]
    opt.zero_grad()
    backward(ddp, ps, 1)
    slot = opt.slots[-1]
    if rank == 1:
        slot.param.main_grad.view(-1)[slot.lo] = float("nan")
    ok, norm, _ = opt.step()
    assert not ok and math.isnan(norm) and opt.step_count == 1
    for p, b in zip(ddp.parameters(), before):
        assert torch.equal(p, b)

    # bf16 weights + fp32 master shards == the non-distributed bf16 optimizer (clip off: bitwise).
    results = []
    for dist_opt in (False, True):
        ddp, opt = make(ps, dist_opt, torch.bfloat16, clip=0.0)
        train(ddp, opt, ps, 3, dtype=torch.bfloat16)
        results.append([p.detach().clone() for p in ddp.parameters()])
        assert all(s.owns_master and s.master.dtype == torch.float32 for s in opt.slots)
    for a, b in zip(*results):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        check_norm_layouts(rank)
        check_tp2_sp_training(rank)
        check_distributed_optimizer_state(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_grad_norm_clipping_and_distributed_optimizer_world2():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
