"""Tokenizer flags -> the tokenizer package's TokenizerConfig (the tokenizer section of a run).

The tokenizer package is imported lazily here so that parsing arguments stays cheap.
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple


def tokenizer_types() -> Tuple[str, ...]:
    from megatron.training.tokenizer import TOKENIZER_TYPES

    return tuple(TOKENIZER_TYPES)


def tokenizer_file_requirements(tokenizer_type: str) -> Tuple[Tuple[str, str, str], ...]:
    """(TokenizerConfig field, flag, "file" | "dir") that the tokenizer's builder will open, so a
    wrong path fails at parse time instead of after the cluster job has started."""
    model_dir = (("tokenizer_model", "--tokenizer-model", "dir"),)
    model_file = (("tokenizer_model", "--tokenizer-model", "file"),)
    return {
        "HuggingFaceTokenizer": model_dir,
        "DeepSeekV2Tokenizer": model_dir,
        "GPTSentencePieceTokenizer": model_file,
        "Llama2Tokenizer": model_file,
        "Llama3Tokenizer": model_file,
        "GPT2BPETokenizer": (("vocab_file", "--vocab-file", "file"), ("merge_file", "--merge-file", "file")),
    }.get(tokenizer_type, ())


def tokenizer_config_from_flags(v: Mapping[str, Any]):
    """The TokenizerConfig of the flags; every flag-level problem is a one-line ValueError."""
    from megatron.training.tokenizer import TokenizerConfig

    kind = v["tokenizer_type"]
    if kind is None:
        raise ValueError(f"--tokenizer-type is required; choose one of {', '.join(tokenizer_types())}")
    if v["make_vocab_size_divisible_by"] < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {v['make_vocab_size_divisible_by']}")
    if v["extra_vocab_size"] < 0:
        raise ValueError(f"--extra-vocab-size must be >= 0, got {v['extra_vocab_size']}")
    if kind == "NullTokenizer" and (v["vocab_size"] is None or v["vocab_size"] < 1):
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size >= 1")
    for field, flag, _ in tokenizer_file_requirements(kind):
        if not v[field]:
            raise ValueError(f"--tokenizer-type {kind} needs {flag}")
    return TokenizerConfig(
        tokenizer_type=kind,
        tokenizer_model=v["tokenizer_model"],
        vocab_file=v["vocab_file"],
        merge_file=v["merge_file"],
        vocab_size=v["vocab_size"],
        extra_vocab_size=v["extra_vocab_size"],
        make_vocab_size_divisible_by=v["make_vocab_size_divisible_by"],
        tensor_model_parallel_size=v["tensor_model_parallel_size"],
    )
