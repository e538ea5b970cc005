"""Records and the input-source interface shared by the preprocessing readers.

Why separate: the JSON-lines reader and the columnar readers (Parquet, Arrow, `datasets`) hand
out the same `RecordBatch`es and apply the same bad-record policy, so that every input format
reports problems the same way (`file:line: reason`) and routes records to partitions alike.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

Value = Any  # a str or a list of str once validated


class InputError(ValueError):
    """Bad or unreadable input; the message names the file and, where known, the line or row."""


@dataclass
class RecordBatch:
    """A bounded slice of the input: one value per record and key, in input order."""

    source: str
    values: Dict[str, List[Value]]
    line_numbers: List[int]  # 1-based line (or row) number in `source`, per record
    global_indices: List[int]  # 0-based position among all lines of all inputs (partition routing)
    nbytes: int  # input bytes this batch consumed (decompressed for JSON lines)
    position: int = 0  # on-disk bytes of all inputs consumed up to the end of this batch (ETA)
    absolute_line: Optional[Callable[[int], int]] = None  # line number in the file, for a byte range

    def file_line(self, position: int) -> int:
        """Line number in `source` of record `position` (for messages)."""
        line = self.line_numbers[position]
        return self.absolute_line(line) if self.absolute_line is not None else line

    def __len__(self) -> int:
        return len(self.line_numbers)

    def select(self, positions: Sequence[int]) -> "RecordBatch":
        """The records at `positions` (in that order); used to route records to partitions."""
        share = len(positions) / max(len(self), 1)
        return RecordBatch(
            source=self.source,
            values={k: [v[i] for i in positions] for k, v in self.values.items()},
            line_numbers=[self.line_numbers[i] for i in positions],
            global_indices=[self.global_indices[i] for i in positions],
            nbytes=int(self.nbytes * share),
            position=self.position,
            absolute_line=self.absolute_line,
        )


@dataclass
class BadRecords:
    """What to do with a bad record: raise (default) or count and skip it (`--skip-bad-lines`)."""

    skip: bool = False
    count: int = 0
    examples: List[str] = field(default_factory=list)

    def report(self, source: str, line: int, reason: str, unit: str = "line") -> None:
        message = f"{source}:{line}: {reason}" if unit == "line" else f"{source}: {unit} {line}: {reason}"
        if not self.skip:
            raise InputError(f"{message} (pass --skip-bad-lines to skip bad records instead)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def value_problem(key: str, value: Value) -> Optional[str]:
    """Why `value` cannot be tokenized, or None: a text is a string, or a list of strings
    (sentences); anything else (numbers, null, nested objects) is refused rather than guessed."""
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return f"key {key!r}: item {i} of the list is {type(item).__name__}, expected a string"
        return None
    kind = "null" if value is None else type(value).__name__
    return f"key {key!r} holds {kind}, expected a string or a list of strings"


class InputSource(ABC):
    """One input file (or one Arrow file of a saved dataset), read in bounded batches."""

    unit = "line"  # what a record number counts, for messages

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self.records_seen = 0  # lines (or rows) consumed, blank ones included

    def check_keys(self, keys: Sequence[str]) -> None:
        """Fail before any output is written when the keys cannot exist (columnar inputs)."""

    @abstractmethod
    def batches(self, keys: Sequence[str], batch_bytes: int, bad: BadRecords, first_index: int) -> Iterator[RecordBatch]:
        """Yield batches; `first_index` is the global position of this source's first record."""

    @abstractmethod
    def position(self) -> int:
        """On-disk bytes consumed so far (drives the ETA)."""
