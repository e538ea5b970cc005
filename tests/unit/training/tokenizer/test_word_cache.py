"""The word cache in front of byte-level BPE gives the Rust tokenizer's ids exactly: tricky ASCII
(whitespace runs, contractions, digits, punctuation), and texts it must leave to Rust (non-ASCII,
control characters, added tokens in the text); a full cache is emptied, not grown."""

from __future__ import annotations

import random

import pytest

from megatron.training.tokenizer import GPT2BPETokenizer, HuggingFaceTokenizer
from megatron.training.tokenizer import word_cache
from megatron.training.tokenizer.word_cache import WordCacheEncoder, supports_word_cache

PIECES = ["the", "The", "model", "don't", "it's", "we're", "I'm", "they'll", "you've", "he'd", "'s", "'", "x'S",
          "42", "3.14", "2024-11-30", "a1b2", "__init__", "e.g.", "(", ")", "!?", "--", "...", "\"quoted\"",
          " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "\t\t ", "    \n  ", "", "x"]
OTHER = ["héllo", "数据", "\x0b", "\x0c", "\x1c", "\x00", "\u00a0", "\u2028", "<|endoftext|>", "</s>", "<s>", "\x85"]


def texts(n: int, seed: int, other: bool):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(PIECES + (OTHER if other and rng.random() < 0.3 else [])) for _ in range(rng.randint(0, 40))]
        out.append("".join(parts) if rng.random() < 0.5 else " ".join(parts))
    return out + ["", " ", "\n", "   leading", "trailing   ", "a  b   c\n\n d"]


@pytest.fixture(scope="module")
def byte_level(golden_dir, hf_dir):
    g = golden_dir / "input"
    return {"hf_golden": HuggingFaceTokenizer(g / "tokenizer"), "hf_bos": HuggingFaceTokenizer(hf_dir),
            "gpt2": GPT2BPETokenizer(g / "gpt2bpe" / "vocab.json", g / "gpt2bpe" / "merges.txt")}


@pytest.mark.parametrize("name", ["hf_golden", "hf_bos", "gpt2"])
@pytest.mark.parametrize("other", [False, True])
def test_word_cache_equals_rust(byte_level, name, other):
    tok = byte_level[name]
    assert tok._words is not None and tok.parallel_batch is False
    batch = texts(400, seed=len(name) + other, other=other)
    expected = [tok.tokenize(t) for t in batch]  # the Rust tokenizer, one text at a time
    assert tok.tokenize_batch(batch) == expected
    assert tok.tokenize_batch(batch) == expected  # warm cache
    if other:
        assert not all(tok._words.applies(t) for t in batch)


def test_full_cache_is_emptied(byte_level, monkeypatch):
    tok = byte_level["gpt2"]
    monkeypatch.setattr(word_cache, "MAX_CACHED_WORDS", 50)
    fresh = WordCacheEncoder(tok._encode_rust, [])
    batch = texts(200, seed=9, other=False)
    assert fresh.encode(batch) == [tok.tokenize(t) for t in batch]
    assert len(fresh.cache) <= 50 + max(len(set(word_cache.GPT2_ASCII_PATTERN.findall(t))) for t in batch)


def test_other_pipelines_do_not_use_it(tmp_path, sentences):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert supports_word_cache(tk)
    tk.normalizer = normalizers.Lowercase()
    assert not supports_word_cache(tk)
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not supports_word_cache(tk)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    assert not supports_word_cache(tk)
