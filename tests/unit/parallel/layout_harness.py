"""Train a tiny DeepSeek model for a few optimizer steps in one process, or in a parallel layout
over spawned gloo ranks, and compare: the parallel run must compute what one process computes.

Both runs see the same global batches split into micro-batches of MICRO_BATCH sequences: the
single process accumulates all of them; a parallel run gives each data-parallel rank its share.
Every micro-batch loss is a token mean divided by the number of micro-batches, so the summed
gradients agree for any split.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig
from megatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.models.deepseek.sharding import ShardInfo, gather_full_state_dict, load_full_state_dict
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.core.pipeline_parallel import get_forward_backward_func, stage_layer_ranges
from megatron.core.transformer.moe.load_balancing import set_aux_loss_scale, update_expert_bias
from megatron.core.transformer.parallel_context import TensorParallelContext

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, STEPS = 4, 1, 8, 64, 3
# Adam normalises each element's update, so elements with tiny gradients turn fp32 summation-order
# noise into weight differences proportional to lr. Measured: merely regrouping the micro-batches
# of the single-process run changes the final weights by 4e-6 relative at lr 2e-3 and by 1e-6 at
# lr 5e-4, so lr 5e-4 keeps that noise a decade below the 1e-5 tolerance (a 3-step move of ~7%
# of the init scale, enough for every difference in the math to show).
OPTIMIZER = dict(lr=5e-4, weight_decay=0.01, clip_grad=0.5)


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: bool = False
    dist_opt: bool = False
    overlap: bool = False
    dispatcher: str = "alltoall"
    first_stage_layers: Optional[int] = None
    moe: bool = True
    drop: bool = False


def tiny_config(moe: bool = True, drop: bool = False) -> DeepSeekConfig:
    """4 layers (1 dense, 3 MoE: 8 experts in 4 groups, top-2 of the best 2 groups) + 1 MTP depth;
    or 4 dense layers without MTP."""
    return DeepSeekConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_hidden_size=48,
        num_layers=4,
        first_k_dense=1 if moe else 4,
        max_position_embeddings=64,
        mla=MLAConfig(num_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        moe=MoEConfig(
            num_experts=8,
            topk=2,
            ffn_hidden_size=16,
            num_shared_experts=1,
            num_groups=4,
            group_topk=2,
            routed_scaling_factor=2.0,
            enable_expert_bias=True,
            bias_update_rate=1e-2,
            load_balancing_type="seq_aux_loss",
            aux_loss_coeff=0.01,
            capacity_factor=1.0 if drop else None,
        ),
        mtp=MTPConfig(num_layers=1 if moe else 0, loss_scaling_factor=0.3),
    )


def batch(step: int) -> torch.Tensor:
    """Global batch of step `step`: [GLOBAL_BATCH, SEQ + 1] token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def micro_batches(step: int, dp_rank: int, dp_size: int) -> List[Dict[str, torch.Tensor]]:
    per_rank = GLOBAL_BATCH // dp_size
    rows = batch(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    out = []
    for i in range(0, per_rank, MICRO_BATCH):
        chunk = rows[i : i + MICRO_BATCH]
        out.append({"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "loss_mask": torch.ones(chunk.shape[0], SEQ)})
    return out


def _forward_step(data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["tokens"], labels=mb["labels"])

    def loss_func(output):
        loss = model.loss(output, mb["loss_mask"])
        return loss, {"loss": loss.detach()}

    return out, loss_func


def initial_state(config: DeepSeekConfig) -> Dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return {k: v.clone() for k, v in DeepSeekModel(config).state_dict().items()}


def reference_run(config: DeepSeekConfig, init: Dict[str, torch.Tensor]) -> dict:
    """One process, all micro-batches of each global batch accumulated."""
    model = DeepSeekModel(config)
    model.load_state_dict(init)
    state = ParallelState.build(ParallelConfig())
    opt = build_optimizer([model], OptimizerConfig(**OPTIMIZER), state)
    losses, norms, dropped = [], [], 0.0
    for step in range(STEPS):
        opt.zero_grad()
        mbs = micro_batches(step, 0, 1)
        set_aux_loss_scale(model, 1.0 / len(mbs))
        total = 0.0
        for mb in mbs:
            loss = model.loss(model(mb["tokens"], labels=mb["labels"]), mb["loss_mask"]) / len(mbs)
            loss.backward()
            total += loss.item()
            for moe in model.moe_layers():
                if moe.last_stats.dropped_fraction is not None:
                    dropped = max(dropped, float(moe.last_stats.dropped_fraction))
        ok, norm, _ = opt.step()
        assert ok
        update_expert_bias(model)
        losses.append(total)
        norms.append(norm)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "final": final, "dropped": dropped}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def parallel_state_for(layout: Layout) -> ParallelState:
    return ParallelState.build(
        ParallelConfig(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=1,
            sequence_parallel=layout.sp,
        )
    )


def build_parallel(layout: Layout, config: DeepSeekConfig, state: ParallelState, init: Optional[Dict[str, torch.Tensor]] = None):
    """This rank's stage of the model (its shard of the full state dict `init` when given, loaded
    before the optimizer takes its copies), wrapped in DDP, and its optimizer: (model, ddp, optimizer)."""
    ranges = stage_layer_ranges(config.num_layers, layout.pp, layout.first_stage_layers)
    tp = TensorParallelContext(group=state.group("tp"), size=layout.tp, sequence_parallel=layout.sp)
    model = DeepSeekModel(
        config,
        tp=tp,
        layer_range=ranges[state.rank_in("pp")],
        pre_process=state.is_first_stage,
        post_process=state.is_last_stage,
        moe_kwargs={"parallel_state": state, "token_dispatcher_type": layout.dispatcher},
    )
    if init is not None:
        load_full_state_dict(model, init, ShardInfo.from_parallel_state(state))
    ddp = DistributedDataParallel(
        model, DDPConfig(bucket_size_mb=0.01, overlap_grad_reduce=layout.overlap, use_distributed_optimizer=layout.dist_opt), state
    )
    opt = build_optimizer([ddp], OptimizerConfig(**OPTIMIZER, use_distributed_optimizer=layout.dist_opt), state)
    return model, ddp, opt


def parallel_step(step: int, layout: Layout, config: DeepSeekConfig, state: ParallelState, model, ddp, opt):
    """One optimizer step of global step `step`: (loss on the last stage else None, grad norm)."""
    dp, dp_rank = state.size("dp"), state.rank_in("dp")

    def reduce_counts(t: torch.Tensor) -> None:
        # Every rank of the stage routed distinct tokens: sum over TP (SP shards) and DP.
        dist.all_reduce(t, group=state.group("tp"))
        dist.all_reduce(t, group=state.group("dp"))

    opt.zero_grad()
    mbs = micro_batches(step, dp_rank, dp)
    reported = get_forward_backward_func(layout.pp)(
        forward_step_func=_forward_step,
        data_iterator=iter(mbs),
        model=ddp,
        num_microbatches=len(mbs),
        tensor_shape=(MICRO_BATCH, SEQ // layout.tp if layout.sp else SEQ, config.hidden_size),
        dtype=torch.get_default_dtype(),
        parallel_state=state,
        grad_sync_context=ddp.no_sync,
        aux_loss_scale_func=partial(set_aux_loss_scale, model),
    )
    finalize_model_grads([ddp], state)
    ok, norm, _ = opt.step()
    assert ok
    update_expert_bias(model, all_reduce=reduce_counts)
    loss = None
    if state.is_last_stage:
        step_loss = torch.stack([r["loss"] for r in reported]).sum() / len(mbs)
        dist.all_reduce(step_loss, group=state.group("dp"))
        loss = step_loss.item() / dp
    return loss, norm


def _worker(rank: int, world: int, port: int, layout: Layout, config: DeepSeekConfig, init, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A failing rank must not leave the others waiting forever in a collective.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        state = parallel_state_for(layout)
        model, ddp, opt = build_parallel(layout, config, state, init)
        losses, norms = [], []
        for step in range(STEPS):
            loss, norm = parallel_step(step, layout, config, state, model, ddp, opt)
            if loss is not None:
                losses.append(loss)
            norms.append(norm)
        full = gather_full_state_dict(model, ShardInfo.from_parallel_state(state))
        results[rank] = {"losses": losses, "norms": norms, "final": full}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_run(layout: Layout, config: DeepSeekConfig, init: Dict[str, torch.Tensor]) -> Dict[int, dict]:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(layout.world, _free_port(), layout, config, init, results), nprocs=layout.world, join=True)
    return dict(results)


def compare(reference: dict, results: Dict[int, dict]) -> Dict[str, float]:
    """Worst relative differences of losses, grad norms and final weights over all ranks."""
    worst: Dict[str, object] = {"loss": 0.0, "grad_norm": 0.0, "weights": 0.0, "worst_tensor": None}
    seen = set()
    for res in results.values():
        for got, want in zip(res["losses"], reference["losses"]):
            worst["loss"] = max(worst["loss"], abs(got - want) / abs(want))
        assert len(res["norms"]) == len(reference["norms"])
        for got, want in zip(res["norms"], reference["norms"]):
            worst["grad_norm"] = max(worst["grad_norm"], abs(got - want) / abs(want))
        for name, tensor in res["final"].items():
            err = _relative(tensor, reference["final"][name])
            if err > worst["weights"]:
                worst["weights"], worst["worst_tensor"] = err, name
            seen.add(name)
    assert any(res["losses"] for res in results.values()), "no rank reported losses"
    missing = set(reference["final"]) - seen
    assert not missing, f"no rank held {sorted(missing)[:5]}"
    return worst


def with_config(layout: Layout) -> DeepSeekConfig:
    return tiny_config(moe=layout.moe, drop=layout.drop)


__all__ = ["Layout", "tiny_config", "initial_state", "reference_run", "parallel_run", "compare", "with_config", "dataclasses"]
