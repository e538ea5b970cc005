"""Command line -> validated RunConfig, before any process group exists.

    run = parse_args(sys.argv[1:], world_size=int(os.environ["WORLD_SIZE"]))   # in the entry point

`parse_args` reads Megatron-LM's flags (see arguments_parser.build_parser), applies
--model-preset (flags given explicitly override the preset's fields), maps everything into the
frozen dataclasses of megatron.training.config and validates the whole run
(arguments_validation). Every problem is a ValueError with one line naming the flag(s) to
change; unknown flags are an ArgumentsError (a ValueError) carrying argparse's message.

The world size is passed in: this module never reads the environment, so it is equally usable
by the launcher (to check a job before submitting it), by tests and by the training script.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.core.parallel_state import ParallelConfig, RankGrid
from megatron.training import config_adapters as adapters
from megatron.training.arguments_model import (
    MOE_SHAPE_FIELDS,
    SHAPE_FIELDS,
    flags_from_model_config,
    model_config_from_flags,
)
from megatron.training.arguments_parser import COMPAT_FLAGS, ArgumentsError, build_parser
from megatron.training.arguments_validation import validate_run_config
from megatron.training.config import (
    CheckpointConfig,
    DataConfig,
    DeviceConfig,
    DistributedConfig,
    LoggingConfig,
    OptimizerConfig,
    RunConfig,
    SchedulerConfig,
    TrainingConfig,
    flatten_dataclass,
    from_flat_dict,
)

__all__ = ["ArgumentsError", "COMPAT_FLAGS", "apply_checkpoint_args", "build_parser", "parse_args", "validate_run_config"]

_UNSET = object()


def _parse(argv: Sequence[str]) -> Tuple[Dict[str, Any], Set[str]]:
    """Parsed values with Megatron's defaults filled in, and the dests given on the command line.

    Knowing what was explicit lets a preset supply only what the user did not set, and lets an
    implied architecture default (e.g. LayerNorm) be ignored while an explicit one is rejected.
    """
    parser = build_parser()
    defaults: Dict[str, Any] = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help"):
            continue
        defaults.setdefault(action.dest, action.default)
        action.default = _UNSET
    namespace = parser.parse_args(list(argv))
    values = vars(namespace)
    explicit = {k for k, v in values.items() if v is not _UNSET}
    return {k: (defaults[k] if v is _UNSET else v) for k, v in values.items()}, explicit


def parse_args(argv: Optional[Sequence[str]], world_size: int, check_paths: bool = True) -> RunConfig:
    """Parse, resolve and validate a command line for `world_size` ranks.

    check_paths=False skips the file-system checks (tokenizer files, data prefixes, save dir),
    e.g. to validate a job on a machine that does not see the cluster's file systems.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    values, explicit = _parse(sys.argv[1:] if argv is None else argv)
    preset: Optional[DeepSeekConfig] = None
    if values["model_preset"] is not None:
        preset = adapters.load_preset(values["model_preset"])
        for key, value in flags_from_model_config(preset).items():
            if key not in explicit:
                values[key] = value
    notes: List[str] = []
    run = _resolve(values, explicit, world_size, preset, notes)
    validate_run_config(run, check_paths=check_paths)
    return run


def _resolve(
    v: Dict[str, Any], explicit: Set[str], world_size: int, preset: Optional[DeepSeekConfig], notes: List[str]
) -> RunConfig:
    if v["seq_length"] is None:
        raise ValueError("--seq-length is required")
    if v["context_parallel_size"] != 1:
        raise ValueError("--context-parallel-size must be 1: context parallelism is not implemented")
    tp = v["tensor_model_parallel_size"]
    sequence_parallel = v["sequence_parallel"]
    if sequence_parallel and tp == 1:
        sequence_parallel = False
        notes.append("--sequence-parallel turned off: it needs --tensor-model-parallel-size > 1 (as in Megatron)")
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=v["pipeline_model_parallel_size"],
        expert_model_parallel_size=v["expert_model_parallel_size"],
        expert_tensor_parallel_size=v["expert_tensor_parallel_size"],
        sequence_parallel=sequence_parallel,
    )
    grid = RankGrid.from_config(parallel, world_size)
    tokenizer = adapters.make_tokenizer_config(
        tokenizer_type=v["tokenizer_type"],
        tokenizer_model=v["tokenizer_model"],
        vocab_file=v["vocab_file"],
        merge_file=v["merge_file"],
        vocab_size=v["vocab_size"],
        extra_vocab_size=v["extra_vocab_size"],
        make_vocab_size_divisible_by=v["make_vocab_size_divisible_by"],
        tensor_model_parallel_size=tp,
    )
    model = model_config_from_flags(v, explicit, preset, _provisional_vocab(v, preset, tp), notes)
    training = _training(v, grid.dp, notes)
    return RunConfig(
        model=model,
        parallel=parallel,
        distributed=DistributedConfig(
            world_size=world_size,
            data_parallel_size=grid.dp,
            decoder_first_pipeline_num_layers=v["decoder_first_pipeline_num_layers"],
            decoder_last_pipeline_num_layers=v["decoder_last_pipeline_num_layers"],
            distributed_timeout_minutes=v["distributed_timeout_minutes"],
            moe_token_dispatcher_type=v["moe_token_dispatcher_type"],
            moe_shared_expert_overlap=v["moe_shared_expert_overlap"],
        ),
        tokenizer=tokenizer,
        data=_data(v, notes),
        training=training,
        optimizer=OptimizerConfig(**_pick(v, OptimizerConfig)),
        scheduler=_scheduler(v, training),
        checkpoint=CheckpointConfig(**_pick(v, CheckpointConfig)),
        logging=LoggingConfig(**{**_pick(v, LoggingConfig), "profile_ranks": tuple(v["profile_ranks"])}),
        device=DeviceConfig(
            device=v["device"],
            lazy_mode=v["use_lazy_mode"],
            use_torch_compile=v["use_torch_compile"],
            use_torch_compiled_autograd=v["use_torch_compiled_autograd"],
        ),
        model_preset=v["model_preset"],
        vocab_size_final=False,
        notes=tuple(notes),
    )


def _pick(v: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    """The flag values whose dest equals a field name of `cls`."""
    return {f.name: v[f.name] for f in dataclasses.fields(cls)}


def _provisional_vocab(v: Mapping[str, Any], preset: Optional[DeepSeekConfig], tp: int) -> int:
    """Embedding rows until the tokenizer is built (config_adapters.finalize_vocab_size)."""
    if v["vocab_size"] is not None and v["vocab_size"] >= 1:
        # NullTokenizer: --vocab-size ids plus the eod id, padded as Megatron pads.
        return adapters.padded_vocab_size(v["vocab_size"] + 1, max(v["make_vocab_size_divisible_by"], 1), tp)
    if preset is not None:
        return preset.vocab_size
    return DeepSeekConfig.__dataclass_fields__["vocab_size"].default


def _data(v: Mapping[str, Any], notes: List[str]) -> DataConfig:
    split = v["split"]
    if v["data_path"] and split is None:
        split = adapters.DEFAULT_SPLIT
        notes.append(f"--split not given: using Megatron's legacy default '{split}'")
    return DataConfig(
        seq_length=v["seq_length"],
        data_path=tuple(v["data_path"] or ()),
        split=split,
        train_data_path=tuple(v["train_data_path"] or ()),
        valid_data_path=tuple(v["valid_data_path"] or ()),
        test_data_path=tuple(v["test_data_path"] or ()),
        data_cache_path=v["data_cache_path"],
        mock_data=v["mock_data"],
        num_workers=v["num_workers"],
        reset_position_ids=v["reset_position_ids"],
        reset_attention_mask=v["reset_attention_mask"],
        eod_mask_loss=v["eod_mask_loss"],
        mmap_bin_files=v["mmap_bin_files"],
    )


def _training(v: Mapping[str, Any], dp: int, notes: List[str]) -> TrainingConfig:
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
    granularity, modules = v["recompute_granularity"], list(v["recompute_modules"] or [])
    if v["recompute_activations"] and granularity is None:
        granularity = "selective"
    if v["moe_layer_recompute"]:  # deprecated spelling of --recompute-granularity selective --recompute-modules moe
        granularity = granularity or "selective"
        modules += [] if "moe" in modules else ["moe"]
    if granularity == "selective" and not modules:
        modules = ["core_attn"]  # Megatron's default selective recompute
    if v["skip_nan_loss"] and not v["check_for_nan_in_loss_and_grad"]:
        raise ValueError("--skip-nan-loss needs the NaN check: drop --no-check-for-nan-in-loss-and-grad")
    return TrainingConfig(
        micro_batch_size=mbs,
        global_batch_size=gbs,
        train_iters=train_iters,
        train_samples=samples,
        exit_interval=v["exit_interval"] or None,  # Megatron treats 0 as "never"
        exit_duration_in_mins=v["exit_duration_in_mins"],
        exit_signal_handler=v["exit_signal_handler"],
        kill_switch_file=v["kill_switch_file"],
        eval_interval=v["eval_interval"],
        eval_iters=v["eval_iters"],
        skip_train=v["skip_train"],
        seed=v["seed"],
        bf16=v["bf16"],
        accumulate_allreduce_grads_in_fp32=v["accumulate_allreduce_grads_in_fp32"],
        check_for_nan_in_loss_and_grad=v["check_for_nan_in_loss_and_grad"],
        skip_nan_loss=v["skip_nan_loss"],
        iterations_to_skip=tuple(v["iterations_to_skip"]),
        recompute_granularity=granularity,
        recompute_method=v["recompute_method"],
        recompute_num_layers=v["recompute_num_layers"],
        recompute_modules=tuple(modules),
        attention_dropout=v["attention_dropout"],
        hidden_dropout=v["hidden_dropout"],
        deterministic_mode=v["deterministic_mode"],
    )


def _scheduler(v: Mapping[str, Any], t: TrainingConfig) -> SchedulerConfig:
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
    return SchedulerConfig(
        lr=v["lr"],
        min_lr=v["min_lr"],
        lr_decay_style=v["lr_decay_style"],
        lr_decay_iters=decay,
        lr_warmup_iters=warmup,
        lr_warmup_fraction=fraction,
        lr_warmup_init=v["lr_warmup_init"],
        lr_wsd_decay_style=v["lr_wsd_decay_style"],
        lr_wsd_decay_iters=wsd,
        override_opt_param_scheduler=v["override_opt_param_scheduler"],
        use_checkpoint_opt_param_scheduler=v["use_checkpoint_opt_param_scheduler"],
    )


def apply_checkpoint_args(run: RunConfig, saved: Mapping[str, Any], check_paths: bool = False) -> RunConfig:
    """--use-checkpoint-args: `run` with the checkpoint's model (and tokenizer) arguments.

    `saved` is the checkpoint's `to_flat_dict`. Fields the weights pin down (sizes, MLA, RoPE,
    routing shape; see arguments_model.SHAPE_FIELDS) come from the checkpoint; training choices
    in the model config (loss coefficients, capacity, bias update rate, kernels, dtype, init)
    stay as given on the command line. With --use-mp-args-from-checkpoint-args the parallel
    sizes come from the checkpoint too. Differences are listed in `notes`; the result is
    validated again (e.g. the checkpoint's expert count against this run's EP size).
    """
    old = from_flat_dict(saved, strict=False)
    notes = list(run.notes)
    moe = dataclasses.replace(run.model.moe, **{f: getattr(old.model.moe, f) for f in MOE_SHAPE_FIELDS})
    mtp = dataclasses.replace(run.model.mtp, num_layers=old.model.mtp.num_layers)
    model = dataclasses.replace(run.model, moe=moe, mtp=mtp, **{f: getattr(old.model, f) for f in SHAPE_FIELDS})
    _note_changes("model", run.model, model, notes)
    tokenizer = run.tokenizer
    if run.checkpoint.use_tokenizer_model_from_checkpoint_args:
        tokenizer = dataclasses.replace(old.tokenizer, tensor_model_parallel_size=run.parallel.tensor_model_parallel_size)
        _note_changes("tokenizer", run.tokenizer, tokenizer, notes)
    parallel, distributed = run.parallel, run.distributed
    if run.checkpoint.use_mp_args_from_checkpoint_args:
        parallel = old.parallel
        if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
            parallel = dataclasses.replace(parallel, sequence_parallel=False)
        grid = RankGrid.from_config(parallel, run.distributed.world_size)
        distributed = dataclasses.replace(
            run.distributed,
            data_parallel_size=grid.dp,
            decoder_first_pipeline_num_layers=old.distributed.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=old.distributed.decoder_last_pipeline_num_layers,
        )
        tokenizer = dataclasses.replace(tokenizer, tensor_model_parallel_size=parallel.tensor_model_parallel_size)
        _note_changes("parallel", run.parallel, parallel, notes)
    merged = dataclasses.replace(
        run, model=model, tokenizer=tokenizer, parallel=parallel, distributed=distributed,
        vocab_size_final=True, notes=tuple(notes),
    )
    validate_run_config(merged, check_paths=check_paths)
    return merged


def _note_changes(section: str, before: Any, after: Any, notes: List[str]) -> None:
    a = flatten_dataclass(before, section + ".")
    b = flatten_dataclass(after, section + ".")
    for key in sorted(a):
        if a[key] != b.get(key):
            notes.append(f"{key}: {a[key]!r} -> {b.get(key)!r} from the checkpoint")
