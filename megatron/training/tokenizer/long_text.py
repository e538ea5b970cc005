"""Tokenizing very long texts in bounded pieces, with the ids of whole-text tokenization.

Why: one 200 MB document tokenized in one call holds the whole id list as Python ints (~36 bytes
per token) plus the tokenizer's own buffers, gigabytes in all. Cut into pieces of about
`piece_chars` characters, each piece's ids are packed into numpy as soon as they exist.

Where a cut is allowed: only at a place where the tokenizer's pre-tokenization already splits
and that context on either side cannot move, so the ids of the pieces concatenate to the ids of
the whole text. The cut candidates are right after an ASCII letter and before a single ASCII
space followed by an ASCII letter ("...word| word..."):
  * GPT-2 style byte-level BPE (GPT-2's regex, Llama-3/DeepSeek-style Split regexes): a letter
    run ends at a space, and " word" starts a new pre-token whatever came before it; the regexes
    have no look-behind and their only look-ahead (`\\s+(?!\\S)`) concerns whitespace runs, which
    a cut between a letter and a single space never splits;
  * SentencePiece (split by whitespace, dummy prefix): "▁word" starts a new piece; the cut drops
    the space there, because encoding the next piece adds the dummy prefix "▁" in its place
    (which variant a model needs is probed once, see `probe_cut_mode`).
Each cut is also verified where it is made: the ids of a window around it, encoded whole, must
equal the ids of its two halves; a candidate that fails is skipped for the next one. A text
without any usable cut (e.g. a long run of CJK characters) is tokenized whole, as before.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, List, Optional, Sequence

EncodeMany = Callable[[Sequence[str]], List[List[int]]]  # plain ids, no special tokens

PIECE_CHARS = 1 << 18  # characters per piece: ~64k tokens; a Rust encode call needs ~70 bytes per character
_CANDIDATE = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")
_SEARCH = 1 << 16  # characters searched back (then forward) from the target for a cut
_VERIFY = 200  # characters each side of a cut in the verification window

KEEP_SPACE = "keep-space"  # the next piece starts with the space ("...a| b...")
DROP_SPACE = "drop-space"  # the next piece starts after it; the tokenizer adds it back (dummy prefix)


def probe_cut_mode(encode_many: EncodeMany) -> Optional[str]:
    """How pieces must be cut for this tokenizer (KEEP_SPACE / DROP_SPACE), or None when neither
    reproduces whole-text ids on a probe text."""
    probe = "The model reads long documents and the tokens match exactly here"
    cut = probe.index(" and")
    whole, left, keep, drop = encode_many([probe, probe[:cut], probe[cut:], probe[cut + 1 :]])
    if left + keep == whole:
        return KEEP_SPACE
    if left + drop == whole:
        return DROP_SPACE
    return None


def _verified(text: str, cut: int, mode: str, encode_many: EncodeMany) -> bool:
    a, b = max(0, cut - _VERIFY), min(len(text), cut + 1 + _VERIFY)
    right = cut if mode == KEEP_SPACE else cut + 1
    whole, left, rest = encode_many([text[a:b], text[a:cut], text[right:b]])
    return left + rest == whole


def _find_cut(text: str, start: int, target: int, mode: str, encode_many: EncodeMany) -> Optional[int]:
    """A verified cut near `target` (> start): the last one before it, else the first after it."""
    low = max(start + 1, target - _SEARCH)
    for match in reversed(list(_CANDIDATE.finditer(text, low, target))):
        if _verified(text, match.start(), mode, encode_many):
            return match.start()
    position = target
    while position < len(text):
        window_end = min(len(text), position + _SEARCH)
        for match in _CANDIDATE.finditer(text, position, window_end):
            if _verified(text, match.start(), mode, encode_many):
                return match.start()
        position = window_end
    return None


def split_long_text(text: str, mode: str, encode_many: EncodeMany, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of `text` whose plain ids concatenate to the plain ids of `text` (see the module
    docstring); with DROP_SPACE the space at each cut is left out of both pieces."""
    start = 0
    while len(text) - start > piece_chars:
        cut = _find_cut(text, start, start + piece_chars, mode, encode_many)
        if cut is None:
            break
        yield text[start:cut]
        start = cut if mode == KEEP_SPACE else cut + 1
    yield text[start:]


def special_wrapping(encode_with_specials: Callable[[str], List[int]], encode_plain: Callable[[str], List[int]]
                     ) -> tuple[List[int], List[int]]:
    """(ids put before, ids put after) a text by a post-processor (e.g. bos, or Roberta's <s> </s>),
    found by locating a probe's plain ids inside its full encoding."""
    probe = "tokens"
    full, plain = encode_with_specials(probe), encode_plain(probe)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError("the tokenizer's post-processor does not keep the text's own ids together")


def iter_piece_ids(
    text: str, mode: str, encode_many: EncodeMany, piece_chars: int = PIECE_CHARS, group: int = 4
) -> Iterator[List[int]]:
    """Plain ids of `text`, piece by piece, `group` pieces per `encode_many` call (parallel in
    the Rust tokenizers) so that at most `group` pieces' ids exist at once."""
    batch: List[str] = []
    for piece in split_long_text(text, mode, encode_many, piece_chars):
        batch.append(piece)
        if len(batch) == group:
            yield from encode_many(batch)
            batch = []
    if batch:
        yield from encode_many(batch)
