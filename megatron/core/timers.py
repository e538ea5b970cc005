"""Named wall-clock timers for the parts of a training step (forward, backward, MoE dispatch and
combine, optimizer, data), accumulated between reads.

Device work is asynchronous, so an accurate reading needs a device synchronisation at both ends
of every timed region; that costs throughput, which is why timers are off unless asked for
(--log-timers-to-tensorboard or --timing-log-level > 0). A disabled `Timers` costs one branch.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, Optional


class Timers:
    def __init__(self, enabled: bool = False, synchronize: Optional[Callable[[], None]] = None) -> None:
        self.enabled = enabled
        self.synchronize = synchronize
        self._seconds: Dict[str, float] = defaultdict(float)
        self._counts: Dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self._seconds[name] += time.perf_counter() - start
            self._counts[name] += 1

    def read(self, reset: bool = True) -> Dict[str, float]:
        """Seconds accumulated per timer since the last reset."""
        out = dict(self._seconds)
        if reset:
            self._seconds.clear()
            self._counts.clear()
        return out


DISABLED = Timers(enabled=False)


class TimedIterator:
    """An iterator whose `next` is timed under `name` (the data-loading timer)."""

    def __init__(self, iterator: Iterator, timers: Timers, name: str = "data") -> None:
        self.iterator, self.timers, self.name = iterator, timers, name

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self):
        with self.timers(self.name):
            return next(self.iterator)
