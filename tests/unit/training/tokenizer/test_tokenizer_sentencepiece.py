"""GPTSentencePieceTokenizer and Llama2Tokenizer on a tiny SentencePiece model trained here."""

from __future__ import annotations

import pytest

from megatron.training.tokenizer import GPTSentencePieceTokenizer, Llama2Tokenizer, TokenizerFileError

TEXTS = ["The expert router sends each token", "", "héllo wörld naïve café", "model  layer\nnorm"]


@pytest.fixture(scope="module")
def processor(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


def test_gpt_sentencepiece_plain_ids(sp_model, processor, sentences):
    tok = GPTSentencePieceTokenizer(sp_model)
    texts = TEXTS + sentences[:30]
    for t in texts:
        assert tok.tokenize(t) == processor.encode_as_ids(t)
    assert tok.tokenize_batch(texts) == [processor.encode_as_ids(t) for t in texts]
    assert tok.tokenize_batch([]) == []
    assert tok.eod == processor.eos_id() == 2
    assert tok.bos == 1 and tok.pad == 3
    assert tok.vocab_size == processor.get_piece_size()
    ids = tok.tokenize("the model")
    assert ids and ids[0] != tok.bos and ids[-1] != tok.eod
    assert tok.detokenize(ids) == "the model"


def test_llama2_adds_bos_not_eos(sp_model, processor, sentences):
    tok = Llama2Tokenizer(sp_model)
    texts = TEXTS + sentences[:30]
    for t in texts:
        assert tok.tokenize(t) == [processor.bos_id()] + processor.encode(t)
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize("") == [1]
    assert tok.bos == 1 and tok.eod == 2 and tok.pad == 3
    assert tok.tokenize("the model", bos=False, eos=True) == processor.encode("the model") + [2]
    assert tok.vocab_size == processor.get_piece_size()
    assert tok.detokenize(tok.tokenize("the model")) == "the model"


def test_model_without_bos_or_pad(sp_model_no_bos):
    tok = GPTSentencePieceTokenizer(sp_model_no_bos)
    assert tok.bos is None and tok.pad is None and tok.eod == 1
    with pytest.raises(ValueError, match="bos"):
        Llama2Tokenizer(sp_model_no_bos)


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(TokenizerFileError, match="--tokenizer-model"):
        GPTSentencePieceTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        Llama2Tokenizer(bad)
