"""Llama-3 tokenizer on tiktoken (`--tokenizer-model tokenizer.model`, Meta's BPE ranks file).

Follows Meta's reference tokenizer that Megatron's `Llama3Tokenizer` wraps: Llama-3's split regex,
256 special tokens numbered after the BPE ranks, special-token text recognised in the input,
bos (`<|begin_of_text|>`) in front, no eos; eod is `<|end_of_text|>`. Long texts are cut the way
Meta's encoder cuts them (400k-character chunks, runs of at most 25k whitespace or non-whitespace
characters) since tiktoken's regex is slow on huge runs, and the cuts change the ids.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .base import MegatronTokenizer
from ._files import require_file

_FLAG = "--tokenizer-model"

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def llama3_special_tokens(count: int = NUM_RESERVED_SPECIAL_TOKENS) -> List[str]:
    """The special tokens in Meta's order; their ids follow the BPE ranks in this order."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    # Reserved tokens 0..4 are among the named ones; the rest continue from 5.
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, count - 5)]


def load_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token bytes) rank` pair per line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks: Dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token = base64.b64decode(parts[0], validate=True)
            ranks[token] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ValueError(
                f"{_FLAG} {path!r} line {lineno} is not a tiktoken 'base64-token rank' line ({e}): {line[:80]!r}"
            ) from e
    if not ranks:
        raise ValueError(f"{_FLAG} {path!r} holds no BPE ranks")
    return ranks


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut `text` inside every run of more than `max_run` whitespace (or non-whitespace) characters.

    Cuts fall at run start + k * max_run, as in Meta's encoder; text without such runs is one piece.
    """
    if len(text) <= max_run:
        yield text
        return
    start = 0
    for run in re.finditer(r"\s+|\S+", text):
        a, b = run.span()
        for cut in range(a + max_run, b, max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def iter_llama3_pieces(text: str) -> Iterator[str]:
    """The pieces Meta's encoder tokenizes separately: 400k-char chunks, each split by split_long_runs."""
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        yield from split_long_runs(text[i : i + MAX_ENCODE_CHARS])


def llama3_pieces(text: str) -> List[str]:
    return list(iter_llama3_pieces(text))


class Llama3Tokenizer(MegatronTokenizer):
    """Megatron's `Llama3Tokenizer`: tiktoken BPE with Meta's Llama-3 special tokens."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self.model_file = require_file(model_file, _FLAG, "Llama-3 tiktoken BPE file (tokenizer.model)")
        ranks = load_tiktoken_ranks(self.model_file)
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - tiktoken is a requirement
            raise ImportError("Llama3Tokenizer needs the `tiktoken` package: pip install tiktoken") from e
        base = len(ranks)
        self.special_tokens: Dict[str, int] = {t: base + i for i, t in enumerate(llama3_special_tokens())}
        try:
            self._model = tiktoken.Encoding(
                name=os.path.basename(self.model_file),
                pat_str=LLAMA3_PATTERN,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
        except Exception as e:  # tiktoken's Rust core raises plain exceptions on bad ranks
            raise ValueError(f"{_FLAG} {self.model_file!r}: tiktoken rejected these BPE ranks: {e}") from e
        self._bos_id = self.special_tokens["<|begin_of_text|>"]
        self._eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.stop_tokens = {self._eos_id, self.eot_id}

    @property
    def model(self) -> Any:
        """The underlying tiktoken.Encoding."""
        return self._model

    @property
    def vocab_size(self) -> int:
        return int(self._model.n_vocab)

    @property
    def eod(self) -> int:
        return self._eos_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def bos(self) -> int:
        return self._bos_id

    @property
    def pad(self) -> None:
        """Llama-3 has no pad token (Meta's pad_id is -1)."""
        return None

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        """Text-completion default: bos first, no eos; special-token text in `text` becomes its id."""
        if not isinstance(text, str):
            raise ValueError(f"tokenize expects a string, got {type(text).__name__}")
        ids: List[int] = [self._bos_id] if bos else []
        for piece in llama3_pieces(text):
            ids.extend(self._model.encode(piece, allowed_special="all", disallowed_special=()))
        if eos:
            ids.append(self._eos_id)
        return ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """All pieces of all texts in one tiktoken batch call (threads), then regrouped per text."""
        texts = list(texts)
        pieces: List[str] = []
        counts: List[int] = []
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"tokenize_batch expects strings, got {type(t).__name__}")
            p = llama3_pieces(t)
            pieces.extend(p)
            counts.append(len(p))
        encoded = self._model.encode_batch(pieces, allowed_special="all", disallowed_special=()) if pieces else []
        out: List[List[int]] = []
        pos = 0
        for n in counts:
            ids = [self._bos_id]
            for e in encoded[pos : pos + n]:
                ids.extend(e)
            out.append(ids)
            pos += n
        return out

    def tokenize_pieces(self, text: str, piece_chars: int) -> Optional[Iterator[List[int]]]:
        """Meta's encoder already encodes 400k-character pieces on their own (and so do
        `tokenize`/`tokenize_batch`); here they are produced a few at a time."""
        if not isinstance(text, str):
            raise ValueError(f"tokenize expects a string, got {type(text).__name__}")

        def pieces() -> Iterator[List[int]]:
            yield [self._bos_id]
            group: List[str] = []
            for piece in iter_llama3_pieces(text):
                group.append(piece)
                if len(group) == 4:
                    yield from self._model.encode_batch(group, allowed_special="all", disallowed_special=())
                    group = []
            if group:
                yield from self._model.encode_batch(group, allowed_special="all", disallowed_special=())

        return pieces()

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.decode([int(i) for i in ids])


__all__ = ["Llama3Tokenizer", "load_tiktoken_ranks", "llama3_special_tokens", "split_long_runs", "LLAMA3_PATTERN"]
