"""Box geometry of distributed checkpoints: flat element ranges <-> rectangular boxes, clipping,
intersection, and the choice of one writer per stored element.

A box is (offsets, sizes): the elements offsets[d] <= i_d < offsets[d] + sizes[d] of a tensor,
stored in row-major order. A rank holds a tensor as a box of the global tensor (its Placement);
the distributed optimizer holds flat ranges [lo, hi) of that local tensor. `flat_range_boxes`
turns such a range into at most 2 * ndim - 1 boxes: a partial first row (recursively), a run of
full rows, a partial last row (recursively). E.g. shape [4, 5], [3, 17) -> rows 0 cols 3..4,
rows 1..2 whole, row 3 cols 0..1. Every box covers a contiguous run of the range, in order, so
its data is a contiguous slice of the flat local tensor.

Everything here is pure arithmetic on tuples (no tensors, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Shape = Tuple[int, ...]


def numel(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= int(s)
    return n


def flat_range_boxes(shape: Sequence[int], lo: int, hi: int) -> List[Tuple[int, Shape, Shape]]:
    """Boxes covering the flat range [lo, hi) of a row-major tensor of `shape`.

    Returns [(flat_start, offsets, sizes)] in flat order; box k covers [flat_start, flat_start +
    numel(sizes)) and the boxes together cover [lo, hi) exactly."""
    shape = tuple(int(d) for d in shape)
    total = numel(shape)
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"flat range [{lo}, {hi}) outside a tensor of {total} elements")
    if lo == hi:
        return []
    if not shape:  # 0-d tensor: one element
        return [(0, (), ())]
    if len(shape) == 1:
        return [(lo, (lo,), (hi - lo,))]
    inner = numel(shape[1:])
    out: List[Tuple[int, Shape, Shape]] = []
    row = lo // inner
    if lo % inner:  # partial first row
        end = min(hi, (row + 1) * inner)
        for start, off, size in flat_range_boxes(shape[1:], lo - row * inner, end - row * inner):
            out.append((row * inner + start, (row,) + off, (1,) + size))
        lo, row = end, row + 1
        if lo == hi:
            return out
    last = hi // inner  # rows [row, last) are whole
    if last > row:
        out.append((row * inner, (row,) + (0,) * (len(shape) - 1), (last - row,) + shape[1:]))
        lo = last * inner
    if lo < hi:  # partial last row
        for start, off, size in flat_range_boxes(shape[1:], 0, hi - lo):
            out.append((lo + start, (last,) + off, (1,) + size))
    return out


def shift(offsets: Sequence[int], by: Sequence[int]) -> Shape:
    return tuple(int(a) + int(b) for a, b in zip(offsets, by))


def clip_rows(offsets: Shape, sizes: Shape, rows: Optional[int]) -> Optional[Shape]:
    """Sizes of the box after dropping global rows >= `rows` (dim 0); None when nothing is left.

    Dim 0 is outermost, so the kept elements are a prefix of the box's row-major data."""
    if rows is None or not sizes:
        return sizes
    end = min(offsets[0] + sizes[0], rows)
    if end <= offsets[0]:
        return None
    return (end - offsets[0],) + tuple(sizes[1:])


def intersect(a_off: Shape, a_size: Shape, b_off: Shape, b_size: Shape) -> Optional[Tuple[Shape, Shape]]:
    """The common box of two boxes (global offsets), or None when they do not overlap."""
    off, size = [], []
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        off.append(lo)
        size.append(hi - lo)
    return tuple(off), tuple(size)


def contains(shape: Shape, offsets: Shape, sizes: Shape) -> bool:
    return len(shape) == len(offsets) == len(sizes) and all(
        o >= 0 and s >= 0 and o + s <= d for d, o, s in zip(shape, offsets, sizes)
    )


def disjoint_cover(shape: Shape, boxes: Sequence[Tuple[Shape, Shape]]) -> Optional[str]:
    """None when `boxes` tile `shape` exactly (pairwise disjoint, volumes sum to the whole), else
    a description of the first problem. Sweep over dim 0 so only row-overlapping pairs are compared."""
    total = sum(numel(s) for _, s in boxes)
    if total != numel(shape):
        return f"boxes cover {total} of {numel(shape)} elements"
    if not shape:
        return None if len(boxes) == 1 else f"{len(boxes)} boxes for a 0-d tensor"
    order = sorted(boxes, key=lambda b: (b[0][0], b[0]))
    active: List[Tuple[Shape, Shape]] = []
    for off, size in order:
        active = [b for b in active if b[0][0] + b[1][0] > off[0]]
        for other in active:
            if intersect(off, size, other[0], other[1]) is not None:
                return f"boxes at {off} and {other[0]} overlap"
        active.append((off, size))
    return None


# ---- one writer per element -----------------------------------------------------------------------
@dataclass(frozen=True)
class Offer:
    """Elements a rank can write: flat ranges of its local tensor (one stored key, one placement)."""

    rank: int
    index: int  # position in that rank's own offer list
    key: str
    offsets: Shape  # placement offsets: offers with equal (key, offsets, view_shape) hold the same data
    view_shape: Shape
    itemsize: int
    ranges: Tuple[Tuple[int, int], ...]


def assign_writers(offers: Iterable[Offer]) -> Dict[int, List[Tuple[int, int, int]]]:
    """{rank: [(offer index, lo, hi)]}: every element offered by any rank is written by exactly one.

    Offers of the same (key, offsets, view_shape) are copies of one local tensor (data-parallel
    replicas, the first and last pipeline stage's embedding, TP-replicated parameters) or disjoint
    shards of it (the distributed optimizer). Their ranges are cut at every endpoint; each piece
    goes to the writer of the previous piece when it holds it (long contiguous writes), else to
    the holder with the fewest bytes so far (replicated weights spread over the DP ranks).
    Groups are visited largest first and in a fixed order, so the result is deterministic.
    ValueError when the offers of a group leave some element of its local tensor unheld.
    """
    groups: Dict[Tuple[str, Shape, Shape], List[Offer]] = {}
    for offer in offers:
        groups.setdefault((offer.key, offer.offsets, offer.view_shape), []).append(offer)
    load: Dict[int, int] = {}
    plan: Dict[int, List[Tuple[int, int, int]]] = {}

    for (key, _, _), members in sorted(groups.items(), key=lambda it: (-numel(it[0][2]), it[0])):
        total = numel(members[0].view_shape)
        points = sorted({0, total} | {p for o in members for r in o.ranges for p in r})
        previous: Optional[Offer] = None
        for a, b in zip(points, points[1:]):
            holders = [o for o in members if any(lo <= a and b <= hi for lo, hi in o.ranges)]
            if not holders:
                raise ValueError(
                    f"{key}: no rank holds elements [{a}, {b}) of the local tensor at offsets {members[0].offsets}"
                )
            if previous is not None and previous in holders:
                chosen = previous
            else:
                chosen = min(holders, key=lambda o: (load.get(o.rank, 0), o.rank))
            load[chosen.rank] = load.get(chosen.rank, 0) + (b - a) * chosen.itemsize
            mine = plan.setdefault(chosen.rank, [])
            if mine and mine[-1][0] == chosen.index and mine[-1][2] == a:
                mine[-1] = (chosen.index, mine[-1][1], b)
            else:
                mine.append((chosen.index, a, b))
            previous = chosen
    return plan
