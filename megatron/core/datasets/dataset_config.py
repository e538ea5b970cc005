"""Frozen, validated configuration of the GPT pre-training datasets.

Built from the training flags (`--data-path`, `--split`, `--seq-length`, `--seed`,
`--data-cache-path`, `--mock-data`, `--reset-position-ids`, `--reset-attention-mask`,
`--eod-mask-loss`); every bad value is a ValueError naming the flag, raised when the config is
made, before any data is touched.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from megatron.core.datasets.helpers import normalize_weights, parse_split

Blend = tuple[tuple[float, str], ...]


def parse_data_path(values: Union[str, Sequence[str]]) -> Blend:
    """`--data-path` values -> blend: `A` -> ((1.0, "A"),); `0.3 A 0.7 B` -> ((0.3, "A"), (0.7, "B"))."""
    if isinstance(values, str):
        values = values.split()
    values = list(values)
    if len(values) == 1:
        return ((1.0, values[0]),)
    if not values or len(values) % 2:
        raise ValueError(
            f"--data-path takes one prefix or weight/prefix pairs ('0.3 pathA 0.7 pathB'), got {values!r}"
        )
    blend = []
    for weight, prefix in zip(values[0::2], values[1::2]):
        try:
            blend.append((float(weight), prefix))
        except ValueError:
            raise ValueError(f"--data-path weight {weight!r} (before {prefix!r}) is not a number") from None
    return tuple(blend)


@dataclass(frozen=True)
class GPTDatasetConfig:
    """What determines the GPT datasets and their samples.

    blend: (weight, path prefix) pairs (weights need not sum to 1; one pair means no blending),
        or None with `mock`. The prefix names `<prefix>.bin` / `<prefix>.idx`.
    split: train/valid/test weights over the documents of each prefix, "969,30,1" style.
    path_to_cache: directory for the index cache; None caches next to the data
        (`<data dir>/cache/GPTDataset_indices`) when that is writable, else keeps indices in memory.
    eod_token_id: needed by eod_mask_loss / reset_position_ids / reset_attention_mask; in mock
        mode it defaults to vocab_size - 1.
    vocab_size, mock_num_documents, mock_max_document_length: shape of the mock corpus.
    """

    random_seed: int
    sequence_length: int
    blend: Optional[Blend] = None
    split: str = "969,30,1"
    path_to_cache: Optional[str] = None
    mock: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    eod_token_id: Optional[int] = None
    vocab_size: Optional[int] = None
    mock_num_documents: int = 100_000
    mock_max_document_length: int = 4096

    def __post_init__(self) -> None:
        if self.blend is not None:
            # Freeze a list-of-lists into a tuple of pairs so the config stays immutable and hashable.
            if not isinstance(self.blend, (list, tuple)):
                raise ValueError(f"--data-path must be a list of (weight, prefix) pairs, got {self.blend!r}")
            object.__setattr__(self, "blend", tuple(_as_pair(item) for item in self.blend))
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.random_seed) or not 0 <= self.random_seed < 2**32:
            raise ValueError(f"--seed must be an integer in [0, 2**32), got {self.random_seed!r}")
        if not _is_int(self.sequence_length) or self.sequence_length < 1:
            raise ValueError(f"--seq-length must be a positive integer, got {self.sequence_length!r}")
        parse_split(self.split)  # raises ValueError naming --split
        if self.mock and self.blend is not None:
            raise ValueError("--mock-data and --data-path are mutually exclusive")
        if not self.mock:
            self._validate_blend()
        if self.path_to_cache is not None:
            if not isinstance(self.path_to_cache, str) or not self.path_to_cache:
                raise ValueError(f"--data-cache-path must be a directory path, got {self.path_to_cache!r}")
            if os.path.exists(self.path_to_cache) and not os.path.isdir(self.path_to_cache):
                raise ValueError(f"--data-cache-path {self.path_to_cache!r} exists and is not a directory")
        if self.eod_token_id is not None and (not _is_int(self.eod_token_id) or self.eod_token_id < 0):
            raise ValueError(f"the end-of-document token id must be a non-negative integer, got {self.eod_token_id!r}")
        if self.mock:
            self._validate_mock()
        elif self.eod_token_id is None:
            for flag, on in (
                ("--eod-mask-loss", self.eod_mask_loss),
                ("--reset-position-ids", self.reset_position_ids),
                ("--reset-attention-mask", self.reset_attention_mask),
            ):
                if on:
                    raise ValueError(f"{flag} needs the tokenizer's end-of-document token id (eod_token_id)")

    def _validate_blend(self) -> None:
        if not self.blend:
            raise ValueError("--data-path is required (one prefix, or weight/prefix pairs) unless --mock-data is set")
        for item in self.blend:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError(f"--data-path entries must be (weight, prefix) pairs, got {item!r}")
            weight, prefix = item
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"--data-path weight for {prefix!r} must be a positive number, got {weight!r}")
            if not isinstance(prefix, str) or not prefix:
                raise ValueError(f"--data-path prefix must be a non-empty path, got {prefix!r}")
            if prefix.endswith((".bin", ".idx")):
                raise ValueError(f"--data-path takes the prefix without .bin/.idx, got {prefix!r}")

    def _validate_mock(self) -> None:
        if not _is_int(self.vocab_size) or self.vocab_size < 2:
            raise ValueError(f"--mock-data needs --vocab-size of at least 2, got {self.vocab_size!r}")
        if self.eod_token_id is not None and self.eod_token_id >= self.vocab_size:
            raise ValueError(f"--mock-data: eod token id {self.eod_token_id} is outside --vocab-size {self.vocab_size}")
        if not _is_int(self.mock_num_documents) or self.mock_num_documents < 1:
            raise ValueError(f"--mock-data needs at least one document, got {self.mock_num_documents!r}")
        if not _is_int(self.mock_max_document_length) or self.mock_max_document_length < 1:
            raise ValueError(f"--mock-data document length must be positive, got {self.mock_max_document_length!r}")

    @property
    def split_weights(self) -> list[float]:
        """Normalised [train, valid, test] weights of `split`."""
        return parse_split(self.split)

    @property
    def blend_weights(self) -> list[float]:
        """Normalised weights of `blend` (empty in mock mode)."""
        return normalize_weights([w for w, _ in self.blend]) if self.blend else []

    @property
    def eod(self) -> Optional[int]:
        """The end-of-document id used for masks (mock mode defaults it to vocab_size - 1)."""
        if self.eod_token_id is None and self.mock:
            return self.vocab_size - 1
        return self.eod_token_id


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_pair(item: object) -> object:
    """A (weight, prefix) list or tuple as a tuple; anything else as is (validation rejects it)."""
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return (item[0], item[1])
    return item
