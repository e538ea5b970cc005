"""The planner's view of one run: the parallel layout and the training settings that size memory
and communication, read once from a validated `RunConfig`.

Everything the planner computes is a function of `Layout` and the model config, so the numbers
for a RunConfig and for a candidate of `--search` come from the same code. Stage `s` holds the
decoder layers `stage_ranges[s]`; the first stage embeds, the last one holds the final norm,
the output head and the MTP depths (as `megatron.training.model_builder` builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.core.transformer.moe import experts as _experts_module

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The experts module's fallback for accelerators without grouped GEMM: static tiles.
TILED_FALLBACK = hasattr(_experts_module, "expert_tiles")


@dataclass(frozen=True)
class Layout:
    """Parallel sizes and the per-step settings the planner needs (all read from a RunConfig)."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    sequence_parallel: bool
    stage_layers: Tuple[int, ...]  # decoder layers per pipeline stage
    dispatcher: str  # "alltoall" | "allgather"
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    params_dtype: str  # "float32" | "bfloat16"
    grad_reduce_in_fp32: bool  # main grads in fp32 (DDPConfig.from_run_config's rule)
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block"
    recompute_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = ()
    clip_grad: float = 1.0
    bucket_size_mb: Optional[float] = 40.0  # DDPConfig's default bucket size
    # How the routed experts compute their rows (moe/experts.py): "grouped" (one grouped GEMM
    # over the whole row buffer: --moe-grouped-gemm and a device/dtype with the kernel), "loop"
    # (one GEMM pair per expert over its valid rows: CPU) or "tiled" (static tiles, accelerators).
    expert_path: str = "loop"
    # The device layer's kind ("cpu", "cuda", "hpu"): picks kernels whose memory differs, e.g. the
    # MLA value head (attention.mla_value: narrow v for CUDA's cuDNN attention, a q/k-wide view
    # of the kv projection elsewhere).
    device_kind: str = "cpu"
    shared_expert_overlap: bool = False  # --moe-shared-expert-overlap: shared experts before the combine

    @property
    def grouped_gemm(self) -> bool:
        return self.expert_path == "grouped"

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the ranks of a stage holding the same experts."""
        return (self.tp * self.dp) // (self.etp * self.ep)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.params_dtype]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_reduce_in_fp32 else self.param_bytes

    @property
    def stage_ranges(self) -> List[Tuple[int, int]]:
        out, start = [], 0
        for n in self.stage_layers:
            out.append((start, start + n))
            start += n
        return out

    @property
    def tokens_per_microbatch(self) -> int:
        """Tokens of one micro-batch on one data-parallel rank (batch x sequence)."""
        return self.micro_batch_size * self.seq_length

    @property
    def local_tokens(self) -> int:
        """Tokens of the residual stream on one rank: the sequence is split over TP under SP."""
        t = self.tokens_per_microbatch
        return t // self.tp if self.sequence_parallel and self.tp > 1 else t

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations a stage holds at once under 1F1B (schedules.py):
        min(P - s - 1, M) warmup forwards plus the first steady-state forward, capped at M."""
        if self.pp == 1:
            return 1
        return min(self.pp - stage, self.num_microbatches)

    def recompute_full_chunks(self, num_layers: int) -> Tuple[int, int]:
        """Full recompute on a stage of `num_layers` layers: (checkpointed layers, largest chunk).

        uniform: every layer, in chunks of recompute_num_layers; block: the first
        recompute_num_layers layers, one by one. (0, 0) without full recompute.
        """
        if self.recompute_granularity != "full" or not self.recompute_num_layers:
            return 0, 0
        n = self.recompute_num_layers
        if self.recompute_method == "uniform":
            return num_layers, min(n, num_layers)
        return min(n, num_layers), 1 if num_layers else 0


def expert_path(use_grouped_gemm: bool, dtype: str, device_kind: str, grouped_mm_dtypes: Tuple[str, ...]) -> str:
    """The experts' compute path on a device (see Layout.expert_path)."""
    if use_grouped_gemm and dtype in grouped_mm_dtypes:
        return "grouped"
    if device_kind == "cpu" or not TILED_FALLBACK:
        return "loop"
    return "tiled"


def layout_from_run(run: Any, device_kind: str = "cpu", grouped_mm_dtypes: Tuple[str, ...] = ()) -> Layout:
    """The Layout of a parsed `RunConfig` (megatron.training.arguments.parse_args) on a device of
    `device_kind` ("cpu", "cuda", "hpu") with grouped GEMM kernels for `grouped_mm_dtypes`."""
    par, dist, t, opt = run.parallel, run.distributed, run.training, run.optimizer
    etp = 1 if par.expert_tensor_parallel_size is None else par.expert_tensor_parallel_size
    rc = _recompute(t)
    return Layout(
        world_size=dist.world_size,
        tp=par.tensor_model_parallel_size,
        pp=par.pipeline_model_parallel_size,
        ep=par.expert_model_parallel_size,
        etp=etp,
        dp=dist.data_parallel_size,
        sequence_parallel=bool(par.sequence_parallel),
        stage_layers=tuple(run.stage_layers),
        dispatcher=dist.moe_token_dispatcher_type,
        distributed_optimizer=bool(opt.use_distributed_optimizer),
        overlap_grad_reduce=bool(opt.overlap_grad_reduce),
        overlap_param_gather=bool(opt.overlap_param_gather),
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        seq_length=run.data.seq_length,
        params_dtype=run.model.params_dtype,
        # DDPConfig.from_run_config: fp32 main grads with --accumulate-allreduce-grads-in-fp32,
        # and always with --bf16 (as Megatron forces it).
        grad_reduce_in_fp32=bool(t.accumulate_allreduce_grads_in_fp32 or t.bf16),
        recompute_granularity=rc.granularity,
        recompute_method=rc.method,
        recompute_num_layers=rc.num_layers,
        recompute_modules=tuple(rc.modules),
        clip_grad=float(opt.clip_grad),
        expert_path=expert_path(bool(run.model.kernels.use_grouped_gemm), run.model.params_dtype, device_kind,
                                grouped_mm_dtypes),
        device_kind=device_kind,
        shared_expert_overlap=bool(getattr(dist, "moe_shared_expert_overlap", False)),
    )


@dataclass(frozen=True)
class _Recompute:
    granularity: Optional[str]
    method: Optional[str]
    num_layers: Optional[int]
    modules: Tuple[str, ...]


def _recompute(training: Any) -> _Recompute:
    """The run's recompute settings: a RecomputeConfig under `training.recompute`, or the flat
    recompute_* fields of the training section."""
    rc = getattr(training, "recompute", None)
    if rc is not None:
        return _Recompute(rc.granularity, rc.method, rc.num_layers, tuple(rc.modules))
    return _Recompute(training.recompute_granularity, training.recompute_method, training.recompute_num_layers,
                      tuple(training.recompute_modules))


def moe_layers_in(config: DeepSeekConfig, start: int, end: int) -> int:
    return sum(config.is_moe_layer(i) for i in range(start, end))
