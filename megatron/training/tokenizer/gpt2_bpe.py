"""GPT-2 byte-level BPE from `--vocab-file vocab.json` and `--merge-file merges.txt`.

Gives the ids of Megatron's `GPT2BPETokenizer` (OpenAI's GPT-2 encoder): GPT-2's regex
pre-tokenization, byte-to-unicode mapping, then BPE merges by rank. `<|endoftext|>` is only the
end-of-document id; inside text it is ordinary characters. Built on the Rust `tokenizers` library
so that `tokenize_batch` runs on several threads.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .base import MegatronTokenizer
from ._files import require_file
from .long_text import iter_piece_ids, probe_cut_mode
from .word_cache import WordCacheEncoder, supports_word_cache

EOD_TOKEN = "<|endoftext|>"


def read_gpt2_vocab(vocab_file: str) -> Dict[str, int]:
    """vocab.json: a JSON object mapping each byte-level token string to its id."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file!r} is not a JSON file: {e}") from e
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise ValueError(f"--vocab-file {vocab_file!r} must be a JSON object mapping token strings to integer ids")
    return vocab


def read_gpt2_merges(merge_file: str) -> List[Tuple[str, str]]:
    """merges.txt as Megatron reads it.

    Megatron always drops the first line (the `#version` header) and whatever follows the last
    newline; we do the same so the same file gives the same merges. Lines that are not exactly
    two symbols can never match a pair, so they are skipped.
    """
    with open(merge_file, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:-1]
    merges = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


class GPT2BPETokenizer(MegatronTokenizer):
    """Megatron's `GPT2BPETokenizer` on the Rust BPE implementation."""

    def __init__(self, vocab_file: str | os.PathLike, merge_file: str | os.PathLike) -> None:
        self.vocab_file = require_file(vocab_file, "--vocab-file", "GPT-2 BPE vocab.json")
        self.merge_file = require_file(merge_file, "--merge-file", "GPT-2 BPE merges.txt")
        vocab = read_gpt2_vocab(self.vocab_file)
        if EOD_TOKEN not in vocab:
            raise ValueError(f"--vocab-file {self.vocab_file!r} has no {EOD_TOKEN!r} entry, the end-of-document token")
        merges = read_gpt2_merges(self.merge_file)

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as e:  # the Rust side raises a plain Exception for inconsistent files
            raise ValueError(
                f"--vocab-file {self.vocab_file!r} and --merge-file {self.merge_file!r} do not fit together: {e}"
            ) from e
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer = tokenizer
        self._vocab = vocab
        self._eod = vocab[EOD_TOKEN]
        self._cut_mode: Optional[str] = None
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self._words = WordCacheEncoder(self._encode_rust, added) if supports_word_cache(tokenizer) else None
        # the word cache runs under the GIL: --workers then means worker processes
        self.parallel_batch = self._words is None

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"tokenize expects a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_rust(self, texts: Sequence[str]) -> List[List[int]]:
        """One call into Rust for the whole list (parallel over texts)."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets; same ids.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Through the word cache (see word_cache.py), or one Rust call for the whole list."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"tokenize_batch expects strings, got {type(t).__name__}")
        return self._words.encode(texts) if self._words is not None else self._encode_rust(texts)

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        """GPT-2's regex splits "word| word": see long_text.py."""
        if self._cut_mode is None:
            self._cut_mode = probe_cut_mode(self.tokenize_batch) or ""
        return iter_piece_ids(text, self._cut_mode, self.tokenize_batch, piece_chars) if self._cut_mode else None

    def detokenize(self, ids: Sequence[int]) -> str:
        """Bytes of the tokens decoded as UTF-8, invalid sequences replaced (Megatron's errors="replace")."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


__all__ = ["GPT2BPETokenizer", "read_gpt2_vocab", "read_gpt2_merges"]
