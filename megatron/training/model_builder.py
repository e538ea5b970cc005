"""This rank's model stage, its DDP wrapper and the optimizer: the one construction path.

`pretrain_gpt.py`, the tools and the tests all build models here. `build_model_stage` takes the
model config and the layout explicitly; `build_training_stage` adds DDP and the optimizer from a
`RunConfig` (the adapters from the run's sections to the core configs live here, so core never
sees training's config types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from megatron.core.config import DeepSeekConfig, RecomputeConfig
from megatron.core.device import Device
from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.models.deepseek.compile import compile_model
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.transformer.parallel_context import ParallelContext
from megatron.training.config import RunConfig


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


def build_model_stage(
    config: DeepSeekConfig,
    state: ParallelState,
    device: Device,
    *,
    layer_range: Tuple[int, int],
    dispatcher: str,
    recompute: RecomputeConfig,
    seed: int,
    local_rank: int = 0,
    overlap_shared_experts: bool = False,
) -> DeepSeekModel:
    """This rank's stage of the model: decoder layers `layer_range` (global indices), the embedding
    on the first stage, the output head and MTP on the last, split over TP / EP as `state` says,
    initialised from `seed` (the same values in every layout), in the config's dtype on `device`."""
    model = DeepSeekModel(
        config,
        parallel=ParallelContext.from_parallel_state(state, dispatcher, overlap_shared_experts),
        layer_range=layer_range,
        pre_process=state.is_first_stage,
        post_process=state.is_last_stage,
        recompute=recompute,
        seed=seed,
    )
    if config.kernels.mark_step_per_layer and device.lazy_mode:
        model.layer_boundary = device.mark_step
    return model.to(device=device.torch_device(local_rank), dtype=getattr(torch, config.params_dtype))


def ddp_config(run: RunConfig) -> DDPConfig:
    """Gradient buffers: fp32 reduction with bf16 parameters, as Megatron does."""
    o, t = run.optimizer, run.training
    return DDPConfig(
        overlap_grad_reduce=o.overlap_grad_reduce,
        overlap_param_gather=o.overlap_param_gather,
        use_distributed_optimizer=o.use_distributed_optimizer,
        grad_reduce_in_fp32=t.accumulate_allreduce_grads_in_fp32 or t.bf16,
    )


def optimizer_config(run: RunConfig) -> OptimizerConfig:
    """AdamW from the optimizer, scheduler and training sections (the scheduler sets lr every step)."""
    o, s = run.optimizer, run.scheduler
    return OptimizerConfig(
        lr=0.0 if s.lr is None else float(s.lr),
        min_lr=float(s.min_lr),
        weight_decay=float(o.weight_decay),
        adam_beta1=float(o.adam_beta1),
        adam_beta2=float(o.adam_beta2),
        adam_eps=float(o.adam_eps),
        clip_grad=float(o.clip_grad),
        bf16=run.training.bf16,
        use_distributed_optimizer=o.use_distributed_optimizer,
        log_num_zeros_in_grad=run.logging.log_num_zeros_in_grad,
        use_fused_adamw=o.optimizer == "fusedadamw",
    )


def build_training_stage(run: RunConfig, state: ParallelState, device: Device, local_rank: int = 0) -> ModelStage:
    """`build_model_stage` for this rank of `run`, wrapped in DDP, with its (distributed) optimizer."""
    if not run.vocab_size_final:
        raise ValueError("call run.with_tokenizer_vocab(tokenizer.vocab_size) before building the model")
    layer_range = run.stage_layer_ranges[state.rank_in("pp")]
    model = build_model_stage(
        run.model, state, device, layer_range=layer_range, dispatcher=run.distributed.moe_token_dispatcher_type,
        recompute=run.training.recompute, seed=run.training.seed, local_rank=local_rank,
        overlap_shared_experts=run.distributed.moe_shared_expert_overlap,
    )
    if run.device.use_torch_compile:
        compile_model(model)  # regional, in place: the parameters DDP and the optimizer see are unchanged
    ddp = DistributedDataParallel(model, ddp_config(run), state)
    optimizer = build_optimizer([ddp], optimizer_config(run), state)
    return ModelStage(model=model, ddp=ddp, optimizer=optimizer, layer_range=layer_range)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
