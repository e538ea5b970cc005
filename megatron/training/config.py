"""Frozen configuration of one training run, built from Megatron's flags by `arguments.parse_args`.

Everything a run needs after parsing lives in `RunConfig`: the model (`DeepSeekConfig`), the
parallel layout (`ParallelConfig` + `DistributedConfig`), the tokenizer (`TokenizerConfig`),
data, training loop, optimizer, LR schedule, checkpointing, logging and device. Later stages
receive these objects instead of a global `args`, so what a module reads is visible in its
signature and a config cannot change behind its back (all dataclasses are frozen).

`to_flat_dict` / `from_flat_dict` turn a RunConfig into a flat dict of JSON primitives
("model.moe.num_experts": 256) and back. Checkpoints store that dict for --use-checkpoint-args:
it is readable, diffable, and loading it never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.core.parallel_state import ParallelConfig

if typing.TYPE_CHECKING:  # imported lazily at run time: the tokenizer package is another helper's
    from megatron.training.tokenizer import TokenizerConfig

FLAT_FORMAT = "megatron-deepseek-run-config/1"
_FORMAT_KEY = "__format__"


@dataclass(frozen=True)
class DistributedConfig:
    """What the layout needs beyond ParallelConfig's sizes: world, stage split, communication."""

    world_size: int = 1
    data_parallel_size: int = 1
    # --decoder-first/last-pipeline-num-layers: uneven split (None = even split).
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    distributed_timeout_minutes: int = 10
    # MoE token exchange between expert-parallel ranks: "allgather" or "alltoall".
    moe_token_dispatcher_type: str = "allgather"
    moe_shared_expert_overlap: bool = False

    def stage_layers(self, num_layers: int, pipeline_size: int) -> Tuple[int, ...]:
        """Decoder layers on each pipeline stage (see `pipeline_stage_layers`)."""
        return pipeline_stage_layers(
            num_layers, pipeline_size, self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        )


@dataclass(frozen=True)
class DataConfig:
    """Data flags. Prefix lists keep Megatron's `[weight] prefix ...` form as given."""

    seq_length: int = 4096
    data_path: Tuple[str, ...] = ()
    split: Optional[str] = None
    train_data_path: Tuple[str, ...] = ()
    valid_data_path: Tuple[str, ...] = ()
    test_data_path: Tuple[str, ...] = ()
    data_cache_path: Optional[str] = None
    mock_data: bool = False
    num_workers: int = 2
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mmap_bin_files: bool = True


@dataclass(frozen=True)
class TrainingConfig:
    """Batches, run length, stop conditions, evaluation, precision, recompute, NaN handling."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: Optional[int] = None  # resolved from --train-samples when that is given
    train_samples: Optional[int] = None
    exit_interval: Optional[int] = None  # None (or Megatron's 0): never
    exit_duration_in_mins: Optional[int] = None
    exit_signal_handler: bool = False
    kill_switch_file: Optional[str] = None  # save and exit when this file appears
    eval_interval: int = 1000
    eval_iters: int = 100
    skip_train: bool = False
    seed: int = 1234
    bf16: bool = False
    accumulate_allreduce_grads_in_fp32: bool = False
    # NaN/Inf in the loss or gradients: stop with an error (default), or skip that step.
    check_for_nan_in_loss_and_grad: bool = True
    skip_nan_loss: bool = False
    iterations_to_skip: Tuple[int, ...] = ()
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block" (full only)
    recompute_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = ()  # selective only, e.g. ("core_attn",) or ("moe",)
    attention_dropout: float = 0.0  # the model has no dropout: validated to be 0
    hidden_dropout: float = 0.0
    deterministic_mode: bool = False


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters, clipping and the data-parallel gradient/optimizer sharding."""

    optimizer: str = "adam"  # "adam" (AdamW) or the Gaudi fork's "fusedadamw" (same maths)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0  # 0 disables clipping
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule in iterations (sample-based flags are converted at parse time)."""

    lr: Optional[float] = None
    min_lr: float = 0.0
    lr_decay_style: str = "linear"  # constant | linear | cosine | inverse-square-root | WSD
    lr_decay_iters: Optional[int] = None  # resolved: defaults to train_iters
    lr_warmup_iters: int = 0  # resolved: includes --lr-warmup-fraction x decay iters
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_init: float = 0.0
    lr_wsd_decay_style: str = "exponential"  # exponential | linear | cosine | minus_sqrt
    lr_wsd_decay_iters: Optional[int] = None
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how checkpoints are saved and loaded (torch_dist format only)."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_format: str = "torch_dist"
    no_save_optim: bool = False
    no_save_rng: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    use_checkpoint_args: bool = False
    use_mp_args_from_checkpoint_args: bool = False
    use_tokenizer_model_from_checkpoint_args: bool = True
    exit_on_missing_checkpoint: bool = False
    ckpt_step: Optional[int] = None
    verify_checkpoint: bool = False
    verify_checkpoint_model_type: str = "DEEPSEEK"
    save_distrib_optimizer_method: str = "serial_per_node"
    load_distrib_optimizer_method: str = "serial_per_dp_groups"


@dataclass(frozen=True)
class LoggingConfig:
    """Console/TensorBoard logging, timers and profiling."""

    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_throughput: bool = False
    log_timers_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    timing_log_level: int = 0
    timing_log_option: str = "minmax"
    profile: bool = False
    profile_type: Optional[str] = None  # Gaudi fork: "pt" | "pt-full" | "hltv"
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: Tuple[int, ...] = (0,)
    use_pytorch_profiler: bool = False
    moe_per_layer_logging: bool = False
    moe_token_distribution_logging: bool = False
    moe_token_distribution_logging_interval: int = 50
    logging_level: Optional[int] = None


@dataclass(frozen=True)
class DeviceConfig:
    """Device and execution mode. The HPU fused-kernel switches live in `model.kernels`."""

    device: str = "auto"  # auto | hpu | cuda | cpu
    # HPU lazy mode. None: decided at start-up from PT_HPU_LAZY_MODE (what the launcher exports
    # from HL_USE_LAZY_MODE); True/False: what --use-lazy-mode asserts.
    lazy_mode: Optional[bool] = None
    use_torch_compile: bool = False
    use_torch_compiled_autograd: bool = False


@dataclass(frozen=True)
class RunConfig:
    """One training run, fully resolved and validated (see arguments.parse_args).

    `model.vocab_size` is provisional until the tokenizer is known (`vocab_size_final` False):
    call `config_adapters.finalize_vocab_size(run, tokenizer.vocab_size)` before building the
    model, as Megatron pads the tokenizer's vocabulary only after building it.
    """

    model: DeepSeekConfig
    parallel: ParallelConfig
    distributed: DistributedConfig
    tokenizer: TokenizerConfig
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model_preset: Optional[str] = None
    vocab_size_final: bool = False
    # Adjustments and warnings made while resolving flags (printed at start-up).
    notes: Tuple[str, ...] = ()

    @property
    def data_parallel_size(self) -> int:
        return self.distributed.data_parallel_size

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per iteration and data-parallel rank (gradient accumulation steps)."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    @property
    def stage_layers(self) -> Tuple[int, ...]:
        return self.distributed.stage_layers(self.model.num_layers, self.parallel.pipeline_model_parallel_size)


def pipeline_stage_layers(
    num_layers: int, pipeline_size: int, first: Optional[int] = None, last: Optional[int] = None
) -> Tuple[int, ...]:
    """Layers per pipeline stage, Megatron's rule: the first/last stage take `first`/`last` layers
    when given and the other stages split the rest evenly. Raises ValueError naming the flags,
    because an uneven split that silently drops layers is a known Megatron pitfall."""
    flags = "--num-layers / --pipeline-model-parallel-size / --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
    if pipeline_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pipeline_size}")
    for flag, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 when given, got {value}")
    if (first is not None or last is not None) and pipeline_size == 1:
        raise ValueError(
            "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1 "
            "(with one stage every layer is on it)"
        )
    if first is None and last is None:
        if num_layers % pipeline_size:
            raise ValueError(
                f"--num-layers ({num_layers}) is not divisible by --pipeline-model-parallel-size ({pipeline_size}); "
                "change one, or set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
            )
        return (num_layers // pipeline_size,) * pipeline_size
    rest = num_layers - (first or 0) - (last or 0)
    middle = pipeline_size - (first is not None) - (last is not None)
    if rest < 0 or (middle == 0 and rest != 0) or (middle > 0 and (rest < middle or rest % middle)):
        raise ValueError(
            f"{num_layers} layers minus first {first or 0} and last {last or 0} leaves {rest}, which does not "
            f"split evenly (at least one layer each) over the other {middle} pipeline stages; change {flags}"
        )
    each = rest // middle if middle else 0
    counts = [each] * pipeline_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return tuple(counts)


# ------------------------------------------------------------------------------------------
# Flat, JSON-safe form (checkpoint args)
# ------------------------------------------------------------------------------------------

_PRIMITIVES = (type(None), bool, int, float, str)


def to_flat_dict(run: RunConfig) -> Dict[str, Any]:
    """`run` as {"section.field": primitive or list of primitives}, plus a format key."""
    return {_FORMAT_KEY: FLAT_FORMAT, **flatten_dataclass(run)}


def flatten_dataclass(obj: Any, prefix: str = "", out: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Any (nested) dataclass of primitives as {"prefix.field": value}; TypeError otherwise."""
    out = {} if out is None else out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            flatten_dataclass(value, key + ".", out)
        elif isinstance(value, (tuple, list)):
            if not all(isinstance(v, _PRIMITIVES) for v in value):
                raise TypeError(f"{key}: only sequences of primitives can be stored, got {value!r}")
            out[key] = list(value)
        elif isinstance(value, _PRIMITIVES):
            out[key] = value
        else:
            raise TypeError(f"{key}: {type(value).__name__} is not JSON-safe")
    return out


def from_flat_dict(flat: Mapping[str, Any], strict: bool = True) -> RunConfig:
    """Rebuild a RunConfig from `to_flat_dict` output (e.g. after a JSON round trip).

    Missing keys take the dataclass defaults (checkpoints written before a field existed);
    unknown keys are an error when `strict` (a typo or a newer writer), else ignored. Values are
    type-checked against the field annotations, so nothing but primitives is ever accepted.
    """
    fmt = flat.get(_FORMAT_KEY, FLAT_FORMAT)
    if fmt != FLAT_FORMAT:
        raise ValueError(f"unsupported run-config format {fmt!r}; this version reads {FLAT_FORMAT!r}")
    used = {_FORMAT_KEY}
    run = _build(RunConfig, flat, "", used)
    unknown = sorted(set(flat) - used)
    if strict and unknown:
        raise ValueError(f"unknown run-config keys: {', '.join(unknown)}")
    return run


def _hints(cls: type) -> Dict[str, Any]:
    from megatron.training.tokenizer import TokenizerConfig

    return typing.get_type_hints(cls, localns={"TokenizerConfig": TokenizerConfig})


def _build(cls: type, flat: Mapping[str, Any], prefix: str, used: set) -> Any:
    hints = _hints(cls)
    kwargs: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required or any(k.startswith(key + ".") for k in flat):
                kwargs[f.name] = _build(tp, flat, key + ".", used)
        elif key in flat:
            used.add(key)
            kwargs[f.name] = _coerce(flat[key], tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (Optional / Tuple[X, ...] / primitives)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, float, str) and type(value) is tp:
        return value
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def format_run_config(run: RunConfig) -> str:
    """The resolved configuration, one `key = value` per line, plus the pipeline stage map.

    Printed at start-up so that every default that was filled in is visible (silently zeroed
    loss coefficients and dropped layers are problems users report with Megatron).
    """
    flat = to_flat_dict(run)
    flat.pop(_FORMAT_KEY)
    flat.pop("notes")
    width = max(len(k) for k in flat)
    lines = [f"{k.ljust(width)} = {flat[k]!r}" for k in sorted(flat)]
    stages = run.stage_layers
    start = 0
    for i, n in enumerate(stages):
        moe = sum(run.model.is_moe_layer(j) for j in range(start, start + n))
        extra = f" + {run.model.mtp.num_layers} MTP" if i == len(stages) - 1 and run.model.mtp.num_layers else ""
        lines.append(f"pipeline stage {i}: layers {start}-{start + n - 1} ({n - moe} dense, {moe} MoE){extra}")
        start += n
    lines.extend(f"note: {n}" for n in run.notes)
    return "\n".join(lines)
