"""Fixtures for the tokenizer tests: the golden preprocessing data and tiny tokenizers made locally."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[4]
GOLDEN = REPO_ROOT / "tests" / "data" / "golden" / "preprocess"

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be "
    "or has had not but first one their its new after who they have two been also other year time "
    "people world state city school music house water river light model train token expert layer "
    "router gate attention mixture sparse dense rope scale norm loss batch sequence parallel pipeline "
    "héllo wörld naïve café"
).split()


def make_sentences(n: int = 400, seed: int = 0) -> List[str]:
    """Deterministic pseudo-English sentences for training tiny tokenizers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 99999)}"
        out.append(sentence)
    return out


@pytest.fixture(scope="session")
def sentences() -> List[str]:
    return make_sentences()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert (GOLDEN / "input" / "corpus.jsonl").is_file(), f"golden preprocessing data missing from the repository: {GOLDEN}"
    return GOLDEN


@pytest.fixture(scope="session")
def golden_docs(golden_dir: Path) -> List[str]:
    with open(golden_dir / "input" / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _train_sentencepiece(path: Path, sentences: List[str], **kwargs) -> Path:
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=200,
        model_type="bpe",
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **kwargs,
    )
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, sentences) -> Path:
    """SentencePiece model with unk=0, bos=1, eos=2, pad=3."""
    d = tmp_path_factory.mktemp("sp")
    return _train_sentencepiece(d / "tok.model", sentences, unk_id=0, bos_id=1, eos_id=2, pad_id=3)


@pytest.fixture(scope="session")
def sp_model_no_bos(tmp_path_factory, sentences) -> Path:
    """SentencePiece model trained without bos and pad pieces."""
    d = tmp_path_factory.mktemp("sp_nobos")
    return _train_sentencepiece(d / "tok.model", sentences, unk_id=0, bos_id=-1, eos_id=1, pad_id=-1)


def _tiny_hf_tokenizer(sentences: List[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(sentences, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    return tk


def _save_hf(tk, path: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        str(path)
    )
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, sentences) -> Path:
    """A local HF tokenizer directory whose post-processor puts <s> (bos) in front; eos </s>."""
    return _save_hf(_tiny_hf_tokenizer(sentences), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def hf_dir_truncating(tmp_path_factory, sentences) -> Path:
    """Like hf_dir, but tokenizer.json carries truncation and padding settings."""
    tk = _tiny_hf_tokenizer(sentences)
    tk.enable_truncation(max_length=6)
    tk.enable_padding(length=40, pad_id=tk.token_to_id("<pad>"), pad_token="<pad>")
    return _save_hf(tk, tmp_path_factory.mktemp("hf_trunc"))


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory):
    """Tiny GPT-2 vocab.json / merges.txt: the byte alphabet, <|endoftext|> and a few merges."""
    d = tmp_path_factory.mktemp("gpt2")
    from tokenizers import pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("in", "g")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return d / "vocab.json", d / "merges.txt", vocab
