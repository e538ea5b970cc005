"""Long documents are tokenized in pieces (tokenizer.tokenize_pieces) and the output files are
byte-identical to whole-document tokenization, with both executors."""

from __future__ import annotations

import random

import pytest

from tests.unit.tools.preprocess_testlib import (  # noqa: F401  (fixtures are used by name)
    _restore_tokenizer_env,
    golden_dir,
    write_jsonl,
)
from megatron.training.data_prep import encode
from megatron.training.tokenizer import GPT2BPETokenizer, HuggingFaceTokenizer
from tools import preprocess_data

WORDS = "the of and to in model token expert layer, router. gate attention: sparse (dense) héllo 42".split()


def _records(seed: int):
    rng = random.Random(seed)
    records = []
    for i in range(24):
        n = rng.choice([5, 50, 3000, 6000])
        sep = (lambda: rng.choice([" "] * 9 + ["\n", "\n\n "])) if i % 2 else (lambda: " ")
        records.append({"text": "".join(rng.choice(WORDS) + sep() for _ in range(n))})
    records[3]["text"] = ""
    records[5]["text"] = [records[4]["text"], records[6]["text"]]  # a list of sentences, both long
    return records


@pytest.mark.parametrize("kind", ["hf", "gpt2bpe"])
@pytest.mark.parametrize("workers,executor", [(1, "threads"), (2, "threads"), (2, "processes")])
def test_long_documents_in_pieces_are_byte_identical(golden_dir, tmp_path, monkeypatch, kind, workers, executor):
    g = f"{golden_dir}/input"
    tok = (HuggingFaceTokenizer(f"{g}/tokenizer") if kind == "hf"
           else GPT2BPETokenizer(f"{g}/gpt2bpe/vocab.json", f"{g}/gpt2bpe/merges.txt"))
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records(workers))
    argv = ["--input", data, "--tokenizer-type", "X", "--append-eod", "--workers", workers, "--executor", executor]
    assert preprocess_data.main([str(a) for a in argv + ["--output-prefix", tmp_path / "whole"]], tokenizer=tok) == 0
    calls = []
    real = type(tok).tokenize_pieces

    def spy(self, text, piece_chars):
        calls.append(len(text))
        return real(self, text, piece_chars)

    monkeypatch.setattr(type(tok), "tokenize_pieces", spy)
    monkeypatch.setattr(encode, "LONG_TEXT_CHARS", 10_000)
    monkeypatch.setattr(encode, "PIECE_CHARS", 2_000)
    assert preprocess_data.main([str(a) for a in argv + ["--output-prefix", tmp_path / "pieces"]], tokenizer=tok) == 0
    if executor == "threads":  # worker processes call it in their own memory
        assert len(calls) >= 5
    for ext in (".bin", ".idx"):
        whole = (tmp_path / f"whole_text_document{ext}").read_bytes()
        assert whole == (tmp_path / f"pieces_text_document{ext}").read_bytes(), ext


@pytest.mark.parametrize("append_eod", [False, True])
def test_assemble_with_token_pieces_equals_lists(append_eod):
    import numpy as np

    rng = np.random.default_rng(7)
    ids = [list(rng.integers(1, 500, size=int(rng.integers(0, 6)))) for _ in range(40)]
    per_doc = np.array([4] * 10)
    expected = encode.assemble(ids, per_doc, 3, append_eod, np.dtype(np.uint16))
    mixed = [encode.TokenPieces([np.array(x[:2], np.uint16), np.array(x[2:], np.uint16)]) if i % 3 == 0 else x
             for i, x in enumerate(ids)]
    got = encode.assemble(mixed, per_doc, 3, append_eod, np.dtype(np.uint16))
    assert got.tokens.tolist() == expected.tokens.tolist()
    assert got.lengths.tolist() == expected.lengths.tolist() and got.doc_ends.tolist() == expected.doc_ends.tolist()
