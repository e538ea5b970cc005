"""Data-parallel training on real gloo groups against single-process references.

One process group (world 2) runs every case; each case builds its own ParallelState:
- DP2: plain / overlap / distributed optimizer / both (also with the native reduce-scatter +
  all-gather path forced, and with average_in_collective), 3 steps x 2 micro-batches (no_sync
  accumulation, tiny buckets), equal to torch.optim.AdamW + clip_grad_norm_ on the whole batch;
- EP2 (DP2, EDP1): each rank holds a different expert; experts must not be averaged over EP
  ranks but dense weights must; equal to the single-process model holding both experts;
- PP2: `shared_embedding` grads summed over the embedding group before the DP reduction (deferred
  buckets, also with overlap); SP grads (TP2) summed over TP.
A second process group (world 4, TP2 x DP2) checks that summing SP grads over TP after the DP
reduce-scatter is exact on every rank's distributed-optimizer shard.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region
from tests.dist_utils import spawn

WORLD, STEPS, MICRO, ROWS = 2, 3, 2, 2  # per rank and micro-batch
LRS = (1e-2, 5e-3, 2e-3)
H, F, O, E = 6, 8, 4, 2


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert b.norm() > 0
    return ((a - b).norm() / b.norm()).item()


def assert_close(a, b, name, tol=1e-6):
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


class Net(nn.Module):
    """fc1 -> tanh -> (+ experts) -> fc2; with ep_size > 1 this rank holds expert `ep_rank` only and
    exchanges tokens over the EP group like an all-gather dispatcher."""

    def __init__(self, ep_group=None, ep_rank=0, ep_size=1):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.fc1, self.fc2 = nn.Linear(H, F), nn.Linear(F, O)
        experts = torch.randn(E, F, F, generator=gen) * 0.3
        with torch.no_grad():
            for p in list(self.fc1.parameters()) + list(self.fc2.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        self.norm = nn.Parameter(1 + 0.1 * torch.randn(F, generator=gen))
        local = E // ep_size
        self.experts = nn.Parameter(experts[ep_rank * local : (ep_rank + 1) * local].clone())
        self.experts.is_expert = True
        self.coef = torch.tensor([0.7, -0.4])[ep_rank * local : (ep_rank + 1) * local]
        self.ep_group, self.ep_size = ep_group, ep_size

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) * self.norm  # [n, F]
        tokens = gather_from_sequence_parallel_region(h, self.ep_group) if self.ep_size > 1 else h
        y = sum(c * tokens @ w.t() for c, w in zip(self.coef, self.experts))
        moe = reduce_scatter_to_sequence_parallel_region(y, self.ep_group) if self.ep_size > 1 else y
        return self.fc2(h + moe)


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(WORLD * MICRO * ROWS, H, generator=gen), torch.randn(WORLD * MICRO * ROWS, O, generator=gen)


def loss_of(model, x, y):
    return (model(x) - y).square().mean()


def reference(clip):
    """torch AdamW + clip on the whole batch: (losses, norms, final parameters by name)."""
    model = Net()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LRS[0], betas=(0.9, 0.95), eps=1e-8)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, *batch(step))
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        opt.step()
        losses.append(loss.item())
    return losses, norms, dict(model.named_parameters())


def train(ps, ddp_config, clip, ep=False, native=None):
    """STEPS steps on this rank's rows; returns (global losses, norms, ddp).

    native=True forces the single-buffer reduce-scatter / all-gather path (nccl / hccl's) on gloo.
    """
    dp_rank = ps.rank_in("dp")
    net = Net(ps.group("ep"), ps.rank_in("ep"), ps.size("ep")) if ep else Net()
    ddp = DistributedDataParallel(net, ddp_config, ps)
    for buffer in ddp.grad_buffers:
        buffer.native = native
    opt = build_optimizer(
        [ddp],
        OptimizerConfig(lr=LRS[0], weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=clip,
                        use_distributed_optimizer=ddp_config.use_distributed_optimizer),
        ps,
    )
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        total = 0.0
        for m in range(MICRO):
            rows = slice((dp_rank * MICRO + m) * ROWS, (dp_rank * MICRO + m + 1) * ROWS)
            loss = loss_of(ddp, x[rows], y[rows]) / MICRO
            if m < MICRO - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.item()
        finalize_model_grads([ddp], ps)
        opt.set_lr(LRS[step])
        ok, norm, _ = opt.step()
        assert ok
        t = torch.tensor([total])
        dist.all_reduce(t)
        losses.append(t.item() / WORLD)
        norms.append(norm)
    return losses, norms, ddp


def check_dp2(ps):
    assert ps.size("dp") == 2
    clip = 0.3
    ref_losses, ref_norms, ref_params = reference(clip)
    results = {}
    cases = [(overlap, dist_opt, None, False) for overlap in (False, True) for dist_opt in (False, True)]
    cases += [(True, True, True, False), (False, True, True, True), (True, False, None, True)]
    for overlap, dist_opt, native, avg in cases:
        cfg = DDPConfig(bucket_size_mb=1e-4, overlap_grad_reduce=overlap, use_distributed_optimizer=dist_opt,
                        average_in_collective=avg)
        losses, norms, ddp = train(ps, cfg, clip, native=native)
        tag = f"overlap={overlap} dist_opt={dist_opt} native={native} avg={avg}"
        assert len(ddp.grad_buffers[0].buckets) > 2, "the test wants several buckets"
        assert_close(losses, ref_losses, f"{tag} losses")
        assert_close(norms, ref_norms, f"{tag} grad norms")
        assert norms[0] > clip, "clipping must be active"
        for name, p in ddp.named_parameters():
            assert_close(p.detach(), ref_params[name].detach(), f"{tag} {name}")
        results[(overlap, dist_opt, native, avg)] = [p.detach().clone() for p in ddp.parameters()]
    for dist_opt in (False, True):  # overlap changes when, not what, is reduced
        for a, b in zip(results[(False, dist_opt, None, False)], results[(True, dist_opt, None, False)]):
            assert torch.equal(a, b), "overlap_grad_reduce must not change the result"


def check_ep2(ps):
    assert (ps.size("dp"), ps.size("ep"), ps.size("edp")) == (2, 2, 1)
    ep_rank = ps.rank_in("ep")
    ref_losses, ref_norms, ref_params = reference(clip=0.3)
    for dist_opt in (False, True):
        cfg = DDPConfig(bucket_size_mb=1e-4, use_distributed_optimizer=dist_opt, overlap_grad_reduce=dist_opt)
        losses, norms, ddp = train(ps, cfg, 0.3, ep=True)
        expert_buffers = [b for b in ddp.grad_buffers if b.is_expert]
        assert len(expert_buffers) == 1 and expert_buffers[0].size == 1, "experts reduce over edp (size 1)"
        assert_close(losses, ref_losses, "EP2 losses")
        assert_close(norms, ref_norms, "EP2 grad norms (both experts counted once)")
        for name, p in ddp.named_parameters():
            ref = ref_params[name].detach()
            if name == "experts":
                ref = ref[ep_rank : ep_rank + 1]
            assert_close(p.detach(), ref, f"EP2 dist_opt={dist_opt} {name}")
        other = torch.empty_like(ddp.experts)
        dist.all_reduce(other.copy_(ddp.experts.detach()))
        assert not torch.allclose(other / 2, ddp.experts), "experts must stay different over EP ranks"


def check_sp_and_shared_embedding(rank):
    """Deferred params: SP grads summed over TP (TP2) and shared embedding grads over PP2."""
    for config, attr, group in (
        (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), "sequence_parallel", "tp"),
        (ParallelConfig(pipeline_model_parallel_size=2), "shared_embedding", "embedding"),
    ):
        ps = ParallelState.build(config)
        assert ps.size(group) == 2
        for overlap, dist_opt in ((False, False), (True, True)):
            net = nn.Linear(4, 3)
            setattr(net.weight, attr, True)
            ddp = DistributedDataParallel(net, DDPConfig(overlap_grad_reduce=overlap, use_distributed_optimizer=dist_opt), ps)
            xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(r)) for r in range(2)]
            ddp(xs[rank]).sum().backward()
            finalize_model_grads([ddp], ps)
            assert torch.allclose(net.weight.main_grad, sum(xs).sum(0).expand(3, 4), rtol=1e-6), attr
            assert torch.allclose(net.bias.main_grad, torch.full((3,), 5.0)), "non-deferred grads stay local"
    # The embedding marked on the last stage only: both stages raise instead of hanging.
    ps = ParallelState.build(ParallelConfig(pipeline_model_parallel_size=2))
    net = nn.Linear(4, 3)
    if rank == 1:
        net.weight.shared_embedding = True
    ddp = DistributedDataParallel(net, DDPConfig(), ps)
    ddp(torch.ones(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="BOTH"):
        finalize_model_grads([ddp], ps)


def check_sp_after_dp_reduce_scatter(rank):
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    assert (ps.size("tp"), ps.size("dp")) == (2, 2)
    xs = {(t, d): torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * t + d)) for t in range(2) for d in range(2)}
    x = xs[(ps.rank_in("tp"), ps.rank_in("dp"))]
    expected_sp = sum(xs.values()).sum(0).expand(5, 4) / 2  # TP sum, DP average
    expected_local = (xs[(ps.rank_in("tp"), 0)] + xs[(ps.rank_in("tp"), 1)]).sum(0).expand(7, 4) / 2  # DP average only
    for native in (None, True):
        net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(4, 7, bias=False), nn.Linear(4, 5, bias=False))
        net[0].weight.sequence_parallel = True
        net[2].weight.sequence_parallel = True
        ddp = DistributedDataParallel(net, DDPConfig(bucket_size_mb=1e-4, overlap_grad_reduce=True, use_distributed_optimizer=True), ps)
        for buffer in ddp.grad_buffers:
            buffer.native = native
        sum(layer(x).sum() for layer in net).backward()
        finalize_model_grads([ddp], ps)
        checked = 0
        for buffer in ddp.grad_buffers:
            for p, _, _, lo, hi in buffer.local_shards():
                want = expected_local if p is net[1].weight else expected_sp
                assert torch.allclose(p.main_grad.reshape(-1)[lo:hi], want.reshape(-1)[lo:hi], rtol=1e-6), (native, lo, hi)
                checked += hi - lo
        assert checked > 0


def _worker_tp2_dp2(rank, world):
    torch.set_num_threads(1)
    check_sp_after_dp_reduce_scatter(rank)


def _worker(rank, world):
    torch.set_num_threads(1)
    check_dp2(ParallelState.build(ParallelConfig()))
    check_ep2(ParallelState.build(ParallelConfig(expert_model_parallel_size=2)))
    check_sp_and_shared_embedding(rank)


@pytest.mark.slow
def test_data_parallel_training_matches_single_process():
    spawn(WORLD, _worker, timeout_s=60)


@pytest.mark.slow
def test_sequence_parallel_sum_after_dp_reduce_scatter_tp2_dp2():
    spawn(4, _worker_tp2_dp2, timeout_s=60)
