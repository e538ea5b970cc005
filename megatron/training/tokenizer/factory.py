"""Build a tokenizer from Megatron's tokenizer flags, and the model's padded vocabulary size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .base import MegatronTokenizer, padded_vocab_size
from .gpt2_bpe import GPT2BPETokenizer
from .huggingface import DeepSeekV2Tokenizer, HuggingFaceTokenizer
from .null_tokenizer import NullTokenizer
from .sentencepiece_tokenizer import GPTSentencePieceTokenizer, Llama2Tokenizer
from .tiktoken_tokenizer import Llama3Tokenizer


@dataclass(frozen=True)
class TokenizerConfig:
    """The tokenizer flags (`--tokenizer-type`, `--tokenizer-model`, ...), picklable for worker processes."""

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    extra_vocab_size: int = 0
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1


def _need(config: TokenizerConfig, field: str) -> str:
    value = getattr(config, field)
    if value is None or value == "":
        flag = "--" + field.replace("_", "-")
        raise ValueError(f"--tokenizer-type {config.tokenizer_type} needs {flag}")
    return value


def _hf(c: TokenizerConfig) -> MegatronTokenizer:
    return HuggingFaceTokenizer(_need(c, "tokenizer_model"))


def _gpt2(c: TokenizerConfig) -> MegatronTokenizer:
    return GPT2BPETokenizer(_need(c, "vocab_file"), _need(c, "merge_file"))


def _gpt_sp(c: TokenizerConfig) -> MegatronTokenizer:
    return GPTSentencePieceTokenizer(_need(c, "tokenizer_model"))


def _llama2(c: TokenizerConfig) -> MegatronTokenizer:
    return Llama2Tokenizer(_need(c, "tokenizer_model"))


def _llama3(c: TokenizerConfig) -> MegatronTokenizer:
    return Llama3Tokenizer(_need(c, "tokenizer_model"))


def _deepseek_v2(c: TokenizerConfig) -> MegatronTokenizer:
    return DeepSeekV2Tokenizer(_need(c, "tokenizer_model"), c.extra_vocab_size)


def _null(c: TokenizerConfig) -> MegatronTokenizer:
    return NullTokenizer(_need(c, "vocab_size"))


_BUILDERS: Dict[str, Callable[[TokenizerConfig], MegatronTokenizer]] = {
    "HuggingFaceTokenizer": _hf,
    "GPT2BPETokenizer": _gpt2,
    "GPTSentencePieceTokenizer": _gpt_sp,
    "Llama2Tokenizer": _llama2,
    "Llama3Tokenizer": _llama3,
    "DeepSeekV2Tokenizer": _deepseek_v2,
    "NullTokenizer": _null,
}

#: Accepted `--tokenizer-type` values (Megatron's names).
TOKENIZER_TYPES: Tuple[str, ...] = tuple(_BUILDERS)


def build_tokenizer(config: TokenizerConfig) -> MegatronTokenizer:
    """The tokenizer `config.tokenizer_type` names, built from the files the config points to."""
    kind = config.tokenizer_type
    if kind is None or kind == "":
        raise ValueError(f"--tokenizer-type is required; choose one of {', '.join(TOKENIZER_TYPES)}")
    builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise ValueError(f"--tokenizer-type {kind!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}")
    return builder(config)


def build_tokenizer_and_padded_vocab(config: TokenizerConfig) -> Tuple[MegatronTokenizer, int]:
    """The tokenizer and the embedding size the model uses (vocab size rounded up, Megatron's padding)."""
    tokenizer = build_tokenizer(config)
    padded = padded_vocab_size(
        tokenizer.vocab_size, config.make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )
    return tokenizer, padded


__all__ = ["TokenizerConfig", "TOKENIZER_TYPES", "build_tokenizer", "build_tokenizer_and_padded_vocab"]
