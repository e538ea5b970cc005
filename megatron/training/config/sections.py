"""The sections of a run's configuration, one frozen dataclass per concern.

Each section is built from the parsed flags in one place (`from_flags`) and validates itself
when it is built (`__post_init__`), with one-line messages naming the flags to change. Checks
that need two sections (the layout against the model, batches against the data-parallel size,
...) live in `RunConfig`; file-system checks in `paths.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from megatron.core.config import RecomputeConfig
from megatron.core.datasets.dataset_config import parse_data_path
from megatron.core.datasets.helpers import parse_split
from megatron.core.transformer.parallel_context import TOKEN_DISPATCHER_TYPES

DEFAULT_SPLIT = "969, 30, 1"  # Megatron's legacy value when --data-path comes without --split


def pick(v: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    """The flag values whose parser dest equals a field name of `cls`."""
    return {f.name: v[f.name] for f in fields(cls) if f.name in v}


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

    def __post_init__(self) -> None:
        if self.distributed_timeout_minutes < 1:
            raise ValueError(f"--distributed-timeout-minutes must be >= 1, got {self.distributed_timeout_minutes}")
        if self.moe_token_dispatcher_type not in TOKEN_DISPATCHER_TYPES:
            raise ValueError(f"--moe-token-dispatcher-type must be one of {TOKEN_DISPATCHER_TYPES}")
        if self.moe_shared_expert_overlap and self.moe_token_dispatcher_type != "alltoall":
            raise ValueError("--moe-shared-expert-overlap overlaps with the all-to-all: it needs --moe-token-dispatcher-type alltoall")


@dataclass(frozen=True)
class DataConfig:
    """Data flags. Prefix lists keep Megatron's `[weight] prefix ...` form as given."""

    seq_length: int = 4096
    data_path: Tuple[str, ...] = ()
    data_args_path: Optional[str] = None  # a file holding the --data-path values, read where datasets are built
    per_split_data_args_path: Optional[str] = None  # a JSON file of the three per-split lists
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

    @classmethod
    def from_flags(cls, v: Mapping[str, Any], notes: List[str]) -> "DataConfig":
        if v["seq_length"] is None:
            raise ValueError("--seq-length is required")
        split = v["split"]
        if (v["data_path"] or v["data_args_path"]) and split is None:
            split = DEFAULT_SPLIT
            notes.append(f"--split not given: using Megatron's legacy default '{split}'")
        paths = {k: tuple(v[k] or ()) for k in ("data_path", "train_data_path", "valid_data_path", "test_data_path")}
        return cls(**{**pick(v, cls), **paths, "split": split})

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        split_paths = self.train_data_path or self.valid_data_path or self.test_data_path
        sources = [name for name, on in (("--mock-data", self.mock_data), ("--data-path", bool(self.data_path)),
                                         ("--data-args-path", self.data_args_path is not None),
                                         ("--train/valid/test-data-path", bool(split_paths)),
                                         ("--per-split-data-args-path", self.per_split_data_args_path is not None)) if on]
        if not sources:
            raise ValueError("no training data: pass --data-path (or --train-data-path ...) or --mock-data")
        if len(sources) > 1:
            raise ValueError(f"use one data source, got {' and '.join(sources)}")
        if self.split is not None:
            parse_split(self.split)
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        for values in (self.data_path, self.train_data_path, self.valid_data_path, self.test_data_path):
            if values:
                parse_data_path(list(values))

    def blends(self) -> Dict[str, Tuple[str, ...]]:
        """{flag: values} of the prefix lists that are set, the data-args files read (they are read
        where datasets are built, and when arguments are parsed with path checks)."""
        from megatron.core.datasets.data_args import read_data_args_file, read_per_split_data_args_file

        named = [("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                 ("--valid-data-path", self.valid_data_path), ("--test-data-path", self.test_data_path)]
        if self.data_args_path is not None:
            named.append(("--data-path", tuple(read_data_args_file(self.data_args_path))))
        if self.per_split_data_args_path is not None:
            splits = read_per_split_data_args_file(self.per_split_data_args_path)
            named += [(f"--{k}-data-path", tuple(splits.get(k) or ())) for k in ("train", "valid", "test")]
        return {flag: values for flag, values in named if values}


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
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    deterministic_mode: bool = False

    @classmethod
    def from_flags(cls, v: Mapping[str, Any], dp: int, notes: List[str]) -> "TrainingConfig":
        mbs = v["micro_batch_size"]
        if mbs is None:
            raise ValueError("--micro-batch-size is required")
        gbs = v["global_batch_size"]
        if gbs is None:
            gbs = mbs * dp
            notes.append(f"--global-batch-size not given: micro batch x data-parallel size = {gbs}")
        train_iters, samples = v["train_iters"], v["train_samples"]
        if samples is not None:
            if train_iters is not None:
                raise ValueError("give one of --train-iters and --train-samples, not both")
            train_iters = samples // gbs if gbs > 0 else 0
        return cls(**{
            **pick(v, cls),
            "global_batch_size": gbs,
            "train_iters": train_iters,
            "exit_interval": v["exit_interval"] or None,  # Megatron treats 0 as "never"
            "iterations_to_skip": tuple(v["iterations_to_skip"]),
            "recompute": _recompute_from_flags(v),
        })

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if not self.skip_train and (self.train_iters is None or self.train_iters < 1):
            raise ValueError("set --train-iters (or --train-samples of at least one global batch)")
        if self.exit_interval is not None and self.exit_interval < 0:
            raise ValueError(f"--exit-interval must be >= 0, got {self.exit_interval}")
        if self.eval_interval < 1 or self.eval_iters < 0:
            raise ValueError(f"--eval-interval must be >= 1 and --eval-iters >= 0, got {self.eval_interval} and {self.eval_iters}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.skip_nan_loss and not self.check_for_nan_in_loss_and_grad:
            raise ValueError("--skip-nan-loss needs the NaN check: drop --no-check-for-nan-in-loss-and-grad")


def _recompute_from_flags(v: Mapping[str, Any]) -> RecomputeConfig:
    granularity, modules = v["recompute_granularity"], list(v["recompute_modules"] or [])
    if v["recompute_activations"] and granularity is None:
        granularity = "selective"
    if v["moe_layer_recompute"]:  # deprecated spelling of --recompute-granularity selective --recompute-modules moe
        granularity = granularity or "selective"
        modules += [] if "moe" in modules else ["moe"]
    if granularity == "selective" and not modules:
        modules = ["core_attn"]  # Megatron's default selective recompute
    return RecomputeConfig(granularity=granularity, method=v["recompute_method"], num_layers=v["recompute_num_layers"],
                           modules=tuple(modules))


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

    @classmethod
    def from_flags(cls, v: Mapping[str, Any]) -> "OptimizerConfig":
        return cls(**pick(v, cls))

    def __post_init__(self) -> None:
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"--adam-beta1/--adam-beta2 must be in [0, 1), got {self.adam_beta1} and {self.adam_beta2}")
        if self.adam_eps <= 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(
                f"--adam-eps must be > 0, --weight-decay and --clip-grad >= 0; got {self.adam_eps}, {self.weight_decay}, "
                f"{self.clip_grad}"
            )
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")


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
    required: bool = True  # --lr must be given (not with --skip-train)

    @classmethod
    def from_flags(cls, v: Mapping[str, Any], t: TrainingConfig) -> "SchedulerConfig":
        """Iteration-based schedule; sample-based flags are converted with the global batch size."""
        gbs = t.global_batch_size
        decay, warmup, wsd = v["lr_decay_iters"], v["lr_warmup_iters"], v["lr_wsd_decay_iters"]
        sample_flags = {"--lr-decay-samples": v["lr_decay_samples"], "--lr-wsd-decay-samples": v["lr_wsd_decay_samples"],
                        "--lr-warmup-samples": v["lr_warmup_samples"] or None}
        if t.train_samples is not None:
            if decay is not None or warmup or wsd is not None:
                raise ValueError("with --train-samples give the schedule in samples: --lr-decay-samples, --lr-warmup-samples, --lr-wsd-decay-samples")
            decay = v["lr_decay_samples"] // gbs if v["lr_decay_samples"] is not None else None
            wsd = v["lr_wsd_decay_samples"] // gbs if v["lr_wsd_decay_samples"] is not None else None
            warmup = v["lr_warmup_samples"] // gbs
        else:
            given = [flag for flag, value in sample_flags.items() if value is not None]
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise ValueError(f"{', '.join(given)} {verb} --train-samples (with --train-iters use the *-iters flags)")
        if decay is None:
            decay = t.train_iters
        fraction = v["lr_warmup_fraction"]
        if fraction is not None:
            if warmup:
                raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
            if not 0 <= fraction <= 1:
                raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {fraction}")
            warmup = int(fraction * (decay or 0))
        return cls(**{**pick(v, cls), "lr_decay_iters": decay, "lr_warmup_iters": warmup, "lr_wsd_decay_iters": wsd,
                      "required": not t.skip_train})

    def __post_init__(self) -> None:
        if self.lr is None:
            if self.required:
                raise ValueError("--lr is required")
            return
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"--lr and --min-lr must be >= 0, got {self.lr} and {self.min_lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_decay_iters is not None and self.lr_warmup_iters >= self.lr_decay_iters:
            raise ValueError(
                f"LR warmup ({self.lr_warmup_iters} iterations) must be shorter than the decay ({self.lr_decay_iters}); "
                "change --lr-warmup-iters/--lr-warmup-fraction or --lr-decay-iters"
            )
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final decay)")
            room = (self.lr_decay_iters or 0) - self.lr_warmup_iters
            if not 0 < self.lr_wsd_decay_iters <= room:
                raise ValueError(
                    f"--lr-wsd-decay-iters ({self.lr_wsd_decay_iters}) must be in [1, decay iterations - warmup = {room}]"
                )


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
    override_explicit_args_from_checkpoint: bool = False
    use_mp_args_from_checkpoint_args: bool = False
    use_tokenizer_model_from_checkpoint_args: bool = True
    exit_on_missing_checkpoint: bool = False
    allow_no_checkpoint: bool = False
    ckpt_step: Optional[int] = None
    ckpt_force_unlock: bool = False
    ckpt_fallback_to_previous: bool = False
    ckpt_allow_tracker_rewind: bool = False
    verify_checkpoint: bool = False
    verify_checkpoint_model_type: str = "DEEPSEEK"

    @classmethod
    def from_flags(cls, v: Mapping[str, Any]) -> "CheckpointConfig":
        return cls(**pick(v, cls))

    def __post_init__(self) -> None:
        if self.ckpt_format != "torch_dist":
            raise ValueError(f"--ckpt-format {self.ckpt_format}: only torch_dist (the distributed checkpoint format) is supported")
        if self.save is not None and (self.save_interval is None or self.save_interval < 1):
            raise ValueError("--save needs --save-interval >= 1")
        if self.save is None and self.verify_checkpoint:
            raise ValueError("--verify-checkpoint checks saved checkpoints: it needs --save")
        if self.load is None:
            for flag, on in (("--use-checkpoint-args", self.use_checkpoint_args), ("--finetune", self.finetune),
                             ("--exit-on-missing-checkpoint", self.exit_on_missing_checkpoint),
                             ("--allow-no-checkpoint", self.allow_no_checkpoint),
                             ("--ckpt-step", self.ckpt_step is not None)):
                if on:
                    raise ValueError(f"{flag} needs --load")
        for flag, on in (("--ckpt-force-unlock", self.ckpt_force_unlock),
                         ("--ckpt-allow-tracker-rewind", self.ckpt_allow_tracker_rewind)):
            if on and self.save is None:
                raise ValueError(f"{flag} applies to --save")
        if self.ckpt_fallback_to_previous and self.load is None:
            raise ValueError("--ckpt-fallback-to-previous needs --load")
        if self.exit_on_missing_checkpoint and self.allow_no_checkpoint:
            raise ValueError("--exit-on-missing-checkpoint and --allow-no-checkpoint contradict each other")
        if self.override_explicit_args_from_checkpoint and not self.use_checkpoint_args:
            raise ValueError("--override-explicit-args-from-checkpoint applies to --use-checkpoint-args")

    @property
    def resumes_own_saves(self) -> bool:
        """--load is the --save directory: a run that restarts itself (nothing there yet is normal)."""
        return self.load is not None and self.save is not None and _same_path(self.load, self.save)


def _same_path(a: str, b: str) -> bool:
    import os

    return os.path.abspath(a) == os.path.abspath(b)


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
    moe_token_distribution_logging_to_console: bool = False
    logging_level: Optional[int] = None

    @classmethod
    def from_flags(cls, v: Mapping[str, Any]) -> "LoggingConfig":
        return cls(**{**pick(v, cls), "profile_ranks": tuple(v["profile_ranks"])})

    def __post_init__(self) -> None:
        if self.log_interval < 1 or self.tensorboard_log_interval < 1:
            raise ValueError("--log-interval and --tensorboard-log-interval must be >= 1")
        if (self.profile or self.profile_type is not None) and not 0 <= self.profile_step_start < self.profile_step_end:
            raise ValueError(
                f"profiling needs 0 <= --profile-step-start ({self.profile_step_start}) < --profile-step-end "
                f"({self.profile_step_end})"
            )
        if self.moe_token_distribution_logging_interval < 1:
            raise ValueError("--moe-token-distribution-logging-interval must be >= 1")


@dataclass(frozen=True)
class DeviceConfig:
    """Device and execution mode. The HPU fused-kernel switches live in `model.kernels`."""

    device: str = "auto"  # auto | hpu | cuda | cpu
    # HPU lazy mode. None: decided at start-up from PT_HPU_LAZY_MODE (what the launcher exports
    # from HL_USE_LAZY_MODE); True/False: what --use-lazy-mode asserts.
    lazy_mode: Optional[bool] = None
    use_torch_compile: bool = False
    use_torch_compiled_autograd: bool = False

    @classmethod
    def from_flags(cls, v: Mapping[str, Any]) -> "DeviceConfig":
        return cls(device=v["device"], lazy_mode=v["use_lazy_mode"], use_torch_compile=v["use_torch_compile"],
                   use_torch_compiled_autograd=v["use_torch_compiled_autograd"])

    def __post_init__(self) -> None:
        if self.lazy_mode and self.device in ("cpu", "cuda"):
            raise ValueError(f"--use-lazy-mode 1 is HPU only, but --device is {self.device}")
        if self.lazy_mode and self.use_torch_compile:
            raise ValueError("HPU lazy mode and --use-torch-compile cannot be combined: set --use-lazy-mode 0 (HL_USE_LAZY_MODE=0)")
        if self.use_torch_compiled_autograd and not self.use_torch_compile:
            raise ValueError("--use-torch-compiled-autograd needs --use-torch-compile 1")
