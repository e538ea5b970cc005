"""Helpers for the preprocessing tool tests: small tokenizers, generated records and a plain
reference of Megatron's semantics to compare outputs against."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
GOLDEN = os.path.join(REPO_ROOT, "tests", "data", "golden", "preprocess")

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.training.tokenizer.base import MegatronTokenizer  # noqa: E402


class WordTokenizer(MegatronTokenizer):
    """Pure-Python stand-in: one id per whitespace-separated word, derived from its characters;
    eod 0. It does not override tokenize_batch, so `--workers > 1` uses worker processes."""

    @property
    def vocab_size(self) -> int:
        return 1000

    @property
    def eod(self) -> int:
        return 0

    def tokenize(self, text: str) -> List[int]:
        if "\x00BOOM" in text:  # lets tests make the tokenizer fail on one record
            raise RuntimeError("cannot tokenize this")
        return [1 + sum(map(ord, word)) % 999 for word in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))


class FastWordTokenizer(WordTokenizer):
    """Same ids, with a batch path: exercises the in-process (threaded) executor."""

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]


class BigVocabTokenizer(FastWordTokenizer):
    """Same ids, but a vocabulary that needs int32 tokens."""

    @property
    def vocab_size(self) -> int:
        return 100_000


def reference_encode(
    records: Sequence[Dict], key: str, tokenizer: MegatronTokenizer, append_eod: bool, splitter=None
) -> tuple[List[List[int]], List[int]]:
    """Megatron's semantics, written plainly: sequences (token lists) and document_indices."""
    sequences: List[List[int]] = []
    doc_idx = [0]
    for record in records:
        value = record[key]
        if isinstance(value, list):
            sentences = value
        elif splitter is not None:
            sentences = splitter.tokenize(value)
        else:
            sentences = [value]
        doc = [ids for ids in (tokenizer.tokenize(s) for s in sentences) if ids]
        if doc and append_eod:
            doc[-1] = doc[-1] + [tokenizer.eod]
        sequences.extend(doc)
        doc_idx.append(len(sequences))
    return sequences, doc_idx


def read_dataset(prefix: str) -> tuple[List[List[int]], List[int], np.dtype]:
    ds = IndexedDataset(prefix)
    sequences = [ds[i].tolist() for i in range(len(ds))]
    doc_idx = ds.document_indices.tolist()
    dtype = ds.dtype
    ds.close()
    return sequences, doc_idx, dtype


def write_jsonl(path: str, records: Sequence[Dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega the of and to in is was for on that with as").split()


def make_records(n: int, seed: int = 0) -> List[Dict]:
    """Documents of 0-60 words, some empty, some list-valued (pre-split sentences)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(0, 60)))
        text = " ".join(words)
        if i % 7 == 3:
            text = ""
        value = text
        if i % 5 == 2:
            value = [text[: len(text) // 2], "", text[len(text) // 2 :]]
        records.append({"text": value, "title": f"doc {i} " + " ".join(words[:3]), "id": i})
    return records


# Fixtures; test modules import them by name (no conftest.py, so nothing leaks into the other
# tests that share this folder).


@pytest.fixture(scope="session")
def golden_dir() -> str:
    assert os.path.isdir(GOLDEN), f"golden preprocessing outputs missing from the repository: {GOLDEN}"
    return GOLDEN


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory) -> tuple[str, str]:
    """A small byte-level BPE (GPT-2 format vocab.json + merges.txt) trained on generated words, so
    tests that run the CLI as a subprocess need neither the golden files nor transformers."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2bpe")
    rng = np.random.default_rng(1)
    corpus = [" ".join(rng.choice(WORDS, size=40)) for _ in range(300)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(folder))
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(autouse=True)
def _restore_tokenizer_env():
    """The tool sizes the tokenizer thread pool through environment variables; keep other tests
    in the same session unaffected."""
    saved = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
