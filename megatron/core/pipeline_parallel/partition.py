"""Which decoder layers live on which pipeline stage.

Megatron splits ``--num-layers`` evenly over ``--pipeline-model-parallel-size`` stages. The first
stage also holds the embedding and the last stage the output head, the loss and the MTP modules,
so those stages are often given fewer decoder layers with ``--decoder-first-pipeline-num-layers``
and ``--decoder-last-pipeline-num-layers``; the remaining layers are then split evenly over the
stages in between. Every stage must hold at least one decoder layer (a stage with none would only
forward activations and waste a device).

Layer indices here are global (0-based, the index in the full model), so a stage's layers keep
their identity across layouts: e.g. the DeepSeek-V3 "first k layers dense" rule is evaluated on
the global index, and a checkpoint converter maps stage-local layer i to global ``start + i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"
PP_FLAG = "--pipeline-model-parallel-size"
LAYERS_FLAG = "--num-layers"


def stage_layer_ranges(
    num_layers: int,
    pp_size: int,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> List[Tuple[int, int]]:
    """Half-open global layer ranges ``[(start, end), ...]``, one per pipeline stage, in stage order.

    ``first_stage_layers`` / ``last_stage_layers`` pin the layer count of the first / last stage
    (None: not pinned); the layers left over are split evenly over the other stages. Raises
    ValueError, naming the flags, when the split is impossible: a count that does not divide, a
    stage with zero layers, pinned counts larger than ``num_layers``, or pinned counts with PP=1.

    >>> stage_layer_ranges(8, 4)
    [(0, 2), (2, 4), (4, 6), (6, 8)]
    >>> stage_layer_ranges(7, 4, first_stage_layers=1)
    [(0, 1), (1, 3), (3, 5), (5, 7)]
    """
    if pp_size < 1:
        raise ValueError(f"{PP_FLAG} must be >= 1, got {pp_size}")
    if num_layers < 1:
        raise ValueError(f"{LAYERS_FLAG} must be >= 1, got {num_layers}")
    for flag, value in ((FIRST_FLAG, first_stage_layers), (LAST_FLAG, last_stage_layers)):
        if value is None:
            continue
        if pp_size == 1:
            raise ValueError(f"{flag} needs {PP_FLAG} > 1 (got {pp_size}); with one stage it holds all layers")
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (a stage with 0 layers is not supported), got {value}")

    if first_stage_layers is None and last_stage_layers is None:
        if num_layers < pp_size:
            raise ValueError(
                f"{LAYERS_FLAG} ({num_layers}) < {PP_FLAG} ({pp_size}): a stage would get 0 layers"
            )
        if num_layers % pp_size:
            raise ValueError(
                f"{LAYERS_FLAG} ({num_layers}) is not divisible by {PP_FLAG} ({pp_size}); "
                f"pin the first/last stage with {FIRST_FLAG} / {LAST_FLAG} for an uneven split"
            )
        per = num_layers // pp_size
        return [(s * per, (s + 1) * per) for s in range(pp_size)]

    first = first_stage_layers or 0
    last = last_stage_layers or 0
    pinned = first + last
    if pinned > num_layers:
        raise ValueError(
            f"{FIRST_FLAG} ({first_stage_layers}) + {LAST_FLAG} ({last_stage_layers}) = {pinned} "
            f"exceeds {LAYERS_FLAG} ({num_layers})"
        )
    free_stages = pp_size - (first_stage_layers is not None) - (last_stage_layers is not None)
    remaining = num_layers - pinned
    flags = " / ".join(f for f, v in ((FIRST_FLAG, first_stage_layers), (LAST_FLAG, last_stage_layers)) if v is not None)
    if free_stages == 0:
        if remaining:
            raise ValueError(
                f"{flags} leave {remaining} of {LAYERS_FLAG} ({num_layers}) layers with no stage to hold them "
                f"({PP_FLAG} {pp_size}); they must add up to {LAYERS_FLAG}"
            )
        counts: List[int] = []
    else:
        if remaining < free_stages:
            raise ValueError(
                f"{flags} leave {remaining} of {LAYERS_FLAG} ({num_layers}) layers for {free_stages} other "
                f"stage(s) of {PP_FLAG} {pp_size}: a stage would get 0 layers"
            )
        if remaining % free_stages:
            raise ValueError(
                f"{flags} leave {remaining} of {LAYERS_FLAG} ({num_layers}) layers, not divisible by the "
                f"{free_stages} other stage(s) of {PP_FLAG} {pp_size}"
            )
        counts = [remaining // free_stages] * free_stages
    if first_stage_layers is not None:
        counts.insert(0, first_stage_layers)
    if last_stage_layers is not None:
        counts.append(last_stage_layers)

    ranges: List[Tuple[int, int]] = []
    start = 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


@dataclass(frozen=True)
class StageInfo:
    """What one pipeline stage holds (global layer indices)."""

    stage: int
    start: int
    end: int
    dense_layers: Tuple[int, ...]
    moe_layers: Tuple[int, ...]
    has_embedding: bool
    has_output_head: bool
    mtp_num_layers: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def describe_stages(
    ranges: Sequence[Tuple[int, int]],
    is_moe_layer: Optional[Callable[[int], bool]] = None,
    mtp_num_layers: int = 0,
) -> List[StageInfo]:
    """Per-stage contents for ``ranges`` (from `stage_layer_ranges`).

    ``is_moe_layer(global_layer_index)`` tells MoE from dense layers (None: all dense); e.g. for
    DeepSeek-V3 ``lambda i: i >= first_k_dense_replace``. The embedding is on stage 0; the output
    head, the loss and the ``mtp_num_layers`` multi-token-prediction modules are on the last stage.
    """
    if not ranges:
        raise ValueError("ranges is empty: expected one (start, end) per pipeline stage")
    last = len(ranges) - 1
    infos = []
    for stage, (start, end) in enumerate(ranges):
        layers = range(start, end)
        moe = tuple(i for i in layers if is_moe_layer is not None and is_moe_layer(i))
        dense = tuple(i for i in layers if i not in moe)
        infos.append(
            StageInfo(
                stage=stage,
                start=start,
                end=end,
                dense_layers=dense,
                moe_layers=moe,
                has_embedding=stage == 0,
                has_output_head=stage == last,
                mtp_num_layers=mtp_num_layers if stage == last else 0,
            )
        )
    return infos


def _runs(indices: Sequence[int]) -> str:
    """Compress sorted indices into runs: (0, 1, 2, 5) -> "0-2,5"."""
    parts: List[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def format_stage_map(
    ranges: Sequence[Tuple[int, int]],
    is_moe_layer: Optional[Callable[[int], bool]] = None,
    mtp_num_layers: int = 0,
) -> str:
    """A printable map, one line per stage, e.g. for a 6-layer model with 1 dense layer on PP2::

        stage 0: embedding + layers 0-2 (3: dense 0, MoE 1-2)
        stage 1: layers 3-5 (3: MoE 3-5) + output head + MTP (1 layer)
    """
    lines = []
    for info in describe_stages(ranges, is_moe_layer, mtp_num_layers):
        kinds = []
        if info.dense_layers:
            kinds.append(f"dense {_runs(info.dense_layers)}")
        if info.moe_layers:
            kinds.append(f"MoE {_runs(info.moe_layers)}")
        span = _runs(tuple(range(info.start, info.end)))
        parts = [f"layers {span} ({info.num_layers}: {', '.join(kinds)})"]
        if info.has_embedding:
            parts.insert(0, "embedding")
        if info.has_output_head:
            parts.append("output head")
        if info.mtp_num_layers:
            parts.append(f"MTP ({info.mtp_num_layers} layer{'s' if info.mtp_num_layers > 1 else ''})")
        lines.append(f"stage {info.stage}: " + " + ".join(parts))
    return "\n".join(lines)
