"""Command line -> validated RunConfig, before any process group exists.

    run = parse_args(sys.argv[1:], world_size=int(os.environ["WORLD_SIZE"]))   # in the entry point

The route, in reading order: `arguments_parser.build_parser` reads Megatron-LM's flags
(remembering which were given explicitly); `--model-preset` fills in the model flags the user did
not give; each section of the run is built from the flags by its own dataclass, which validates
itself (config/sections.py, config/model_flags.py for the model, config/tokenizer_flags.py);
`RunConfig` checks what needs two sections; `config/paths.py` checks the file system. Every
problem is a ValueError with one line naming the flag(s) to change; unknown flags are an
ArgumentsError (a ValueError) carrying argparse's message.

The world size is passed in: this module never reads the environment, so it is equally usable
by the launcher (to check a job before submitting it), by tests and by the training script.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.core.models.deepseek.presets import get_preset
from megatron.core.parallel_state import ParallelConfig, RankGrid
from megatron.training.arguments_parser import COMPAT_FLAGS, ArgumentsError, build_parser, compat_dest
from megatron.training.config.flat import flatten_dataclass, from_flat_dict
from megatron.training.config.model_flags import (
    MOE_SHAPE_FIELDS,
    SHAPE_FIELDS,
    flags_from_model_config,
    model_config_from_flags,
    shape_flag_dests,
)
from megatron.training.config.paths import check_run_paths
from megatron.training.config.run import RunConfig
from megatron.training.config.sections import (
    CheckpointConfig,
    DataConfig,
    DeviceConfig,
    DistributedConfig,
    LoggingConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)
from megatron.training.config.tokenizer_flags import tokenizer_config_from_flags

__all__ = ["ArgumentsError", "COMPAT_FLAGS", "apply_checkpoint_args", "build_parser", "parse_args"]

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
    v, explicit = _parse(sys.argv[1:] if argv is None else argv)
    preset: Optional[DeepSeekConfig] = None
    if v["model_preset"] is not None:
        preset = get_preset(v["model_preset"])
        for key, value in flags_from_model_config(preset).items():
            if key not in explicit:
                v[key] = value
    notes = _compat_notes(explicit)
    _static_moe_for_lazy_mode(v, explicit, notes)
    _dispatcher_for_wide_expert_parallelism(v, explicit, notes)
    parallel = _parallel_config(v, notes)
    grid = RankGrid.from_config(parallel, world_size)
    model = model_config_from_flags(v, explicit, preset, _provisional_vocab(v, preset), notes)
    training = TrainingConfig.from_flags(v, grid.dp, notes)
    run = RunConfig(
        model=model,
        parallel=parallel,
        distributed=DistributedConfig(world_size=world_size, data_parallel_size=grid.dp, **_pick(v, DistributedConfig)),
        tokenizer=tokenizer_config_from_flags(v),
        data=DataConfig.from_flags(v, notes),
        training=training,
        optimizer=OptimizerConfig.from_flags(v),
        scheduler=SchedulerConfig.from_flags(v, training),
        checkpoint=CheckpointConfig.from_flags(v),
        logging=LoggingConfig.from_flags(v),
        device=DeviceConfig.from_flags(v),
        model_preset=v["model_preset"],
        explicit_flags=tuple(sorted(explicit)),
        notes=tuple(notes),
    )
    if check_paths:
        check_run_paths(run)
    return run


def _pick(v: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    skip = {"world_size", "data_parallel_size"}
    return {f.name: v[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def _compat_notes(explicit: Set[str]) -> List[str]:
    """A note for every accepted flag that has no effect here, so none is ignored silently."""
    return [f"{flag} has no effect here: {why}" for flag, _, why in COMPAT_FLAGS if compat_dest(flag) in explicit]


def _static_moe_for_lazy_mode(v: Dict[str, Any], explicit: Set[str], notes: List[str]) -> None:
    """HPU lazy mode compiles one graph per distinct set of tensor shapes; dropless MoE sizes depend
    on the routing, so every step would recompile. Under --use-lazy-mode 1, MoE therefore defaults
    to token drop with capacity padding over the all-to-all dispatcher (static shapes), unless the
    user chose the MoE shape flags; a dropless choice is then named in a note."""
    if not v["use_lazy_mode"]:
        return
    shape_flags = {"moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_token_dispatcher_type"}
    if not shape_flags & explicit:
        v.update(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True, moe_token_dispatcher_type="alltoall")
        notes.append("HPU lazy mode: MoE uses static shapes (--moe-expert-capacity-factor 1.0 "
                     "--moe-pad-expert-input-to-capacity --moe-token-dispatcher-type alltoall); set them to choose otherwise")
    elif v["moe_expert_capacity_factor"] is None or not v["moe_pad_expert_input_to_capacity"]:
        notes.append("HPU lazy mode with dropless or unpadded MoE: expert batch sizes depend on the routing, so graphs "
                     "recompile as routing changes; --moe-expert-capacity-factor with --moe-pad-expert-input-to-capacity "
                     "(and alltoall) keeps shapes static")


def _dispatcher_for_wide_expert_parallelism(v: Dict[str, Any], explicit: Set[str], notes: List[str]) -> None:
    """The all-gather dispatcher holds EP x tokens x min(top-k, local experts) rows per rank (every
    rank's tokens); beyond EP 2 that outgrows the all-to-all's tokens x top-k. Megatron's default
    (allgather) therefore becomes alltoall there, unless the user chose a dispatcher."""
    if v["expert_model_parallel_size"] > 2 and "moe_token_dispatcher_type" not in explicit:
        if v["moe_token_dispatcher_type"] != "alltoall":
            v["moe_token_dispatcher_type"] = "alltoall"
            notes.append(f"--expert-model-parallel-size {v['expert_model_parallel_size']}: the all-to-all token "
                         "dispatcher is used (the all-gather one would hold every rank's tokens); set "
                         "--moe-token-dispatcher-type to choose")


def _parallel_config(v: Mapping[str, Any], notes: List[str]) -> ParallelConfig:
    if v["context_parallel_size"] != 1:
        raise ValueError("--context-parallel-size must be 1: context parallelism is not implemented")
    tp, sequence_parallel = v["tensor_model_parallel_size"], v["sequence_parallel"]
    if sequence_parallel and tp == 1:
        sequence_parallel = False
        notes.append("--sequence-parallel turned off: it needs --tensor-model-parallel-size > 1 (as in Megatron)")
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=v["pipeline_model_parallel_size"],
        expert_model_parallel_size=v["expert_model_parallel_size"],
        expert_tensor_parallel_size=v["expert_tensor_parallel_size"],
        sequence_parallel=sequence_parallel,
    )


def _provisional_vocab(v: Mapping[str, Any], preset: Optional[DeepSeekConfig]) -> int:
    """The model's vocabulary until the tokenizer is built (`RunConfig.with_tokenizer_vocab`)."""
    if v["vocab_size"] is not None and v["vocab_size"] >= 1:
        return v["vocab_size"] + 1  # NullTokenizer: --vocab-size ids plus the eod id
    if preset is not None:
        return preset.vocab_size
    return DeepSeekConfig.__dataclass_fields__["vocab_size"].default


# ---- --use-checkpoint-args ------------------------------------------------------------------------
def apply_checkpoint_args(run: RunConfig, saved: Mapping[str, Any], check_paths: bool = False) -> RunConfig:
    """--use-checkpoint-args: `run` with the checkpoint's model (and tokenizer) arguments.

    `saved` is the checkpoint's `to_flat_dict`. Fields the weights pin down (sizes, MLA, RoPE,
    routing shape; see model_flags.SHAPE_FIELDS) come from the checkpoint; training choices in the
    model config (loss coefficients, capacity, bias update rate, kernels, dtype, init) stay as
    given on the command line. A value the user gave EXPLICITLY that differs from the checkpoint's
    is an error listing every such difference, unless --override-explicit-args-from-checkpoint
    lets the checkpoint win (Megatron's behaviour; then each difference is a note). With
    --use-mp-args-from-checkpoint-args the parallel sizes come from the checkpoint too. The result
    is validated again (e.g. the checkpoint's expert count against this run's EP size).
    """
    old = from_flat_dict(saved, strict=False)
    notes = list(run.notes)
    moe = dataclasses.replace(run.model.moe, **{f: getattr(old.model.moe, f) for f in MOE_SHAPE_FIELDS})
    mtp = dataclasses.replace(run.model.mtp, num_layers=old.model.mtp.num_layers)
    model = dataclasses.replace(run.model, moe=moe, mtp=mtp, **{f: getattr(old.model, f) for f in SHAPE_FIELDS})
    _check_explicit_differences(run, model)
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
    if check_paths:
        check_run_paths(merged)
    return merged


def _check_explicit_differences(run: RunConfig, model: DeepSeekConfig) -> None:
    before = flatten_dataclass(run.model, "model.")
    after = flatten_dataclass(model, "model.")
    explicit = set(run.explicit_flags)
    differences = []
    for key, dest in shape_flag_dests().items():
        if dest in explicit and key in before and before[key] != after[key]:
            differences.append(f"--{dest.replace('_', '-')} {before[key]!r} (checkpoint: {after[key]!r})")
    if differences and not run.checkpoint.override_explicit_args_from_checkpoint:
        raise ValueError(
            "--use-checkpoint-args: the checkpoint in --load was trained with other values than given explicitly: "
            + "; ".join(differences)
            + ". Drop those flags, or pass --override-explicit-args-from-checkpoint to use the checkpoint's"
        )


def _note_changes(section: str, before: Any, after: Any, notes: List[str]) -> None:
    a = flatten_dataclass(before, section + ".")
    b = flatten_dataclass(after, section + ".")
    for key in sorted(a):
        if a[key] != b.get(key):
            notes.append(f"{key}: {a[key]!r} -> {b.get(key)!r} from the checkpoint")
