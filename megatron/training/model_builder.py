"""RunConfig + ParallelState -> this rank's model stage, its DDP wrapper and the optimizer.

Same construction as tests/unit/parallel/layout_harness.py: the stage's layer range from the
pipeline split, a TensorParallelContext over the TP group, MoE layers told the parallel state
and token dispatcher, DDP over dp/edp, then the (distributed) AdamW optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
from torch import nn

from megatron.core.config import RecomputeConfig
from megatron.core.device import Device
from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.random import EXPERT_PARALLEL_SEED_OFFSET
from megatron.core.transformer.parallel_context import TensorParallelContext


@dataclass
class ModelStage:
    """What one rank trains: the stage module, its DDP wrapper, the optimizer and the layer range."""

    model: DeepSeekModel
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    layer_range: Tuple[int, int]

    @property
    def chunks(self) -> List[nn.Module]:
        return [self.ddp]


def stage_layer_range(run: Any, pp_rank: int) -> Tuple[int, int]:
    """[start, end) decoder layers of pipeline stage `pp_rank` (RunConfig.stage_layers)."""
    counts = run.stage_layers
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


def _reinit_experts(model: nn.Module, seed: int, ep_rank: int) -> None:
    """Give each expert-parallel rank's local experts their own init stream (Megatron's expert RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + EXPERT_PARALLEL_SEED_OFFSET + 100 * ep_rank)
        for module in model.modules():
            if module.__class__.__name__ == "GroupedExperts" and hasattr(module, "reset_parameters"):
                module.reset_parameters()


def recompute_config(run: Any) -> RecomputeConfig:
    """--recompute-granularity / -method / -num-layers / -modules as the model's RecomputeConfig."""
    t = run.training
    return RecomputeConfig(granularity=t.recompute_granularity, method=t.recompute_method,
                           num_layers=t.recompute_num_layers, modules=tuple(t.recompute_modules))


def build_model_stage(run: Any, state: ParallelState, device: Device, local_rank: int = 0) -> ModelStage:
    """Build this rank's DeepSeekModel stage on `device`, wrap it in DDP and build the optimizer."""
    if not run.vocab_size_final:
        raise ValueError("call config_adapters.finalize_vocab_size(run, tokenizer.vocab_size) before building the model")
    pp_rank = state.rank_in("pp")
    layer_range = stage_layer_range(run, pp_rank)
    tp = TensorParallelContext(
        group=state.group("tp"), size=state.size("tp"), sequence_parallel=run.parallel.sequence_parallel
    )
    model = DeepSeekModel(
        run.model,
        tp=tp,
        layer_range=layer_range,
        pre_process=state.is_first_stage,
        post_process=state.is_last_stage,
        moe_kwargs={"parallel_state": state, "token_dispatcher_type": run.distributed.moe_token_dispatcher_type},
        recompute=recompute_config(run),
    )
    if state.size("ep") > 1:
        _reinit_experts(model, run.training.seed, state.rank_in("ep"))
    dtype = getattr(torch, run.model.params_dtype)
    model = model.to(device=device.torch_device(local_rank), dtype=dtype)
    ddp = DistributedDataParallel(model, DDPConfig.from_run_config(run), state)
    optimizer = build_optimizer([ddp], OptimizerConfig.from_run_config(run), state)
    return ModelStage(model=model, ddp=ddp, optimizer=optimizer, layer_range=layer_range)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
