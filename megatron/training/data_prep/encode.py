"""Turn batches of records into token arrays ready for `IndexedDatasetBuilder.add_raw`.

Why batches: Megatron tokenizes one document per call in a process pool, paying Python and
pickling overhead per document. Here a whole batch (about a megabyte of text) goes to
`tokenizer.tokenize_batch`, which Rust-backed tokenizers run on a thread pool, and the result is
assembled with vectorised numpy, so the Python work per document is a few list operations.

Semantics follow Megatron's tool exactly (the outputs must be byte-identical):
  * each text is tokenized on its own; a list value is a list of sentences;
  * sentences that tokenize to nothing are skipped;
  * with `append_eod`, eod is appended to the last sequence of every non-empty document;
  * a document with no tokens still closes a document (an empty entry in document_indices).

Texts longer than LONG_TEXT_CHARS are tokenized in pieces where the tokenizer supports it
(`tokenize_pieces`, cut only where the ids cannot change; see tokenizer/long_text.py), each
piece's ids packed into the output dtype at once, so memory stays a small multiple of the text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from megatron.training.data_prep.inputs import Value
from megatron.training.data_prep.sentences import SentenceSplitter, split_text

LONG_TEXT_CHARS = 1 << 20  # texts longer than this (characters) are tokenized piece by piece
PIECE_CHARS = 1 << 18  # characters per piece: the Rust tokenizer needs ~70 bytes per character of a call


@dataclass
class EncodedKey:
    """One key's share of a batch, in the layout `IndexedDatasetBuilder.add_raw` takes."""

    tokens: np.ndarray  # all tokens, in the output dtype
    lengths: np.ndarray  # int32, tokens per sequence (sentence, or whole document)
    doc_ends: np.ndarray  # int64, per document: sequences written after it, counted from the batch start

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


class TokenizeError(ValueError):
    """The tokenizer failed on one record; `position` is its index within the batch."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position

    def __reduce__(self):  # survive the trip back from a worker process
        return (TokenizeError, (self.position, str(self)))


def _packed(ids: Sequence[int], dtype: np.dtype) -> np.ndarray:
    try:
        return np.array(ids, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"token id does not fit the output dtype {np.dtype(dtype)}: {exc}") from exc


class TokenPieces(list):
    """The ids of one long text as a list of arrays of the output dtype, never concatenated on
    their own: `assemble` copies them once, straight into the batch's output array."""

    def __len__(self) -> int:  # tokens, not pieces, so that it counts like an id list
        return sum(int(piece.size) for piece in self)

    @property
    def pieces(self) -> int:
        return list.__len__(self)


IdSequence = Union[Sequence[int], TokenPieces]


def _fill(ids: Sequence[IdSequence], sent_lens: np.ndarray, eod_after: np.ndarray, eod: int, dtype: np.dtype) -> np.ndarray:
    """All tokens in order with eod after the sentences flagged in `eod_after`, written once into
    one array (a 200 MB document is not copied again for its eod)."""
    out = np.empty(int(sent_lens.sum()) + int(eod_after.sum()), dtype=dtype)
    pos = 0
    for ids_s, n, add_eod in zip(ids, sent_lens.tolist(), eod_after.tolist()):
        if isinstance(ids_s, TokenPieces):
            for piece in ids_s:
                out[pos : pos + piece.size] = piece
                pos += piece.size
        elif n:
            out[pos : pos + n] = _packed(ids_s, dtype)
            pos += n
        if add_eod:
            out[pos] = eod
            pos += 1
    assert pos == out.size
    return out


def assemble(
    ids: Sequence[IdSequence],
    sentences_per_doc: Optional[np.ndarray],
    eod: int,
    append_eod: bool,
    dtype: np.dtype,
) -> EncodedKey:
    """Pack token id lists (one per sentence, documents in order; long texts as TokenPieces)
    into numpy arrays.

    `sentences_per_doc` is None when every document is exactly one sentence (the common,
    fastest path). Empty sentences are dropped; eod goes after each non-empty document.
    """
    n_sent = len(ids)
    sent_lens = np.fromiter(map(len, ids), dtype=np.int64, count=n_sent)
    keep = sent_lens > 0
    kept_lens = sent_lens[keep]
    if sentences_per_doc is None:
        kept_per_doc = keep.astype(np.int64)
    else:
        doc_of_sentence = np.repeat(np.arange(len(sentences_per_doc)), sentences_per_doc)
        kept_per_doc = np.bincount(doc_of_sentence[keep], minlength=len(sentences_per_doc)).astype(np.int64)
    doc_ends = np.cumsum(kept_per_doc)
    last_seq = doc_ends[kept_per_doc > 0] - 1 if append_eod and kept_lens.size else np.zeros(0, dtype=np.int64)
    if any(isinstance(x, TokenPieces) for x in ids):
        eod_after = np.zeros(n_sent, dtype=bool)
        eod_after[np.flatnonzero(keep)[last_seq]] = True  # last kept sentence of each non-empty document
        flat = _fill(ids, sent_lens, eod_after, eod, dtype)
    else:
        try:
            flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(sent_lens.sum()))
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"token id does not fit the output dtype {np.dtype(dtype)}: {exc}") from exc
        if last_seq.size:
            token_ends = np.cumsum(kept_lens)[last_seq]  # insert eod right after it
            flat = np.insert(flat, token_ends, np.asarray(eod, dtype=dtype))
    if last_seq.size:
        kept_lens = kept_lens.copy()
        kept_lens[last_seq] += 1
    return EncodedKey(flat, kept_lens.astype(np.int32), doc_ends)


class BatchEncoder:
    """Sentence splitting (optional), tokenization and assembly of one batch of values.

    Used in-process (Rust tokenizers parallelise `tokenize_batch` on their own thread pool) and
    inside worker processes (tokenizers without a fast batch path, or punkt sentence splitting,
    which is pure Python).
    """

    def __init__(
        self, tokenizer, keys: Sequence[str], append_eod: bool, dtype: np.dtype, splitter: Optional[SentenceSplitter] = None
    ) -> None:
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.append_eod = append_eod
        self.dtype = np.dtype(dtype)
        self.splitter = splitter
        self.eod = tokenizer.eod if append_eod else 0

    def _sentences(self, values: List[Value]) -> tuple[List[str], Optional[np.ndarray]]:
        """Flat sentence list and sentences per document (None: one each, all strings)."""
        if self.splitter is None and all(type(v) is str for v in values):
            return values, None
        texts: List[str] = []
        counts = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if isinstance(value, str):
                parts = split_text(self.splitter, value) if self.splitter is not None else [value]
            else:
                parts = value  # already a list of sentences
            texts.extend(parts)
            counts[i] = len(parts)
        return texts, counts

    def _tokenize_long(self, text: str) -> IdSequence:
        """The ids of one long text, packed into the output dtype piece by piece."""
        pieces = self.tokenizer.tokenize_pieces(text, PIECE_CHARS)
        if pieces is None:  # this tokenizer cannot cut text without changing ids
            return self.tokenizer.tokenize(text)
        return TokenPieces(_packed(piece, self.dtype) for piece in pieces)

    def _tokenize_all(self, texts: List[str]) -> List[IdSequence]:
        long = [i for i, t in enumerate(texts) if len(t) > LONG_TEXT_CHARS]
        if not long:
            return self.tokenizer.tokenize_batch(texts)
        is_long = set(long)
        short = [i for i in range(len(texts)) if i not in is_long]
        out: List[IdSequence] = [[] for _ in texts]
        for i, ids in zip(short, self.tokenizer.tokenize_batch([texts[i] for i in short]) if short else []):
            out[i] = ids
        for i in long:
            out[i] = self._tokenize_long(texts[i])
        return out

    def _tokenize(self, texts: List[str], owners: Optional[np.ndarray]) -> List[IdSequence]:
        try:
            return self._tokenize_all(texts)
        except Exception as batch_error:  # find the record to name it
            for i, text in enumerate(texts):
                try:
                    self.tokenizer.tokenize(text)
                except Exception as exc:
                    doc = int(np.searchsorted(np.cumsum(owners), i, side="right")) if owners is not None else i
                    raise TokenizeError(doc, f"tokenizer failed: {type(exc).__name__}: {exc}") from exc
            raise batch_error

    def encode(self, values: Dict[str, List[Value]]) -> Dict[str, EncodedKey]:
        out: Dict[str, EncodedKey] = {}
        for key in self.keys:
            texts, counts = self._sentences(values[key])
            ids = self._tokenize(texts, counts) if texts else []
            out[key] = assemble(ids, counts, self.eod, self.append_eod, self.dtype)
        return out


def configure_thread_pool(workers: int) -> None:
    """Size the Rust tokenizers' thread pool: rayon reads RAYON_NUM_THREADS once, when the pool is
    first used, so this must run before the first batch is tokenized in this process."""
    os.environ["RAYON_NUM_THREADS"] = str(max(1, workers))
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"


def has_fast_batch(tokenizer) -> bool:
    """Whether the tokenizer's `tokenize_batch` spreads over threads by itself (Rust-backed ones
    override it and parallelise it, unless they say `parallel_batch = False`, as the word-cache
    path does); otherwise `--workers` is served by worker processes."""
    from megatron.training.tokenizer.base import MegatronTokenizer

    impl = getattr(type(tokenizer), "tokenize_batch", None)
    overridden = impl is not None and impl is not MegatronTokenizer.tokenize_batch
    return overridden and bool(getattr(tokenizer, "parallel_batch", True))
