"""The interface every tokenizer implements, and Megatron's vocabulary padding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, List, Optional, Sequence


class MegatronTokenizer(ABC):
    """Common interface of all tokenizers.

    `vocab_size` is the tokenizer's own vocabulary size (before padding for the model);
    `eod` the end-of-document id appended by `--append-eod` and used for masks.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> List[int]: ...

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Tokenize many texts at once; tokenizers backed by Rust override this to run in parallel."""
        return [self.tokenize(t) for t in texts]

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        """`tokenize(text)` as consecutive id lists, each from about `piece_chars` characters
        (bounded memory for huge texts; see long_text.py), or None when this tokenizer cannot
        cut text without changing the ids."""
        return None

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @property
    def bos(self) -> int | None:
        return None

    @property
    def pad(self) -> int | None:
        return None


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Megatron's padding: round up to a multiple of divisible_by x TP so the embedding splits evenly."""
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            "--make-vocab-size-divisible-by and --tensor-model-parallel-size must be >= 1, got "
            f"{make_vocab_size_divisible_by} and {tensor_model_parallel_size}"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
