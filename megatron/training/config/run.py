"""One training run's configuration, fully resolved: what `arguments.parse_args` returns.

Everything a run needs after parsing lives in `RunConfig`: the model (`DeepSeekConfig`), the
parallel layout (`ParallelConfig` + `DistributedConfig`), the tokenizer (`TokenizerConfig`),
data, training loop, optimizer, LR schedule, checkpointing, logging and device. Later stages
receive these objects instead of a global `args`, so what a module reads is visible in its
signature and a config cannot change behind its back (all dataclasses are frozen). Each section
validates itself when built; `RunConfig` adds the checks that need two sections, so a bad
layout, batch size or MoE setting fails on the login node, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.core.parallel_state import ParallelConfig, RankGrid, validate_layout_for_model
from megatron.core.pipeline_parallel import format_stage_map, stage_layer_ranges
from megatron.training.config.flat import FLAT_FORMAT, to_flat_dict
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

if typing.TYPE_CHECKING:  # imported lazily at run time: the tokenizer package pulls in its backends
    from megatron.training.tokenizer import TokenizerConfig


@dataclass(frozen=True)
class RunConfig:
    """One training run, fully resolved and validated (see arguments.parse_args).

    `model.vocab_size` is provisional until the tokenizer is known (`vocab_size_final` False):
    `with_tokenizer_vocab(tokenizer.vocab_size)` fixes it before the model is built.
    `explicit_flags` are the parser dests the user gave on the command line (a preset or a
    checkpoint may fill in the others).
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
    explicit_flags: Tuple[str, ...] = ()
    # Adjustments and warnings made while resolving flags (printed at start-up).
    notes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_layout()
        self._check_sequence()
        self._check_moe()
        self._check_batches()
        self._check_data()
        if self.device.use_torch_compiled_autograd and self.optimizer.overlap_grad_reduce:
            raise ValueError("--use-torch-compiled-autograd cannot capture DDP's overlapped gradient reduction "
                             "(its hooks launch collectives): drop --overlap-grad-reduce")
        bad = [r for r in self.logging.profile_ranks if not 0 <= r < self.distributed.world_size]
        if (self.logging.profile or self.logging.profile_type is not None) and bad:
            raise ValueError(f"--profile-ranks {bad} are outside the {self.distributed.world_size} ranks")

    # ---- derived values ----------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return self.distributed.data_parallel_size

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per iteration and data-parallel rank (gradient accumulation steps)."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    @property
    def stage_layer_ranges(self) -> List[Tuple[int, int]]:
        """[start, end) global decoder layers of every pipeline stage."""
        d = self.distributed
        return stage_layer_ranges(self.model.num_layers, self.parallel.pipeline_model_parallel_size,
                                  d.decoder_first_pipeline_num_layers, d.decoder_last_pipeline_num_layers)

    @property
    def stage_layers(self) -> Tuple[int, ...]:
        """Decoder layers on each pipeline stage."""
        return tuple(end - start for start, end in self.stage_layer_ranges)

    def stage_map(self) -> str:
        """Which layers (dense / MoE / MTP) each pipeline stage holds, one line per stage."""
        return format_stage_map(self.stage_layer_ranges, self.model.is_moe_layer, self.model.mtp.num_layers)

    def with_tokenizer_vocab(self, tokenizer_vocab_size: int) -> "RunConfig":
        """This run with model.vocab_size = the tokenizer's vocabulary (padding is the model's business).

        When the vocabulary is already final (it came from a checkpoint's args), a different size
        means the tokenizer does not match the checkpoint: that is an error, not a resize.
        """
        if self.vocab_size_final:
            if tokenizer_vocab_size != self.model.vocab_size:
                raise ValueError(
                    f"the tokenizer has {tokenizer_vocab_size} ids but the checkpoint's model has {self.model.vocab_size}; "
                    "check --tokenizer-type / --tokenizer-model / --vocab-size"
                )
            return self
        model = dataclasses.replace(self.model, vocab_size=tokenizer_vocab_size)
        return dataclasses.replace(self, model=model, vocab_size_final=True)

    # ---- checks that need two sections ------------------------------------------------------------
    def _check_layout(self) -> None:
        grid = RankGrid.from_config(self.parallel, self.distributed.world_size)
        if grid.dp != self.distributed.data_parallel_size:
            raise ValueError(f"data-parallel size {self.distributed.data_parallel_size} does not match the layout's {grid.dp}")
        m = self.model
        validate_layout_for_model(grid, m.num_layers, m.moe.num_experts, m.mla.num_heads)
        ranges = self.stage_layer_ranges  # raises on an impossible split
        assert len(ranges) == grid.pp
        if m.ffn_hidden_size % grid.tp:
            raise ValueError(f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({grid.tp})")
        if grid.etp > 1:
            raise ValueError(
                f"--expert-tensor-parallel-size {grid.etp} is not supported: experts are whole on each expert-parallel "
                "rank; use --expert-tensor-parallel-size 1"
            )
        has_moe = any(m.is_moe_layer(i) for i in range(m.num_layers + m.mtp.num_layers))
        if has_moe and grid.tp > 1 and not self.parallel.sequence_parallel:
            raise ValueError("MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel (each TP rank routes its own tokens)")
        if grid.tp > 1 and m.tie_word_embeddings:
            raise ValueError("tied embeddings are not supported with tensor parallelism: pass --untie-embeddings-and-output-weights")

    def _check_sequence(self) -> None:
        seq, m, tp = self.data.seq_length, self.model, self.parallel.tensor_model_parallel_size
        if seq > m.max_position_embeddings:
            raise ValueError(f"--seq-length ({seq}) exceeds --max-position-embeddings ({m.max_position_embeddings})")
        rope = m.rope
        if rope.scaling_type == "yarn" and seq > rope.original_max_position_embeddings * rope.factor:
            raise ValueError(
                f"--seq-length ({seq}) exceeds what YaRN covers: --original-max-position-embeddings "
                f"({rope.original_max_position_embeddings}) x --rotary-scaling-factor ({rope.factor:g})"
            )
        if self.parallel.sequence_parallel and seq % tp:
            raise ValueError(f"--sequence-parallel splits the sequence over TP: --seq-length ({seq}) must be divisible by {tp}")

    def _check_moe(self) -> None:
        if self.model.moe.capacity_factor is not None and self.distributed.moe_token_dispatcher_type != "alltoall":
            raise ValueError(
                "--moe-expert-capacity-factor (token dropping/padding) needs --moe-token-dispatcher-type alltoall: "
                "capacity is applied where the alltoall dispatcher permutes tokens per expert; the allgather "
                "dispatcher has no such step (Megatron rejects this combination too)"
            )

    def _check_data(self) -> None:
        d = self.data
        split_given = d.train_data_path or d.valid_data_path or d.test_data_path
        if split_given and not d.train_data_path and not self.training.skip_train:
            raise ValueError("--valid/--test-data-path without --train-data-path: nothing to train on")

    def _check_batches(self) -> None:
        t, dp = self.training, self.data_parallel_size
        if t.global_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"--global-batch-size ({t.global_batch_size}) must be a positive multiple of --micro-batch-size "
                f"({t.micro_batch_size}) x data-parallel size ({dp} = world size / (TP x PP))"
            )


def format_run_config(run: RunConfig) -> str:
    """The resolved configuration, one `key = value` per line, then the pipeline stage map and the
    notes: printed at start-up so every default that was filled in is visible."""
    flat = to_flat_dict(run)
    flat.pop("__format__", None)
    flat.pop("notes")
    width = max(len(k) for k in flat)
    lines = [f"{k.ljust(width)} = {flat[k]!r}" for k in sorted(flat)]
    lines.append(run.stage_map())
    lines.extend(f"note: {n}" for n in run.notes)
    return "\n".join(lines)


__all__ = ["FLAT_FORMAT", "RunConfig", "format_run_config"]
