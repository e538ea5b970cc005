"""Progress lines on stderr: documents, MB/s, tokens/s and, when the input size is known, ETA.

Why: preprocessing a large corpus takes hours; users need to see the rate and when it ends, and
stdout stays free for whatever else the tool prints.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts documents, input bytes and tokens; prints one line every `log_interval` documents."""

    def __init__(
        self,
        log_interval: int,
        total_bytes: Optional[int] = None,
        stream: Optional[TextIO] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {log_interval}")
        self.log_interval = log_interval
        self.total_bytes = total_bytes or None  # 0: unknown
        self.position = 0  # on-disk bytes of input consumed, for the ETA
        self.stream = stream or sys.stderr
        self._clock = clock
        self.start = clock()
        self.documents = 0
        self.bytes = 0
        self.tokens = 0
        self._next_report = log_interval
        self._reported_at = 0  # document count of the last line printed

    @property
    def elapsed(self) -> float:
        return max(self._clock() - self.start, 1e-9)

    def update(self, documents: int, nbytes: int, tokens: int, position: int = 0) -> None:
        """Count a written batch; `position` is where in the input (on-disk bytes) it ended."""
        self.documents += documents
        self.bytes += nbytes
        self.tokens += tokens
        self.position = max(self.position, position)
        if self.documents >= self._next_report:
            self._next_report = (self.documents // self.log_interval + 1) * self.log_interval
            self.report()

    def line(self) -> str:
        elapsed = self.elapsed
        parts = [
            f"processed {self.documents:,} documents",
            f"{self.bytes / 1e6:,.1f} MB",
            f"{self.bytes / 1e6 / elapsed:.2f} MB/s",
            f"{self.tokens / elapsed:,.0f} tokens/s",
        ]
        if self.total_bytes:
            done = min(self.position, self.total_bytes)
            if done > 0:
                fraction = done / self.total_bytes
                remaining = elapsed * (1 - fraction) / fraction
                parts.append(f"{100 * fraction:.1f}% of input, ETA {_duration(remaining)}")
        return " | ".join(parts)

    def report(self) -> None:
        self._reported_at = self.documents
        print(self.line(), file=self.stream, flush=True)

    def final_report(self) -> None:
        """The last progress line, unless the latest one already covered every document."""
        if self._reported_at != self.documents or self.documents == 0:
            self.report()

    def summary(self) -> str:
        elapsed = self.elapsed
        return (
            f"done: {self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB in "
            f"{_duration(elapsed)} ({self.bytes / 1e6 / elapsed:.2f} MB/s, {self.tokens / elapsed:,.0f} tokens/s)"
        )
