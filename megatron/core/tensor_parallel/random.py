"""Named random streams for tensor parallelism, held by an explicit tracker object (no globals).

Why: some random draws must be identical on all ranks of a TP group (dropout on replicated
activations, the full weights the layers shard) and some must differ (dropout on activations that are
split over TP ranks, e.g. attention heads), or the ranks would drop the same units of different
shards. Megatron's scheme:

- the device's default generator is seeded with ``seed`` on every rank: the same stream on all TP ranks;
- the tracker's ``"model-parallel"`` stream is seeded with ``seed + 2718 + tp_rank``: one per TP rank;
- optionally ``"expert-parallel"`` with ``seed + 1024 + 100 * ep_rank + etp_rank`` for expert layers.

``with tracker.fork("model-parallel"):`` swaps the named state into the device's default generator
(so dropout and in-place initialisers, which take no generator argument, draw from it), and on exit
stores the advanced state back and restores the default stream exactly where it was. States are
generator state byte tensors; `get_states` / `set_states` round-trip them through checkpoints and
activation recomputation.

The device's generator is read and written through the `megatron.core.device.Device` layer (CUDA,
HPU); without a device (or for CPU) the CPU generator is used.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Set

import torch
from torch import Tensor

from megatron.core.device import Device

MODEL_PARALLEL_RNG = "model-parallel"
EXPERT_PARALLEL_RNG = "expert-parallel"
MODEL_PARALLEL_SEED_OFFSET = 2718
EXPERT_PARALLEL_SEED_OFFSET = 1024


class RNGStatesTracker:
    """Named generator states, forked into the default generator of one device."""

    def __init__(self, device: Optional[Device] = None) -> None:
        self.device = None if device is None or device.kind == "cpu" else device
        self._states: Dict[str, Tensor] = {}
        self._seeds: Dict[str, int] = {}
        self._active: Set[str] = set()

    # ---- the device's default generator ----------------------------------------------------
    def _get_default_state(self) -> Tensor:
        if self.device is None:
            return torch.get_rng_state()
        state = self.device.get_rng_state()
        if state is None:
            raise RuntimeError(f"the {self.device.kind} device layer cannot read its RNG state")
        return state

    def _set_default_state(self, state: Tensor) -> None:
        if self.device is None:
            torch.set_rng_state(state)
        else:
            self.device.set_rng_state(state)

    def _state_from_seed(self, seed: int) -> Tensor:
        if self.device is None:
            return torch.Generator().manual_seed(seed).get_state()
        # Device generators are seeded through the device layer, which also reseeds the CPU RNG:
        # save both, seed, read the new device state, restore both.
        cpu, saved = torch.get_rng_state(), self._get_default_state()
        self.device.manual_seed(seed)
        state = self._get_default_state()
        torch.set_rng_state(cpu)
        self._set_default_state(saved)
        return state

    # ---- named streams ---------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return sorted(self._states)

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` seeded with `seed`. Names and seeds must be unique (equal seeds
        would make two streams that should be independent draw identical numbers)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        for other, other_seed in self._seeds.items():
            if other_seed == seed:
                raise ValueError(f"seed {seed} for RNG stream {name!r} is already used by {other!r}")
        self._states[name] = self._state_from_seed(seed)
        self._seeds[name] = seed

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream `name` inside the block; the default stream is untouched by it."""
        if name not in self._states:
            raise ValueError(f"unknown RNG stream {name!r}; known: {self.names}")
        if name in self._active:
            # The inner fork would restart from the state the outer one started from and repeat its numbers.
            raise RuntimeError(f"RNG stream {name!r} is already forked")
        outer = self._get_default_state()
        self._set_default_state(self._states[name])
        self._active.add(name)
        try:
            yield
        finally:
            self._states[name] = self._get_default_state()
            self._set_default_state(outer)
            self._active.discard(name)

    def get_states(self) -> Dict[str, Tensor]:
        """Copies of every named state, for checkpoints and activation recomputation."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: Mapping[str, Tensor]) -> None:
        """Replace the named states with `states` (from `get_states`); unknown names are added."""
        if self._active:
            raise RuntimeError(f"cannot set RNG states while {sorted(self._active)} is forked")
        for name, state in states.items():
            if not isinstance(state, Tensor) or state.dtype != torch.uint8:
                raise ValueError(f"RNG state {name!r} must be a uint8 tensor from get_states()")
        self._states = {name: state.clone() for name, state in states.items()}
        self._seeds = {name: seed for name, seed in self._seeds.items() if name in self._states}


def model_parallel_rng_tracker(
    seed: int,
    tp_rank: int,
    device: Optional[Device] = None,
    ep_rank: Optional[int] = None,
    etp_rank: int = 0,
) -> RNGStatesTracker:
    """Seed the default generator(s) with `seed` and return a tracker holding the per-TP-rank
    "model-parallel" stream (and, with `ep_rank`, the per-expert-rank "expert-parallel" stream).

    Side effect: reseeds the global CPU generator (and the device's), like torch.manual_seed.
    """
    if seed < 0 or tp_rank < 0:
        raise ValueError(f"seed ({seed}) and tp_rank ({tp_rank}) must be >= 0")
    if device is None:
        torch.manual_seed(seed)
    else:
        device.manual_seed(seed)
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    if ep_rank is not None:
        tracker.add(EXPERT_PARALLEL_RNG, seed + EXPERT_PARALLEL_SEED_OFFSET + 100 * ep_rank + etp_rank)
    return tracker
