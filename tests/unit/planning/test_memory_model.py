"""The planner's memory model against the real modules, in one process (fast).

Activations: the bytes autograd keeps (saved_tensors_hooks, one count per storage, parameters
excluded) after one forward of a small model must equal the planner's per-micro-batch figure.
Buffers: DistributedDataParallel's gradient buffers and the optimizer's state must have the
element counts the planner replays.
"""

import dataclasses

import pytest
import torch

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig, RecomputeConfig
from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.training.planning.activations import stage_activations
from megatron.training.planning.buffers import optimizer_slots, plan_buffers
from megatron.training.planning.layout import Layout
from megatron.training.planning.params import stage_parameters

BATCH, SEQ, VOCAB = 2, 64, 512


def small_config(dtype: str = "float32", **moe) -> DeepSeekConfig:
    """3 layers (1 dense, 2 MoE: 8 experts, top-2 of 2 groups, one shared) + 1 MTP depth."""
    return DeepSeekConfig(
        vocab_size=VOCAB, hidden_size=256, ffn_hidden_size=512, num_layers=3, first_k_dense=1,
        max_position_embeddings=4096, params_dtype=dtype,
        mla=MLAConfig(num_heads=8, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(**{**dict(num_experts=8, topk=2, ffn_hidden_size=128, num_shared_experts=1, score_function="sigmoid",
                                num_groups=2, group_topk=1, enable_expert_bias=True, load_balancing_type="seq_aux_loss",
                                aux_loss_coeff=1e-4), **moe}),
        mtp=MTPConfig(num_layers=1),
    )


def one_rank_layout(config: DeepSeekConfig, recompute: RecomputeConfig) -> Layout:
    return Layout(
        world_size=1, tp=1, pp=1, ep=1, etp=1, dp=1, sequence_parallel=False, stage_layers=(config.num_layers,),
        dispatcher="alltoall", distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False,
        micro_batch_size=BATCH, global_batch_size=BATCH, seq_length=SEQ, params_dtype=config.params_dtype,
        grad_reduce_in_fp32=True, recompute_granularity=recompute.granularity, recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers, recompute_modules=tuple(recompute.modules),
        expert_path="grouped" if config.kernels.use_grouped_gemm else "loop",  # CPU has grouped_mm for fp32 and bf16
    )


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes autograd keeps for backward after one training forward (as gpt_forward_step calls it)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, -1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=labels, position_ids=positions)
    assert out.losses is not None
    return sum(seen.values())


RECOMPUTE = {
    "none": RecomputeConfig(),
    "core_attn": RecomputeConfig("selective", None, None, ("core_attn",)),
    "moe": RecomputeConfig("selective", None, None, ("moe",)),
    "full_uniform": RecomputeConfig("full", "uniform", 1, ()),
    "full_block": RecomputeConfig("full", "block", 1, ()),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_activation_bytes_equal_saved_tensors(dtype, recompute):
    config = small_config(dtype)
    rc = RECOMPUTE[recompute]
    model = DeepSeekModel(config, recompute=rc).to(getattr(torch, dtype))
    measured = saved_bytes(model)
    predicted = stage_activations(config, one_rank_layout(config, rc), 0).total
    # A few small tensors (per-sequence aux-loss statistics) are not itemised: < 0.1%.
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_activation_bytes_capacity_and_softmax_router():
    config = small_config(score_function="softmax", enable_expert_bias=False, load_balancing_type="aux_loss",
                          capacity_factor=1.5, num_groups=1)
    rc = RecomputeConfig()
    model = DeepSeekModel(config, recompute=rc)
    assert stage_activations(config, one_rank_layout(config, rc), 0).total == pytest.approx(saved_bytes(model), rel=2e-3)


@pytest.mark.parametrize("dtype,fp32_grads", [("float32", False), ("bfloat16", True), ("bfloat16", False)])
def test_grad_buffers_and_optimizer_state_equal_ddp(dtype, fp32_grads):
    config = small_config(dtype)
    model = DeepSeekModel(config).to(getattr(torch, dtype))
    state = ParallelState.build(ParallelConfig())
    ddp = DistributedDataParallel(model, DDPConfig(grad_reduce_in_fp32=fp32_grads, bucket_size_mb=0.25), state)
    optimizer = build_optimizer([ddp], OptimizerConfig(bf16=dtype == "bfloat16"), state)
    params = stage_parameters(config, 1, 1, False, (0, config.num_layers), True, True)
    grad_bytes = 4 if fp32_grads else torch.empty((), dtype=getattr(torch, dtype)).element_size()
    plans = plan_buffers(params, grad_bytes=grad_bytes, dp=1, edp=1, distributed_optimizer=False, bucket_size_mb=0.25)
    assert [p.numel for p in plans] == [b.numel for b in ddp.grad_buffers]
    assert [p.buckets for p in plans] == [[(k.start, k.end) for k in b.buckets] for b in ddp.grad_buffers]
    assert sum(b.grad_data.element_size() * b.numel for b in ddp.grad_buffers) == grad_bytes * sum(p.numel for p in plans)
    slots = optimizer_slots(plans, distributed_optimizer=False)
    assert slots.total == sum(s.exp_avg.numel() for s in optimizer.slots)
    assert slots.decay == sum(s.exp_avg.numel() for s in optimizer.slots if s.group == 0)


def test_distributed_optimizer_shards_tile_the_buffers():
    config = dataclasses.replace(small_config(), num_layers=2)
    params = stage_parameters(config, 1, 1, False, (0, 2), True, True)
    plans = plan_buffers(params, grad_bytes=4, dp=4, edp=2, distributed_optimizer=True, bucket_size_mb=0.25)
    for plan in plans:
        for start, end in plan.buckets:
            assert (end - start) % (64 * plan.group_size) == 0  # equal, aligned per-rank shards
    dense_plans = [p for p in plans if not p.is_expert]
    expert_plans = [p for p in plans if p.is_expert]
    dense_total = sum(p.numel for p in params if not p.is_expert)
    expert_total = sum(p.numel for p in params if p.is_expert)
    dense = [optimizer_slots(dense_plans, True, dp_rank=r).total for r in range(4)]
    expert = [optimizer_slots(expert_plans, True, edp_rank=r).total for r in range(2)]
    # Every element has exactly one owner, and shares differ by at most the alignment padding.
    assert sum(dense) == dense_total and sum(expert) == expert_total
    padding = 64 * 4 * sum(len(p.buckets) for p in dense_plans)
    assert max(dense) - min(dense) <= padding
