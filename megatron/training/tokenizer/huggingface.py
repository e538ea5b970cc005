"""Tokenizers loaded from a local Hugging Face tokenizer directory (`--tokenizer-model DIR`).

Ids match Megatron's `_HuggingFaceTokenizer`: `AutoTokenizer.from_pretrained(dir)(text).input_ids`,
so special tokens are added exactly as the tokenizer's own post-processor adds them.
`transformers` is imported only when one of these classes is built.
"""

from __future__ import annotations

import copy
import os
from typing import Any, List, Optional, Sequence

from .base import MegatronTokenizer
from ._files import TokenizerFileError, require_dir

_FLAG = "--tokenizer-model"


def _load_auto_tokenizer(path: str, **kwargs: Any) -> Any:
    """Load `path` with AutoTokenizer, offline, turning loader failures into a clear ValueError."""
    require_dir(path, _FLAG, "Hugging Face tokenizer directory")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a requirement
        raise ImportError(
            "The HuggingFace tokenizers need the `transformers` package: pip install transformers"
        ) from e
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        files = sorted(os.listdir(path))
        raise ValueError(
            f"{_FLAG} {path!r}: could not load a Hugging Face tokenizer from this directory "
            f"(files: {files[:20]}); it needs tokenizer.json or the slow tokenizer's files "
            f"plus tokenizer_config.json. Loader said: {e}"
        ) from e


def _batch_backend(tok: Any) -> Any:
    """A private copy of the Rust tokenizer set up as `tok(text)` sets it, or None.

    None when `tok` is not a plain fast tokenizer (a subclass that overrides how text is encoded,
    or a pure-Python tokenizer); tokenize_batch then falls back to one call per text.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not getattr(tok, "is_fast", False):
        return None
    from transformers import PreTrainedTokenizerFast

    for name in ("__call__", "_encode_plus", "_batch_encode_plus", "_call_one", "encode_plus"):
        if getattr(type(tok), name, None) is not getattr(PreTrainedTokenizerFast, name, None):
            return None
    backend = copy.deepcopy(backend)
    # `tok(text)` with default arguments neither truncates nor pads.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
    return backend


class HuggingFaceTokenizer(MegatronTokenizer):
    """Megatron's `HuggingFaceTokenizer`: any tokenizer AutoTokenizer can load from a local directory."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        self.path = os.fspath(path) if path is not None else None
        self._tokenizer = _load_auto_tokenizer(self.path, **kwargs)
        self._backend = _batch_backend(self._tokenizer)
        self._vocab_size = len(self._tokenizer)

    @property
    def tokenizer(self) -> Any:
        """The underlying transformers tokenizer."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict:
        return self._tokenizer.get_vocab()

    @property
    def eod(self) -> int:
        eos = self._tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"the tokenizer in {_FLAG} {self.path!r} defines no eos_token, which Megatron uses as "
                "the end-of-document id (--append-eod, attention/loss masks); set eos_token in its "
                "tokenizer_config.json"
            )
        return int(eos)

    @property
    def bos(self) -> Optional[int]:
        return self._tokenizer.bos_token_id

    @property
    def pad(self) -> Optional[int]:
        return self._tokenizer.pad_token_id

    def tokenize(self, text: str) -> List[int]:
        return list(self._tokenizer(text).input_ids)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """One call into the Rust tokenizer for the whole list (it parallelises over texts)."""
        texts = list(texts)
        if not texts:
            return []
        if self._backend is None:
            return [self.tokenize(t) for t in texts]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"tokenize_batch expects strings, got {type(t).__name__}")
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets; same ids.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = encode(texts, add_special_tokens=True)
        return [e.ids for e in encodings]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


class DeepSeekV2Tokenizer(HuggingFaceTokenizer):
    """DeepSeek-V2/V3 tokenizer directory plus `--extra-vocab-size` unused ids reserved in the model.

    DeepSeek checkpoints have more embedding rows than tokenizer entries; the extra ids make the
    tokenizer's vocab size reach the model's.
    """

    def __init__(self, path: str | os.PathLike, extra_vocab_size: int = 0, **kwargs: Any) -> None:
        if isinstance(extra_vocab_size, bool) or not isinstance(extra_vocab_size, int) or extra_vocab_size < 0:
            raise ValueError(f"--extra-vocab-size must be an integer >= 0, got {extra_vocab_size!r}")
        super().__init__(path, **kwargs)
        self.extra_vocab_size = extra_vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size + self.extra_vocab_size


__all__ = ["HuggingFaceTokenizer", "DeepSeekV2Tokenizer", "TokenizerFileError"]
