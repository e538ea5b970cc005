"""Checks on a resolved RunConfig that can run before any process group exists.

Everything here is arithmetic on the configuration plus a few file-system lookups
(`check_paths`): a bad layout, batch size, schedule or path fails on the login node with one
line naming the flags to change, instead of after the cluster job has started. Runs again after
--use-checkpoint-args replaced the model, so it takes a RunConfig rather than argparse output.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron.core.parallel_state import RankGrid, validate_layout_for_model
from megatron.training import config_adapters as adapters
from megatron.training.config import RunConfig, pipeline_stage_layers


def validate_run_config(run: RunConfig, check_paths: bool = True) -> None:
    """Raise ValueError (one line, naming the flags) for the first problem found."""
    _layout(run)
    _sequence(run)
    _moe_runtime(run)
    _batches(run)
    _schedule(run)
    _recompute(run)
    _optimizer(run)
    _checkpoint(run, check_paths)
    _data(run, check_paths)
    _tokenizer(run, check_paths)
    _logging(run)
    _device(run)


def _layout(run: RunConfig) -> None:
    grid = RankGrid.from_config(run.parallel, run.distributed.world_size)
    m = run.model
    validate_layout_for_model(grid, m.num_layers, m.moe.num_experts, m.mla.num_heads)
    d = run.distributed
    pipeline_stage_layers(m.num_layers, grid.pp, d.decoder_first_pipeline_num_layers, d.decoder_last_pipeline_num_layers)
    if m.ffn_hidden_size % grid.tp:
        raise ValueError(f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({grid.tp})")
    if m.moe.ffn_hidden_size % grid.etp:
        raise ValueError(
            f"--moe-ffn-hidden-size ({m.moe.ffn_hidden_size}) must be divisible by the expert tensor-parallel size "
            f"({grid.etp}); change --expert-tensor-parallel-size"
        )
    if d.distributed_timeout_minutes < 1:
        raise ValueError(f"--distributed-timeout-minutes must be >= 1, got {d.distributed_timeout_minutes}")


def _sequence(run: RunConfig) -> None:
    seq, m, tp = run.data.seq_length, run.model, run.parallel.tensor_model_parallel_size
    if seq < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq}")
    if seq > m.max_position_embeddings:
        raise ValueError(f"--seq-length ({seq}) exceeds --max-position-embeddings ({m.max_position_embeddings})")
    rope = m.rope
    if rope.scaling_type == "yarn" and seq > rope.original_max_position_embeddings * rope.factor:
        raise ValueError(
            f"--seq-length ({seq}) exceeds what YaRN covers: --original-max-position-embeddings "
            f"({rope.original_max_position_embeddings}) x --rotary-scaling-factor ({rope.factor:g})"
        )
    if run.parallel.sequence_parallel and seq % tp:
        raise ValueError(f"--sequence-parallel splits the sequence over TP: --seq-length ({seq}) must be divisible by {tp}")


def _moe_runtime(run: RunConfig) -> None:
    moe, dispatcher = run.model.moe, run.distributed.moe_token_dispatcher_type
    if moe.capacity_factor is not None and dispatcher != "alltoall":
        raise ValueError(
            "--moe-expert-capacity-factor (token dropping/padding) needs --moe-token-dispatcher-type alltoall: "
            "capacity is applied where the alltoall dispatcher permutes tokens per expert; the allgather "
            "dispatcher has no such step (Megatron rejects this combination too)"
        )
    if run.distributed.moe_shared_expert_overlap and dispatcher != "alltoall":
        raise ValueError("--moe-shared-expert-overlap overlaps with the all-to-all: it needs --moe-token-dispatcher-type alltoall")


def _batches(run: RunConfig) -> None:
    t, dp = run.training, run.data_parallel_size
    if t.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {t.micro_batch_size}")
    if t.global_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size ({t.global_batch_size}) must be a positive multiple of --micro-batch-size "
            f"({t.micro_batch_size}) x data-parallel size ({dp} = world size / (TP x PP))"
        )
    if not t.skip_train and (t.train_iters is None or t.train_iters < 1):
        raise ValueError("set --train-iters (or --train-samples of at least one global batch)")
    if t.exit_interval is not None and t.exit_interval < 0:
        raise ValueError(f"--exit-interval must be >= 0, got {t.exit_interval}")
    if t.eval_interval < 1 or t.eval_iters < 0:
        raise ValueError(f"--eval-interval must be >= 1 and --eval-iters >= 0, got {t.eval_interval} and {t.eval_iters}")
    if not 0 <= t.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {t.seed}")


def _schedule(run: RunConfig) -> None:
    s, t = run.scheduler, run.training
    if s.lr is None:
        if not t.skip_train:
            raise ValueError("--lr is required")
        return
    if s.lr < 0 or s.min_lr < 0:
        raise ValueError(f"--lr and --min-lr must be >= 0, got {s.lr} and {s.min_lr}")
    if s.min_lr > s.lr:
        raise ValueError(f"--min-lr ({s.min_lr}) must not exceed --lr ({s.lr})")
    if s.lr_decay_iters is not None and s.lr_decay_iters < 1:
        raise ValueError(f"--lr-decay-iters must be >= 1, got {s.lr_decay_iters}")
    if s.lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be >= 0, got {s.lr_warmup_iters}")
    if s.lr_decay_iters is not None and s.lr_warmup_iters >= s.lr_decay_iters:
        raise ValueError(
            f"LR warmup ({s.lr_warmup_iters} iterations) must be shorter than the decay ({s.lr_decay_iters}); "
            "change --lr-warmup-iters/--lr-warmup-fraction or --lr-decay-iters"
        )
    if s.lr_decay_style == "WSD":
        if s.lr_wsd_decay_iters is None:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final decay)")
        room = (s.lr_decay_iters or 0) - s.lr_warmup_iters
        if not 0 < s.lr_wsd_decay_iters <= room:
            raise ValueError(
                f"--lr-wsd-decay-iters ({s.lr_wsd_decay_iters}) must be in [1, decay iterations - warmup = {room}]"
            )


def _recompute(run: RunConfig) -> None:
    t = run.training
    if t.recompute_granularity == "full":
        if t.recompute_method is None or not t.recompute_num_layers or t.recompute_num_layers < 1:
            raise ValueError(
                "--recompute-granularity full needs --recompute-method (uniform|block) and --recompute-num-layers >= 1"
            )
        if t.recompute_modules:
            raise ValueError("--recompute-modules applies to --recompute-granularity selective only")
    elif t.recompute_method is not None or t.recompute_num_layers is not None:
        raise ValueError("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only")
    elif t.recompute_modules and t.recompute_granularity != "selective":
        raise ValueError("--recompute-modules needs --recompute-granularity selective")


def _optimizer(run: RunConfig) -> None:
    o = run.optimizer
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1):
        raise ValueError(f"--adam-beta1/--adam-beta2 must be in [0, 1), got {o.adam_beta1} and {o.adam_beta2}")
    if o.adam_eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        raise ValueError(
            f"--adam-eps must be > 0, --weight-decay and --clip-grad >= 0; got {o.adam_eps}, {o.weight_decay}, {o.clip_grad}"
        )
    if o.overlap_param_gather and not (o.use_distributed_optimizer and o.overlap_grad_reduce):
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_output_dir(flag: str, path: Optional[str]) -> None:
    """`path` is, or can be created as, a writable directory (nothing is created here)."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a directory")
    base = _nearest_existing(path)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} cannot be written ({base!r} is not a writable directory)")


def _checkpoint(run: RunConfig, check_paths: bool) -> None:
    c = run.checkpoint
    if c.ckpt_format != "torch_dist":
        raise ValueError(f"--ckpt-format {c.ckpt_format}: only torch_dist (Megatron's distributed checkpoint) is supported")
    if c.save is not None and (c.save_interval is None or c.save_interval < 1):
        raise ValueError("--save needs --save-interval >= 1")
    if c.save is None and c.verify_checkpoint:
        raise ValueError("--verify-checkpoint checks saved checkpoints: it needs --save")
    if c.load is None:
        for flag, on in (("--use-checkpoint-args", c.use_checkpoint_args), ("--finetune", c.finetune),
                         ("--exit-on-missing-checkpoint", c.exit_on_missing_checkpoint)):
            if on:
                raise ValueError(f"{flag} needs --load")
    if not check_paths:
        return
    _check_output_dir("--save", c.save)
    if c.load is not None:
        if os.path.exists(c.load) and not os.path.isdir(c.load):
            raise ValueError(f"--load {c.load!r} is not a directory")
        if c.exit_on_missing_checkpoint and not os.path.isdir(c.load):
            raise ValueError(f"--load {c.load!r} does not exist and --exit-on-missing-checkpoint is set")


def _data(run: RunConfig, check_paths: bool) -> None:
    d = run.data
    split_paths = d.train_data_path or d.valid_data_path or d.test_data_path
    sources = [name for name, on in (("--mock-data", d.mock_data), ("--data-path", bool(d.data_path)),
                                     ("--train/valid/test-data-path", bool(split_paths))) if on]
    if not sources:
        raise ValueError("no training data: pass --data-path (or --train-data-path ...) or --mock-data")
    if len(sources) > 1:
        raise ValueError(f"use one data source, got {' and '.join(sources)}")
    if d.split is not None:
        adapters.check_split(d.split)
    if split_paths and not d.train_data_path and not run.training.skip_train:
        raise ValueError("--valid/--test-data-path without --train-data-path: nothing to train on")
    if d.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {d.num_workers}")
    for flag, values in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                         ("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        if not values:
            continue
        blend = adapters.parse_blend(values)
        for _, prefix in blend:
            if check_paths and not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                raise ValueError(f"{flag} prefix {prefix!r}: {prefix}.bin / {prefix}.idx not found")
    if check_paths:
        for flag, path in (("--data-cache-path", d.data_cache_path), ("--tensorboard-dir", run.logging.tensorboard_dir)):
            if path is not None and os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r} exists and is not a directory")


def _tokenizer(run: RunConfig, check_paths: bool) -> None:
    tok = run.tokenizer
    if tok.tokenizer_type is None:
        raise ValueError(f"--tokenizer-type is required; choose one of {', '.join(adapters.tokenizer_types())}")
    if tok.make_vocab_size_divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {tok.make_vocab_size_divisible_by}")
    if tok.extra_vocab_size < 0:
        raise ValueError(f"--extra-vocab-size must be >= 0, got {tok.extra_vocab_size}")
    if tok.tokenizer_type == "NullTokenizer" and (tok.vocab_size is None or tok.vocab_size < 1):
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size >= 1")
    for field, flag, kind in adapters.tokenizer_file_requirements(tok.tokenizer_type):
        path = getattr(tok, field)
        if not path:
            raise ValueError(f"--tokenizer-type {tok.tokenizer_type} needs {flag}")
        if not check_paths:
            continue
        ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
        if not ok:
            what = "an existing directory" if kind == "dir" else "an existing file"
            raise ValueError(f"{flag} {path!r} for {tok.tokenizer_type} must be {what}")


def _logging(run: RunConfig) -> None:
    lg, world = run.logging, run.distributed.world_size
    if lg.log_interval < 1 or lg.tensorboard_log_interval < 1:
        raise ValueError("--log-interval and --tensorboard-log-interval must be >= 1")
    if lg.profile or lg.profile_type is not None:
        if not 0 <= lg.profile_step_start < lg.profile_step_end:
            raise ValueError(
                f"profiling needs 0 <= --profile-step-start ({lg.profile_step_start}) < --profile-step-end ({lg.profile_step_end})"
            )
        bad = [r for r in lg.profile_ranks if not 0 <= r < world]
        if bad:
            raise ValueError(f"--profile-ranks {bad} are outside the {world} ranks")
    if lg.moe_token_distribution_logging_interval < 1:
        raise ValueError("--moe-token-distribution-logging-interval must be >= 1")


def _device(run: RunConfig) -> None:
    dev = run.device
    if dev.lazy_mode and dev.device in ("cpu", "cuda"):
        raise ValueError(f"--use-lazy-mode 1 is HPU only, but --device is {dev.device}")
    if dev.lazy_mode and dev.use_torch_compile:
        raise ValueError("HPU lazy mode and --use-torch-compile cannot be combined: set --use-lazy-mode 0 (HL_USE_LAZY_MODE=0)")
    if dev.use_torch_compiled_autograd and not dev.use_torch_compile:
        raise ValueError("--use-torch-compiled-autograd needs --use-torch-compile 1")
