"""Llama3Tokenizer on a tiny tiktoken ranks file written here (256 bytes plus a few merges)."""

from __future__ import annotations

import base64
import random

import pytest

from megatron.training.tokenizer import Llama3Tokenizer, TokenizerFileError
from megatron.training.tokenizer.tiktoken_tokenizer import llama3_pieces, llama3_special_tokens, split_long_runs

MERGES = [b"in", b"th", b"the", b" the", b"ing", b" t"]
BASE = 256 + len(MERGES)  # first special id


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tok(ranks_file):
    return Llama3Tokenizer(ranks_file)


def test_special_token_layout(tok):
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    assert tok.vocab_size == BASE + 256
    assert tok.bos == BASE and tok.eod == tok.eos == BASE + 1
    assert tok.special_tokens["<|start_header_id|>"] == BASE + 6
    assert tok.special_tokens["<|end_header_id|>"] == BASE + 7
    assert tok.special_tokens["<|reserved_special_token_4|>"] == BASE + 8
    assert tok.eot_id == tok.special_tokens["<|eot_id|>"] == BASE + 9
    assert tok.special_tokens["<|reserved_special_token_5|>"] == BASE + 10
    assert tok.special_tokens["<|reserved_special_token_250|>"] == BASE + 255
    assert tok.pad is None


def test_tokenize_bpe_and_bos(tok):
    assert tok.tokenize(" the") == [tok.bos, 256 + 3]
    assert tok.tokenize("thing") == [tok.bos, 256 + 1, 256 + 4]
    assert tok.tokenize("") == [tok.bos]
    assert tok.tokenize("ab", bos=False, eos=True) == [ord("a"), ord("b"), tok.eod]
    # Special-token text in the input becomes the special id (Megatron passes allowed_special="all").
    assert tok.tokenize("a<|eot_id|>b") == [tok.bos, ord("a"), tok.eot_id, ord("b")]
    assert tok.tokenize("<|begin_of_text|>") == [tok.bos, tok.bos]


def test_round_trip_and_batch(tok):
    texts = ["The thing in the house", "", "héllo wörld ✓ 12345", "a\n\n  b\t<|end_of_text|>", "x" * 30_000]
    for t in texts:
        ids = tok.tokenize(t)
        assert ids[0] == tok.bos and tok.detokenize(ids[1:]) == t
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch([]) == []


def _reference_split(s: str, max_run: int):
    """Per-character statement of the rule: a piece ends when a run of spaces/non-spaces exceeds max_run."""
    pieces, start, run, prev = [], 0, 0, None
    for i, ch in enumerate(s):
        space = ch.isspace()
        run = run + 1 if space == prev else 1
        prev = space
        if run > max_run:
            pieces.append(s[start:i])
            start, run = i, 1
    pieces.append(s[start:])
    return pieces


def test_split_long_runs_matches_rule():
    rng = random.Random(0)
    alphabet = "ab \n\t\x1c\u00a0\u2003x"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for max_run in (1, 2, 3, 5):
            assert list(split_long_runs(s, max_run)) == _reference_split(s, max_run), (s, max_run)
        assert "".join(split_long_runs(s, 3)) == s


def test_long_runs_are_cut_like_meta(tok):
    # A 25,001-letter run is cut after 25,000 characters, splitting "th" into "t" + "h".
    text = "x" * 24_999 + "th"
    ids = tok.tokenize(text)
    assert ids[-2:] == [ord("t"), ord("h")]
    assert tok.model.encode(text)[-1] == 256 + 1  # uncut, tiktoken would merge it
    assert [len(p) for p in llama3_pieces("a" * 900_000)] == [25_000] * 36


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(TokenizerFileError, match="--tokenizer-model"):
        Llama3Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_text("not base64!! zero\n")
    with pytest.raises(ValueError, match="line 1"):
        Llama3Tokenizer(bad)
    empty = tmp_path / "empty.model"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no BPE ranks"):
        Llama3Tokenizer(empty)
