"""SentencePiece tokenizers (`--tokenizer-model file.model`): Megatron's GPT and Llama-2 variants.

`GPTSentencePieceTokenizer` encodes plain text (no bos/eos); `Llama2Tokenizer` puts bos in front,
as Llama-2 was trained. Both end documents with the model's eos piece.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator, List, Optional, Sequence

from .base import MegatronTokenizer
from ._files import require_file
from .long_text import iter_piece_ids, probe_cut_mode

_FLAG = "--tokenizer-model"


def _load_processor(model_file: str) -> Any:
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - sentencepiece is a requirement
        raise ImportError("SentencePiece tokenizers need the `sentencepiece` package: pip install sentencepiece") from e
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{_FLAG} {model_file!r} is not a SentencePiece model: {e}") from e
    return processor


def _check_texts(texts: Sequence[str]) -> List[str]:
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"tokenize expects strings, got {type(t).__name__}")
    return texts


class _SentencePieceBase(MegatronTokenizer):
    """Loading, vocabulary and decoding shared by the SentencePiece tokenizers."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self.model_file = require_file(model_file, _FLAG, "SentencePiece model")
        self._sp = _load_processor(self.model_file)
        self._bos_id = int(self._sp.bos_id())
        self._eos_id = int(self._sp.eos_id())
        self._pad_id = int(self._sp.pad_id())
        self._cut_mode: Optional[str] = None

    @property
    def processor(self) -> Any:
        """The underlying sentencepiece.SentencePieceProcessor."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def vocab(self) -> dict:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        if self._eos_id < 0:
            raise ValueError(
                f"SentencePiece model {self.model_file!r} has no eos piece (trained with eos_id=-1), "
                "but Megatron uses eos as the end-of-document id"
            )
        return self._eos_id

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> Optional[int]:
        return self._bos_id if self._bos_id >= 0 else None

    @property
    def pad(self) -> Optional[int]:
        """The model's pad id, None when it was trained without one (SentencePiece's -1)."""
        return self._pad_id if self._pad_id >= 0 else None

    def _encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"tokenize expects a string, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def _encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        texts = _check_texts(texts)
        if not texts:
            return []
        # SentencePiece encodes a list on its own C++ thread pool.
        return self._sp.encode(texts, out_type=int)

    def _plain_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        """Plain ids of `text` piece by piece, cut between whitespace-separated pieces (see
        long_text.py; the probe finds whether this model's dummy prefix replaces the space)."""
        if self._cut_mode is None:
            self._cut_mode = probe_cut_mode(self._encode_batch) or ""
        return iter_piece_ids(text, self._cut_mode, self._encode_batch, piece_chars) if self._cut_mode else None

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class GPTSentencePieceTokenizer(_SentencePieceBase):
    """Megatron's `GPTSentencePieceTokenizer`: plain SentencePiece ids, eod = eos."""

    def tokenize(self, text: str) -> List[int]:
        return self._encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._encode_batch(texts)

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        return self._plain_pieces(text, piece_chars)


class Llama2Tokenizer(_SentencePieceBase):
    """Megatron's `Llama2Tokenizer`: bos + SentencePiece ids (no eos), eod = eos."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        super().__init__(model_file)
        if self._bos_id < 0:
            raise ValueError(
                f"{_FLAG} {self.model_file!r}: Llama2Tokenizer needs a SentencePiece model with a bos piece "
                "(it starts every text with bos); use GPTSentencePieceTokenizer for models without one"
            )

    @property
    def bos(self) -> int:
        return self._bos_id

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        """Text-completion default: bos first, no eos (--append-eod adds eod)."""
        ids = self._encode(text)
        return ([self._bos_id] if bos else []) + ids + ([self.eod] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [[self._bos_id] + ids for ids in self._encode_batch(texts)]

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        pieces = self._plain_pieces(text, piece_chars)
        if pieces is None:
            return None
        return itertools.chain([[self._bos_id]], pieces)


__all__ = ["GPTSentencePieceTokenizer", "Llama2Tokenizer"]
