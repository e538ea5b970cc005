"""Enumerate layouts for N devices, plan each, rank the feasible ones by estimated step time.

Candidates vary TP (with SP when TP > 1) over powers of two up to a node, PP over divisors of the
world (stages split evenly, or with the first / last stage pinned when the layers do not divide),
EP over divisors of the experts that fit a stage, the token dispatcher, and recompute (none,
selective core attention, full uniform 1). The distributed optimizer is always on (it never costs
memory). Everything else comes from the caller's flags. Each candidate is validated by the real
argument parser, so a rejected candidate carries the parser's own one-line reason; a valid one
that does not fit carries its peak against the usable memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.training.planning.plan import Plan

# Flags the search sets itself, with how many values each takes (-1: any number).
LAYOUT_FLAGS = {
    "--tensor-model-parallel-size": 1, "--pipeline-model-parallel-size": 1, "--expert-model-parallel-size": 1,
    "--expert-tensor-parallel-size": 1, "--sequence-parallel": 0, "--decoder-first-pipeline-num-layers": 1,
    "--decoder-last-pipeline-num-layers": 1, "--moe-token-dispatcher-type": 1, "--use-distributed-optimizer": 0,
    "--recompute-granularity": 1, "--recompute-method": 1, "--recompute-num-layers": 1, "--recompute-modules": -1,
    "--recompute-activations": 0, "--moe-layer-recompute": 0,
}

RECOMPUTE_CHOICES = (
    ("none", ()),
    ("core_attn", ("--recompute-granularity", "selective", "--recompute-modules", "core_attn")),
    ("full", ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")),
)


def strip_layout_flags(argv: Sequence[str]) -> List[str]:
    """`argv` without the flags the search chooses (and their values)."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in LAYOUT_FLAGS:
            n = LAYOUT_FLAGS[name]
            i += 1
            if "=" in arg:
                continue
            if n == -1:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(arg)
        i += 1
    return out


def pipeline_split(num_layers: int, pp: int) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """(first, last) stage layer counts for PP `pp`: (None, None) when the layers divide evenly,
    else the most even split with the first and/or last stage pinned; None when impossible."""
    if pp == 1 or num_layers % pp == 0:
        return (None, None) if num_layers >= pp else None
    best = None
    for first in range(1, num_layers):
        for last in range(1, num_layers - first + 1):
            rest, middle = num_layers - first - last, pp - 2
            if middle <= 0:
                if rest != 0:
                    continue
                each = 0
            elif rest < middle or rest % middle:
                continue
            else:
                each = rest // middle
            counts = [first, last] + ([each] if middle > 0 else [])
            # Most even; ties: the last stage (output head, MTP) lighter, then the first (embedding).
            key = (max(counts) - min(counts), max(counts), last, first)
            if best is None or key < best[0]:
                best = (key, (first, last))
    return None if best is None else best[1]


@dataclass
class Candidate:
    name: str
    argv: List[str]
    plan: Optional[Plan] = None
    reason: Optional[str] = None

    @property
    def feasible(self) -> bool:
        return self.plan is not None and self.reason is None


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model: DeepSeekConfig, world: int, devices_per_node: int) -> List[Tuple[str, List[str]]]:
    """(name, layout flags) of every candidate layout for `world` devices."""
    out = []
    moe = any(model.is_moe_layer(i) for i in range(model.num_layers))
    for tp in [t for t in (1, 2, 4, 8) if t <= devices_per_node and world % t == 0]:
        for pp in [p for p in _divisors(world // tp) if p <= model.num_layers]:
            split = pipeline_split(model.num_layers, pp)
            if split is None:
                continue
            dp = world // (tp * pp)
            eps = [e for e in _divisors(tp * dp) if model.moe.num_experts % e == 0] if moe else [1]
            for ep in eps:
                dispatchers = ("alltoall", "allgather") if ep > 1 else ("alltoall",)
                for dispatcher in dispatchers:
                    for rname, rflags in RECOMPUTE_CHOICES:
                        flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                                 "--expert-model-parallel-size", str(ep), "--moe-token-dispatcher-type", dispatcher,
                                 "--use-distributed-optimizer", *rflags]
                        if tp > 1:
                            flags.append("--sequence-parallel")
                        first, last = split
                        if first is not None:
                            flags += ["--decoder-first-pipeline-num-layers", str(first)]
                        if last is not None:
                            flags += ["--decoder-last-pipeline-num-layers", str(last)]
                        stages = f"PP{pp}"
                        if first is not None:
                            stages += f"[{first},{last}]" if pp == 2 else f"[{first},..,{last}]"
                        experts = f"EP{ep}" + (f" {dispatcher}" if ep > 1 else "")
                        name = f"TP{tp}{'+SP' if tp > 1 else ''} {stages} {experts} DP{dp} recompute={rname}"
                        out.append((name, flags))
    return out


def search(
    model: DeepSeekConfig,
    base_argv: Sequence[str],
    world: int,
    devices_per_node: int,
    plan_argv: Callable[[List[str], int], Plan],
) -> List[Candidate]:
    """Plan every candidate; feasible ones first by step time, then the rest with their reasons.

    `plan_argv(argv, world)` parses a full command line and plans it (raising ValueError when the
    parser rejects it).
    """
    base = strip_layout_flags(base_argv)
    results = []
    for name, flags in candidates(model, world, devices_per_node):
        cand = Candidate(name=name, argv=base + flags)
        try:
            cand.plan = plan_argv(cand.argv, world)
        except ValueError as exc:
            cand.reason = str(exc).splitlines()[0]
        else:
            if not cand.plan.fits:
                worst = max(cand.plan.stages, key=lambda s: s.memory.peak)
                cand.reason = (f"out of memory: stage {worst.memory.stage} peaks at {worst.memory.peak / 2**30:.1f} GiB "
                               f"({worst.memory.peak_phase}) > {cand.plan.usable_bytes / 2**30:.1f} GiB usable")
        results.append(cand)
    feasible = sorted((c for c in results if c.feasible), key=lambda c: c.plan.step["step"])
    return feasible + [c for c in results if not c.feasible]
