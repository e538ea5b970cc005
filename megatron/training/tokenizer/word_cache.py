"""A word cache in front of GPT-2 style byte-level BPE, for plain ASCII text.

Why: the Rust tokenizers spend most of their time building per-token structures (token strings,
masks) around the BPE itself: ~0.38 CPU-seconds per MB of English text here, where splitting the
text with GPT-2's regex and looking each pre-token up in a dict of already-seen pre-tokens costs
~0.14. A BPE model (like WordPiece or Unigram) works on each pre-token on its own, so the ids of a
text are the concatenation of the ids of its pre-tokens, each of which the Rust tokenizer computes
once (a cache miss) on the pre-token alone.

When it applies (checked once per tokenizer, then per text):
  * the tokenizer has no normalizer and its pre-tokenizer is ByteLevel with GPT-2's regex and
    no prefix space (tokenizers without added tokens' text in the input);
  * the text is ASCII without control characters other than tab, newline and carriage return:
    there GPT-2's `\\p{L}`, `\\p{N}` and `\\s` are exactly [A-Za-z], [0-9] and [ \\t\\n\\r], so
    Python's `re` splits as the Rust regex does (any other text goes to the Rust tokenizer);
  * the text holds none of the tokenizer's added tokens (those are split out before the regex).
A pre-token encoded alone gives the same single pre-token (the regex has no look-behind, and its
only look-ahead, `\\s+(?!\\S)`, matches a whitespace pre-token whole at the end of a string), so
cached ids are the ids in context. The GIL holds during the lookups, so `--workers` uses worker
processes with this path (`BatchTokenizer.parallel_batch` is False).
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any, Callable, Dict, List, Optional, Sequence

GPT2_ASCII_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII
)
_UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")  # anything but printable ASCII, tab, newline, return
MAX_CACHED_WORDS = 500_000  # ~75 MB of keys and id lists; the dict is emptied when full


def supports_word_cache(backend: Any) -> bool:
    """Whether a Rust `tokenizers.Tokenizer` is no-normalizer GPT-2 byte-level BPE (see above)."""
    try:
        config = json.loads(backend.to_str())
    except Exception:  # not a serialisable Rust tokenizer
        return False
    pre = config.get("pre_tokenizer") or {}
    model = config.get("model") or {}
    return (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
    )


class WordCacheEncoder:
    """Plain ids (no special tokens) of texts through the word cache, the rest through Rust."""

    def __init__(self, encode_plain: Callable[[Sequence[str]], List[List[int]]], added_tokens: Sequence[str]) -> None:
        self.encode_plain = encode_plain  # Rust batch encode without special tokens
        self.added = [t for t in added_tokens if t]
        self.added_re = re.compile("|".join(map(re.escape, self.added))) if self.added else None
        self.cache: Dict[str, List[int]] = {}

    def applies(self, text: str) -> bool:
        return (text.isascii() and _UNSAFE.search(text) is None
                and (self.added_re is None or self.added_re.search(text) is None))

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        out: List[Optional[List[int]]] = [None] * len(texts)
        rust = [i for i, t in enumerate(texts) if not self.applies(t)]
        if rust:
            for i, ids in zip(rust, self.encode_plain([texts[i] for i in rust])):
                out[i] = ids
        cache, split, lookup = self.cache, GPT2_ASCII_PATTERN.findall, self.cache.__getitem__
        for i, text in enumerate(texts):
            if out[i] is not None:
                continue
            words = split(text)
            try:
                out[i] = list(chain.from_iterable(map(lookup, words)))  # C-speed when every word is known
            except KeyError:
                unique = set(words)
                if len(cache) + len(unique) > MAX_CACHED_WORDS:
                    cache.clear()
                missing = [w for w in unique if w not in cache]
                cache.update(zip(missing, self.encode_plain(missing)))
                out[i] = list(chain.from_iterable(map(lookup, words)))
        return out  # type: ignore[return-value]
