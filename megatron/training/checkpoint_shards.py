"""What one rank writes and reads of a distributed checkpoint (no collectives here).

Save: `holdings` lists the rank's tensors as items: each model tensor (a box of the global tensor,
`sharding.placement_of`) and each optimizer piece (a flat element range [lo, hi) of such a tensor,
from `optimizer.sharded_state()`), with an offer of those elements; `plan` (rank 0) picks one
writer per element; `write_share` writes the rank's share, element range by element range, cut
into boxes (`checkpoint_boxes.flat_range_boxes`) and clipped to `logical_rows`.
Load: `load_model_tensors` and `optimizer_fill` fill the rank's parameters and its optimizer's
live state through `read_placed`, which maps an element range to boxes and reads each from the
stored boxes it intersects. Everything is written from and read into the live tensors.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron.core.models.deepseek.sharding import Placement, ShardInfo, placement_of
from megatron.training import checkpoint_io as io
from megatron.training.checkpoint_boxes import Offer, assign_writers, clip_rows, flat_range_boxes, numel, shift
from megatron.training.checkpoint_format import CheckpointReader, DataFileWriter, Index, data_file_name, dtype_name
from megatron.training.checkpoint_io import CheckpointError


# ---- save ------------------------------------------------------------------------------------------
class Item:
    """One stored key's local data: flat tensor holding elements [base, base + numel) of the
    (TP/EP-local) tensor placed by `placement`."""

    def __init__(self, key: str, placement: Placement, flat: torch.Tensor, base: int) -> None:
        self.key, self.placement, self.flat, self.base = key, placement, flat, base


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)  # a view for contiguous tensors (parameters and state are)


def holdings(chunks: List[nn.Module], optimizer: Any, info: ShardInfo) -> Tuple[List[Item], List[Tuple], Dict[str, Tuple]]:
    """(items, offers [(index, key, offsets, view_shape, itemsize, ranges)], meta {key: (dtype,
    global shape, trainable)}) of this rank; optimizer header under meta[None]."""
    items: List[Item] = []
    offers: List[Tuple] = []
    meta: Dict[Any, Any] = {}

    def add(key: str, pl: Placement, flat: torch.Tensor, base: int, trainable: Optional[bool]) -> None:
        offers.append((len(items), key, pl.offsets, pl.view_shape, flat.element_size(), ((base, base + flat.numel()),)))
        items.append(Item(key, pl, flat, base))
        meta[key] = (dtype_name(flat.dtype), pl.global_shape, trainable)

    seen = set()
    for module in chunks:
        for name, t in io.persistent_named_tensors(module).items():
            key = io.MODEL_PREFIX + name
            if key not in seen:
                seen.add(key)
                trainable = bool(isinstance(t, nn.Parameter) and t.requires_grad)
                add(key, placement_of(name, t, info), _flat(t), 0, trainable)
    if optimizer is not None:
        state = optimizer.sharded_state()
        meta[None] = state["header"]
        for piece in state["pieces"]:
            pl = placement_of(piece.name, piece.param, info)
            for sub, tensor in piece.tensors.items():
                add(f"{io.OPTIM_PREFIX}{piece.name}/{sub}", pl, _flat(tensor), piece.lo, None)
    return items, offers, meta


def plan(all_offers: List[List[Tuple]], all_meta: List[Dict]) -> Tuple[Dict[str, Tuple], Dict[int, List]]:
    """Rank 0: the tensor table of the index and each rank's writes (ValueError on disagreement)."""
    tensors: Dict[str, Tuple] = {}
    for rank, meta in enumerate(all_meta):
        for key, value in meta.items():
            if key is None:
                continue
            if tensors.setdefault(key, value)[:2] != value[:2]:
                raise ValueError(f"ranks disagree on tensor {key!r}: {tensors[key][:2]} vs {value[:2]} (rank {rank})")
    offers = [Offer(rank, *o) for rank, items in enumerate(all_offers) for o in items]
    return tensors, assign_writers(offers)


def write_share(tmp: str, rank: int, items: List[Item], writes: List, block_bytes: int, buffer_bytes: int) -> Dict[str, Any]:
    """Write this rank's assigned element ranges; returns its data file entry and boxes."""
    if not writes:
        return {"file": None, "boxes": []}
    writer = DataFileWriter(os.path.join(tmp, data_file_name(rank)), block_bytes, buffer_bytes)
    boxes = []
    for index, lo, hi in writes:
        item = items[index]
        pl = item.placement
        for start, off, size in flat_range_boxes(pl.view_shape, lo, hi):
            goff = shift(off, pl.offsets)
            kept = clip_rows(goff, size, pl.logical_rows)
            if kept is None or numel(kept) == 0:
                continue  # vocabulary padding rows are not stored
            position = writer.write(item.flat, start - item.base, numel(kept))
            boxes.append((item.key, position, list(goff), list(kept)))
    return {"file": writer.close(), "boxes": boxes}


# ---- load ------------------------------------------------------------------------------------------
def check_shape(index: Index, key: str, pl: Placement) -> None:
    """The stored global shape must be this model's logical global shape (vocabulary rows included:
    a different vocabulary is an error, whatever either side pads to)."""
    stored = index.tensors[key].shape
    want = pl.global_shape
    if stored != want:
        raise CheckpointError(
            f"{os.path.join(index.directory, 'index.json')}: {key} has shape {stored}, this model's is {want} {index.where()}"
        )


def read_placed(reader: CheckpointReader, key: str, pl: Placement, dest: torch.Tensor, base: int, lo: int, hi: int) -> None:
    """Fill elements [lo, hi) of the local tensor placed by `pl` into `dest` (flat, holding
    elements [base, base + dest.numel())) from stored key `key`; padding rows are left alone."""
    for start, off, size in flat_range_boxes(pl.view_shape, lo, hi):
        goff = shift(off, pl.offsets)
        kept = clip_rows(goff, size, pl.logical_rows)
        if kept is None or numel(kept) == 0:
            continue
        n = numel(kept)
        out = dest[start - base : start - base + n].view(kept)
        if reader.read_into(key, goff, kept, out) != n:
            raise CheckpointError(
                f"{os.path.join(reader.index.directory, 'index.json')}: {key} lacks elements of the box at {goff} "
                f"{reader.index.where()}: incomplete checkpoint"
            )


def load_model_tensors(reader: CheckpointReader, chunks: List[nn.Module], info: ShardInfo) -> None:
    index = reader.index
    targets, missing, seen = [], [], set()
    for module in chunks:
        for name, t in io.persistent_named_tensors(module).items():
            key = io.MODEL_PREFIX + name
            if key in seen:
                continue
            seen.add(key)
            if key not in index.tensors:
                missing.append(key)
                continue
            pl = placement_of(name, t, info)
            check_shape(index, key, pl)
            master = f"{io.OPTIM_PREFIX}{name}/master"
            if t.dtype == torch.float32 and index.tensors[key].dtype != torch.float32 and master in index.tensors:
                key = master  # saved in low precision with fp32 masters: an fp32 model takes the exact values
                check_shape(index, key, pl)
            targets.append((key, pl, t))
    if missing:
        raise CheckpointError(
            f"{os.path.join(index.directory, 'index.json')}: lacks {len(missing)} tensors this model holds, "
            f"e.g. {missing[:5]} {index.where()}"
        )
    with torch.no_grad():
        for key, pl, t in targets:
            flat = t.data.view(-1) if t.is_contiguous() else t.data.reshape(-1).clone()
            read_placed(reader, key, pl, flat, 0, 0, flat.numel())
            if not t.is_contiguous():
                t.data.copy_(flat.view(t.shape))


def optimizer_fill(reader: CheckpointReader, info: ShardInfo) -> Any:
    index = reader.index

    def fill(piece: Any, sub: str, out: torch.Tensor) -> bool:
        key = f"{io.OPTIM_PREFIX}{piece.name}/{sub}"
        if key not in index.tensors and sub == "master":
            # Saved from fp32 parameters: their weights are the fp32 master values.
            model_key = io.MODEL_PREFIX + piece.name
            if model_key in index.tensors and index.tensors[model_key].dtype == torch.float32:
                key = model_key
        if key not in index.tensors:
            return False
        pl = placement_of(piece.name, piece.param, info)
        check_shape(index, key, pl)
        read_placed(reader, key, pl, out, piece.lo, piece.lo, piece.hi)
        return True

    return fill
