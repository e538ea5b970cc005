"""Megatron-compatible tokenizers.

Cheap to import: transformers, sentencepiece and tiktoken load only when a tokenizer that needs
them is built, and nothing here imports torch (the preprocessing tool runs without it).
"""

from .base import MegatronTokenizer, padded_vocab_size
from ._files import TokenizerFileError
from .factory import TOKENIZER_TYPES, TokenizerConfig, build_tokenizer, build_tokenizer_and_padded_vocab
from .gpt2_bpe import GPT2BPETokenizer
from .huggingface import DeepSeekV2Tokenizer, HuggingFaceTokenizer
from .null_tokenizer import NullTokenizer
from .sentencepiece_tokenizer import GPTSentencePieceTokenizer, Llama2Tokenizer
from .tiktoken_tokenizer import Llama3Tokenizer

__all__ = [
    "MegatronTokenizer",
    "padded_vocab_size",
    "TokenizerFileError",
    "TOKENIZER_TYPES",
    "TokenizerConfig",
    "build_tokenizer",
    "build_tokenizer_and_padded_vocab",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "DeepSeekV2Tokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "Llama3Tokenizer",
    "NullTokenizer",
]
