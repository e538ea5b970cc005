"""Long texts tokenized in bounded pieces give exactly the ids of whole-text tokenization, for
HF byte-level BPE, GPT-2 BPE, SentencePiece (GPT and Llama-2) and tiktoken (Llama-3), on texts
with and without newlines; texts with no usable cut are tokenized whole."""

from __future__ import annotations

import base64
import random

import pytest

from megatron.training.tokenizer import (
    GPT2BPETokenizer,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    Llama3Tokenizer,
)
from megatron.training.tokenizer.long_text import DROP_SPACE, KEEP_SPACE, split_long_text

WORDS = ("the of and to in is was model token expert layer router, gate. attention (mixture) sparse; dense "
         "rope: scale norm loss! batch? héllo wörld naïve café 12345 3.14 e.g. don't it's x_y").split()


def long_text(n_words: int, newlines: bool, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS))
        if newlines and rng.random() < 0.05:
            parts.append(rng.choice(["\n", "\n\n", " \n", "\n\t", "\r\n", "  \n\n  "]))
        else:
            parts.append(rng.choice([" "] * 12 + ["  ", "\t"]))
    return "".join(parts)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    tokens = [bytes([b]) for b in range(256)] + [b"in", b"th", b"the", b" the", b"ing", b" t", b"ex", b" ex"]
    path = tmp_path_factory.mktemp("llama3long") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tokenizers_under_test(golden_dir, hf_dir, sp_model, sp_model_no_bos, tiktoken_file):
    g = golden_dir / "input"
    return {
        "hf_byte_level_golden": HuggingFaceTokenizer(g / "tokenizer"),
        "hf_with_bos_postprocessor": HuggingFaceTokenizer(hf_dir),
        "gpt2_bpe": GPT2BPETokenizer(g / "gpt2bpe" / "vocab.json", g / "gpt2bpe" / "merges.txt"),
        "sentencepiece": GPTSentencePieceTokenizer(sp_model),
        "sentencepiece_no_bos": GPTSentencePieceTokenizer(sp_model_no_bos),
        "llama2": Llama2Tokenizer(sp_model),
        "llama3_tiktoken": Llama3Tokenizer(tiktoken_file),
    }


@pytest.mark.parametrize("newlines", [False, True])
@pytest.mark.parametrize("name", ["hf_byte_level_golden", "hf_with_bos_postprocessor", "gpt2_bpe", "sentencepiece",
                                  "sentencepiece_no_bos", "llama2", "llama3_tiktoken"])
def test_pieces_equal_whole_text(tokenizers_under_test, name, newlines):
    tok = tokenizers_under_test[name]
    text = long_text(30_000, newlines, seed=len(name))
    pieces = tok.tokenize_pieces(text, piece_chars=3000)
    assert pieces is not None, f"{name} cannot cut long texts"
    pieces = list(pieces)
    assert [i for p in pieces for i in p] == tok.tokenize(text)
    if name != "llama3_tiktoken":  # Meta's own pieces are 400k characters
        assert len(pieces) > 20  # really cut: ~190k characters in pieces of ~3000
        assert max(len(p) for p in pieces) < 3000


def test_text_without_cuts_is_tokenized_whole(tokenizers_under_test):
    tok = tokenizers_under_test["gpt2_bpe"]
    text = "数据" * 5000 + " tail end"  # no ASCII letter-space-letter until the very end
    pieces = list(tok.tokenize_pieces(text, piece_chars=1000))
    assert [i for p in pieces for i in p] == tok.tokenize(text)


def test_split_modes_keep_or_drop_the_space():
    def encode_many(texts):
        return [[ord(c) for c in t] for t in texts]

    text = "alpha beta gamma delta epsilon zeta eta theta"
    assert list(split_long_text(text, KEEP_SPACE, lambda ts: [[len(t)] for t in ts], piece_chars=12)) == [text]
    keep = list(split_long_text(text, KEEP_SPACE, encode_many, piece_chars=12))
    assert "".join(keep) == text and len(keep) > 2 and all(p.startswith(" ") for p in keep[1:])
    drop = list(split_long_text(text, DROP_SPACE, lambda ts: [t.split() for t in ts], piece_chars=12))
    assert " ".join(drop) == text and len(drop) > 2


def test_hf_without_pre_tokenizer_is_not_cut(tmp_path, sentences):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())  # no pre-tokenizer: the whole text is one pre-token
    tk.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(str(tmp_path))
    assert HuggingFaceTokenizer(tmp_path).tokenize_pieces("a b " * 1000, 100) is None
