"""HuggingFaceTokenizer / DeepSeekV2Tokenizer / GPT2BPETokenizer on tiny tokenizers made here."""

from __future__ import annotations

import json

import pytest

from megatron.training.tokenizer import (
    DeepSeekV2Tokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    TokenizerFileError,
)

TEXTS = [
    "The expert router sends each token to two experts.",
    "",
    "  leading spaces and trailing   ",
    "héllo wörld naïve café ✓ 12345",
    "line one\nline two\n\n\ttabbed",
    "special </s> and <s> inside text",
]


def _auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_hf_ids_are_autotokenizer_call(hf_dir, sentences):
    tok = HuggingFaceTokenizer(hf_dir)
    auto = _auto(hf_dir)
    texts = TEXTS + sentences[:50]
    for t in texts:
        assert tok.tokenize(t) == auto(t).input_ids
    assert tok.tokenize_batch(texts) == [auto(t).input_ids for t in texts]
    # The post-processor's bos comes first; eos is not appended.
    assert tok.tokenize("the model")[0] == tok.bos == auto.bos_token_id
    assert tok.eod == auto.eos_token_id and tok.eod not in tok.tokenize("the model")
    assert tok.pad == auto.pad_token_id
    assert tok.vocab_size == len(auto)
    assert tok.tokenize_batch([]) == []


def test_hf_batch_ignores_truncation_and_padding_like_call(hf_dir_truncating, sentences):
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(hf_dir_truncating / "tokenizer.json"))
    assert saved.truncation is not None and saved.padding is not None  # the settings a raw encode would apply
    tok = HuggingFaceTokenizer(hf_dir_truncating)
    auto = _auto(hf_dir_truncating)
    texts = TEXTS + sentences[:20]
    expected = [auto(t).input_ids for t in texts]
    assert max(len(e) for e in expected) > 6 and len(set(map(len, expected))) > 1
    assert [tok.tokenize(t) for t in texts] == expected
    assert tok.tokenize_batch(texts) == expected


def test_hf_detokenize(hf_dir):
    tok = HuggingFaceTokenizer(hf_dir)
    text = "The expert router sends each token."
    ids = tok.tokenize(text)
    assert tok.detokenize(ids[1:]) == text


def test_hf_missing_directory_names_path_and_flag(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(TokenizerFileError) as e:
        HuggingFaceTokenizer(missing)
    assert str(missing) in str(e.value) and "--tokenizer-model" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)


def test_hf_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "README.md").write_text("not a tokenizer")
    with pytest.raises(ValueError) as e:
        HuggingFaceTokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "--tokenizer-model" in str(e.value)


def test_deepseek_v2_adds_extra_vocab(hf_dir):
    base = HuggingFaceTokenizer(hf_dir)
    tok = DeepSeekV2Tokenizer(hf_dir, extra_vocab_size=37)
    assert tok.vocab_size == base.vocab_size + 37
    assert tok.eod == base.eod
    assert tok.tokenize(TEXTS[0]) == base.tokenize(TEXTS[0])
    assert tok.tokenize_batch(TEXTS) == base.tokenize_batch(TEXTS)
    assert DeepSeekV2Tokenizer(hf_dir).vocab_size == base.vocab_size
    with pytest.raises(ValueError, match="--extra-vocab-size"):
        DeepSeekV2Tokenizer(hf_dir, extra_vocab_size=-1)


def test_gpt2_tiny_vocab_merges(gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files
    tok = GPT2BPETokenizer(vocab_file, merge_file)
    assert tok.vocab_size == len(vocab) and tok.eod == 0
    assert tok.tokenize(" the") == [vocab["Ġthe"]]
    assert tok.tokenize("thing") == [vocab["t"], vocab["h"], vocab["ing"]]
    # Megatron's GPT-2 regex: contractions, letters, digits, other symbols, spaces.
    assert tok.tokenize("it's") == [vocab["i"], vocab["t"], vocab["'"], vocab["s"]]
    assert 0 not in tok.tokenize("<|endoftext|>")
    for t in TEXTS:
        assert tok.detokenize(tok.tokenize(t)) == t
    assert tok.tokenize_batch(TEXTS) == [tok.tokenize(t) for t in TEXTS]


def test_gpt2_merges_file_first_line_is_always_skipped(tmp_path, gpt2_files):
    """Megatron drops line 1 of merges.txt unconditionally (it expects the #version header)."""
    vocab_file, _, vocab = gpt2_files
    merges = tmp_path / "merges.txt"
    merges.write_text("h e\nĠ t\nĠt he\n", encoding="utf-8")  # no header: "h e" is lost
    tok = GPT2BPETokenizer(vocab_file, merges)
    assert tok.tokenize(" the") == [vocab["Ġt"], vocab["h"], vocab["e"]]


def test_gpt2_errors_name_the_flags(tmp_path, gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files
    with pytest.raises(TokenizerFileError, match="--vocab-file"):
        GPT2BPETokenizer(tmp_path / "missing.json", merge_file)
    with pytest.raises(TokenizerFileError, match="--merge-file"):
        GPT2BPETokenizer(vocab_file, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--vocab-file"):
        GPT2BPETokenizer(None, merge_file)
    no_eod = tmp_path / "vocab.json"
    no_eod.write_text(json.dumps({k: v for k, v in vocab.items() if k != "<|endoftext|>"}), encoding="utf-8")
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        GPT2BPETokenizer(no_eod, merge_file)
    not_json = tmp_path / "bad.json"
    not_json.write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match="--vocab-file"):
        GPT2BPETokenizer(not_json, merge_file)
