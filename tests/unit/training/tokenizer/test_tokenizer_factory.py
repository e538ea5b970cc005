"""build_tokenizer / TokenizerConfig, NullTokenizer, and the package's import hygiene."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import megatron.training.tokenizer as tokenizer_pkg
from megatron.training.tokenizer import (
    TOKENIZER_TYPES,
    DeepSeekV2Tokenizer,
    GPT2BPETokenizer,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    MegatronTokenizer,
    NullTokenizer,
    TokenizerConfig,
    TokenizerFileError,
    build_tokenizer,
    build_tokenizer_and_padded_vocab,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


def test_type_names_are_megatrons():
    assert set(TOKENIZER_TYPES) == {
        "HuggingFaceTokenizer",
        "GPT2BPETokenizer",
        "GPTSentencePieceTokenizer",
        "Llama2Tokenizer",
        "Llama3Tokenizer",
        "DeepSeekV2Tokenizer",
        "NullTokenizer",
    }


def test_null_tokenizer():
    tok = NullTokenizer(1000)
    assert tok.tokenize("1 2 3") == [1, 2, 3]
    assert tok.tokenize(" 4\t5\n6 ") == [4, 5, 6]
    assert tok.detokenize([1, 2, 3]) == "1 2 3"
    assert tok.eod == 1000 and tok.vocab_size == 1001
    assert tok.tokenize_batch(["1 2", "3"]) == [[1, 2], [3]]
    assert NullTokenizer("7").vocab_size == 8
    with pytest.raises(ValueError, match="integer ids"):
        tok.tokenize("1 two 3")
    for bad in (0, -5, 2.5, True, "x", None):
        with pytest.raises(ValueError, match="--vocab-size"):
            NullTokenizer(bad)


def test_config_is_frozen_and_picklable():
    config = TokenizerConfig("NullTokenizer", vocab_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vocab_size = 11  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(config)) == config
    assert config.extra_vocab_size == 0 and config.make_vocab_size_divisible_by == 128
    assert config.tensor_model_parallel_size == 1


def test_padded_vocab():
    tok, padded = build_tokenizer_and_padded_vocab(TokenizerConfig("NullTokenizer", vocab_size=1000))
    assert isinstance(tok, NullTokenizer) and padded == 1024
    _, padded = build_tokenizer_and_padded_vocab(
        TokenizerConfig("NullTokenizer", vocab_size=1000, tensor_model_parallel_size=3)
    )
    assert padded == 1152  # multiple of 128 * 3
    _, padded = build_tokenizer_and_padded_vocab(
        TokenizerConfig("NullTokenizer", vocab_size=1023, make_vocab_size_divisible_by=1)
    )
    assert padded == 1024


@pytest.mark.parametrize(
    "config, flag",
    [
        (TokenizerConfig("NoSuchTokenizer"), "--tokenizer-type"),
        (TokenizerConfig(None), "--tokenizer-type"),  # type: ignore[arg-type]
        (TokenizerConfig("HuggingFaceTokenizer"), "--tokenizer-model"),
        (TokenizerConfig("DeepSeekV2Tokenizer"), "--tokenizer-model"),
        (TokenizerConfig("GPTSentencePieceTokenizer"), "--tokenizer-model"),
        (TokenizerConfig("Llama2Tokenizer"), "--tokenizer-model"),
        (TokenizerConfig("Llama3Tokenizer"), "--tokenizer-model"),
        (TokenizerConfig("GPT2BPETokenizer", merge_file="m.txt"), "--vocab-file"),
        (TokenizerConfig("GPT2BPETokenizer", vocab_file="v.json"), "--merge-file"),
        (TokenizerConfig("NullTokenizer"), "--vocab-size"),
    ],
)
def test_bad_config_names_the_flag(config, flag):
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(config)


def test_missing_file_names_flag_and_path(tmp_path):
    missing = str(tmp_path / "nothing.model")
    with pytest.raises(TokenizerFileError) as e:
        build_tokenizer(TokenizerConfig("Llama3Tokenizer", tokenizer_model=missing))
    assert "--tokenizer-model" in str(e.value) and missing in str(e.value)


def test_factory_builds_each_type(hf_dir, sp_model, gpt2_files, tmp_path):
    vocab_file, merge_file, _ = gpt2_files
    built = {
        "HuggingFaceTokenizer": build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(hf_dir))),
        "DeepSeekV2Tokenizer": build_tokenizer(
            TokenizerConfig("DeepSeekV2Tokenizer", tokenizer_model=str(hf_dir), extra_vocab_size=5)
        ),
        "GPT2BPETokenizer": build_tokenizer(
            TokenizerConfig("GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file))
        ),
        "GPTSentencePieceTokenizer": build_tokenizer(
            TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=str(sp_model))
        ),
        "Llama2Tokenizer": build_tokenizer(TokenizerConfig("Llama2Tokenizer", tokenizer_model=str(sp_model))),
        "NullTokenizer": build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=50)),
    }
    expected = {
        "HuggingFaceTokenizer": HuggingFaceTokenizer,
        "DeepSeekV2Tokenizer": DeepSeekV2Tokenizer,
        "GPT2BPETokenizer": GPT2BPETokenizer,
        "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
        "Llama2Tokenizer": Llama2Tokenizer,
        "NullTokenizer": NullTokenizer,
    }
    for name, tok in built.items():
        assert type(tok) is expected[name] and isinstance(tok, MegatronTokenizer)
        assert isinstance(tok.vocab_size, int) and isinstance(tok.eod, int)
    hf = built["HuggingFaceTokenizer"]
    assert built["DeepSeekV2Tokenizer"].vocab_size == hf.vocab_size + 5


def test_public_names_exported():
    for name in tokenizer_pkg.__all__:
        assert hasattr(tokenizer_pkg, name), name


def test_import_is_cheap_and_torch_free(gpt2_files):
    """The preprocessing tool must run without torch; heavy libraries load only when needed."""
    vocab_file, merge_file, _ = gpt2_files
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now fails\n"
        "import megatron.training.tokenizer as t\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentencepiece', 'tiktoken', 'tokenizers') if sys.modules.get(m)]\n"
        "assert not heavy, heavy\n"
        "assert t.NullTokenizer(10).tokenize('1 2') == [1, 2]\n"
        f"tok = t.build_tokenizer(t.TokenizerConfig('GPT2BPETokenizer', vocab_file={str(vocab_file)!r}, "
        f"merge_file={str(merge_file)!r}))\n"
        "assert tok.tokenize(' the') and not sys.modules.get('transformers')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
