"""HuggingFaceTokenizer and GPT2BPETokenizer give exactly Megatron-LM's ids on the golden corpus.

The golden `{name}_eod_text_document` datasets were written by Megatron-LM's preprocess_data.py
with --append-eod, so sequence i is tokenize(doc_i) + [eod].
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.tokenizer import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    TokenizerConfig,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def gpt2_tokenizer(golden_dir: Path) -> GPT2BPETokenizer:
    d = golden_dir / "input" / "gpt2bpe"
    return GPT2BPETokenizer(d / "vocab.json", d / "merges.txt")


@pytest.fixture(scope="module")
def hf_tokenizer(golden_dir: Path) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(golden_dir / "input" / "tokenizer")


def _expected(golden_dir: Path, name: str) -> List[np.ndarray]:
    ds = IndexedDataset(str(golden_dir / f"{name}_eod_text_document"))
    try:
        return [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]
    finally:
        ds.close()


def _assert_matches(expected: List[np.ndarray], docs: List[str], ids: List[List[int]], eod: int, how: str) -> None:
    assert len(expected) == len(docs) == len(ids) == 2270
    bad = [i for i, (exp, got) in enumerate(zip(expected, ids)) if not np.array_equal(exp, np.array(got + [eod]))]
    assert not bad, f"{how}: {len(bad)} of {len(docs)} documents differ from Megatron-LM, first {bad[:10]}"


@pytest.mark.parametrize("method", ["tokenize", "tokenize_batch"])
def test_gpt2bpe_matches_megatron(golden_dir, golden_docs, gpt2_tokenizer, method):
    expected = _expected(golden_dir, "gpt2bpe")
    if method == "tokenize":
        ids = [gpt2_tokenizer.tokenize(d) for d in golden_docs]
    else:
        ids = gpt2_tokenizer.tokenize_batch(golden_docs)
    _assert_matches(expected, golden_docs, ids, gpt2_tokenizer.eod, f"GPT2BPETokenizer.{method}")


@pytest.mark.parametrize("method", ["tokenize", "tokenize_batch"])
def test_hf_matches_megatron(golden_dir, golden_docs, hf_tokenizer, method):
    expected = _expected(golden_dir, "hf")
    if method == "tokenize":
        ids = [hf_tokenizer.tokenize(d) for d in golden_docs]
    else:
        ids = hf_tokenizer.tokenize_batch(golden_docs)
    _assert_matches(expected, golden_docs, ids, hf_tokenizer.eod, f"HuggingFaceTokenizer.{method}")


def test_golden_vocab_and_eod(gpt2_tokenizer, hf_tokenizer):
    assert gpt2_tokenizer.vocab_size == 4096 and gpt2_tokenizer.eod == 0
    assert hf_tokenizer.vocab_size == 4096 and hf_tokenizer.eod == 0


def test_gpt2bpe_endoftext_is_plain_text(gpt2_tokenizer, hf_tokenizer):
    """Megatron's GPT-2 BPE has no special tokens: '<|endoftext|>' in text is ordinary characters."""
    ids = gpt2_tokenizer.tokenize("a<|endoftext|>b")
    assert 0 not in ids and len(ids) > 3
    # The HF tokenizer of the same vocabulary does treat it as its eos token.
    assert 0 in hf_tokenizer.tokenize("a<|endoftext|>b")


def test_detokenize_round_trip(golden_docs, gpt2_tokenizer, hf_tokenizer):
    for doc in golden_docs[:50]:
        assert gpt2_tokenizer.detokenize(gpt2_tokenizer.tokenize(doc)) == doc
        assert hf_tokenizer.detokenize(hf_tokenizer.tokenize(doc)) == doc


def test_factory_builds_golden_tokenizers(golden_dir, golden_docs):
    d = golden_dir / "input"
    gpt2 = build_tokenizer(
        TokenizerConfig("GPT2BPETokenizer", vocab_file=str(d / "gpt2bpe" / "vocab.json"),
                        merge_file=str(d / "gpt2bpe" / "merges.txt"))
    )
    hf = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(d / "tokenizer")))
    assert isinstance(gpt2, GPT2BPETokenizer) and isinstance(hf, HuggingFaceTokenizer)
    # The two golden datasets hold the same ids: same vocabulary and merges, no added specials.
    assert gpt2.tokenize_batch(golden_docs[:100]) == hf.tokenize_batch(golden_docs[:100])
