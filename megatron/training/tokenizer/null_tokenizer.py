"""Megatron's `NullTokenizer`: text is already ids ("1 2 3"); for mock data and benchmarks."""

from __future__ import annotations

from typing import List, Sequence

from .base import MegatronTokenizer


class NullTokenizer(MegatronTokenizer):
    """Ids written as whitespace-separated integers; eod is the id just past `--vocab-size`.

    The vocabulary is `vocab_size` ordinary ids plus the eod id, so `vocab_size` reports one more
    than the argument, as Megatron does.
    """

    def __init__(self, vocab_size: int) -> None:
        bad = ValueError(f"--vocab-size must be an integer >= 1, got {vocab_size!r}")
        if isinstance(vocab_size, bool):
            raise bad
        try:
            size = int(vocab_size)
        except (TypeError, ValueError) as e:
            raise bad from e
        if size < 1 or (isinstance(vocab_size, float) and size != vocab_size):
            raise bad
        self._vocab_size_without_eod = size
        self._eod = size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"tokenize expects a string, got {type(text).__name__}")
        ids = []
        for word in text.split():
            try:
                ids.append(int(word))
            except ValueError as e:
                raise ValueError(f"NullTokenizer expects whitespace-separated integer ids, got {word[:40]!r}") from e
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


__all__ = ["NullTokenizer"]
