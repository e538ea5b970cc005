"""tools/preprocess_data.py: byte-identity with Megatron's golden outputs, Megatron's semantics
(documents, sentences, eod, partitions), input formats, bad input and progress reporting."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests.unit.tools.preprocess_testlib import (  # noqa: F401  (fixtures are used by name)
    REPO_ROOT,
    _restore_tokenizer_env,
    golden_dir,
    gpt2_files,
    BigVocabTokenizer,
    FastWordTokenizer,
    WordTokenizer,
    make_records,
    read_dataset,
    reference_encode,
    write_jsonl,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.data_prep.encode import TokenizeError, assemble
from megatron.training.data_prep.sentences import SentenceSplitterUnavailable, _keep_newlines_vars, split_text
from tools import preprocess_data

GOLDEN_FLAGS = {
    "hf_eod": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{g}/input/tokenizer", "--append-eod",
               "--workers", "2"],
    "hf_two_keys": ["--json-keys", "text", "src", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    "{g}/input/tokenizer", "--workers", "2"],
    "gpt2bpe_eod": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{g}/input/gpt2bpe/vocab.json",
                    "--merge-file", "{g}/input/gpt2bpe/merges.txt", "--append-eod", "--workers", "2"],
}


def run(argv, tokenizer=None, splitter=None) -> int:
    return preprocess_data.main([str(a) for a in argv], tokenizer=tokenizer, splitter=splitter)


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# --------------------------------------------------------------------------- golden byte-identity


@pytest.mark.parametrize("name", sorted(GOLDEN_FLAGS))
def test_golden_outputs_byte_identical(golden_dir, tmp_path, name):
    flags = [f.format(g=golden_dir) for f in GOLDEN_FLAGS[name]]
    prefix = tmp_path / name
    assert run(["--input", f"{golden_dir}/input/corpus.jsonl", "--output-prefix", prefix, *flags]) == 0
    keys = ["text", "src"] if name == "hf_two_keys" else ["text"]
    for key in keys:
        out = f"{prefix}_{key}_document"
        gold = os.path.join(golden_dir, f"{name}_{key}_document")
        IndexedDataset(out).close()  # every key gets a complete, valid pair
        assert same_bytes(out + ".bin", gold + ".bin"), f"{key}: .bin differs from Megatron's"
        if os.path.exists(gold + ".idx"):  # Megatron wrote no .idx for all but the last key
            assert same_bytes(out + ".idx", gold + ".idx"), f"{key}: .idx differs from Megatron's"


def test_golden_partitions_order(golden_dir, tmp_path):
    """--partitions P: Megatron deals lines round-robin to P partitions and concatenates them;
    with --keep-sequential-samples the chunks are contiguous, so the output equals P=1."""
    flags = [f.format(g=golden_dir) for f in GOLDEN_FLAGS["gpt2bpe_eod"]]
    corpus = f"{golden_dir}/input/corpus.jsonl"
    gold_seqs, gold_docs, _ = read_dataset(os.path.join(golden_dir, "hf_eod_text_document"))
    assert gold_docs == list(range(len(gold_seqs) + 1))  # one sequence per document
    assert run(["--input", corpus, "--output-prefix", tmp_path / "rr", "--partitions", 3, *flags]) == 0
    seqs, docs, _ = read_dataset(f"{tmp_path}/rr_text_document")
    expected = [gold_seqs[i] for p in range(3) for i in range(p, len(gold_seqs), 3)]
    assert seqs == expected and docs == gold_docs
    assert sorted(os.listdir(tmp_path)) == ["rr_text_document.bin", "rr_text_document.idx"]  # parts removed
    assert run(["--input", corpus, "--output-prefix", tmp_path / "seq", "--partitions", 3,
                "--keep-sequential-samples", *flags]) == 0
    assert same_bytes(f"{tmp_path}/seq_text_document.bin", f"{golden_dir}/gpt2bpe_eod_text_document.bin")
    assert same_bytes(f"{tmp_path}/seq_text_document.idx", f"{golden_dir}/gpt2bpe_eod_text_document.idx")


def test_cli_runs_as_script_without_importing_torch(gpt2_files, tmp_path):
    """`python tools/preprocess_data.py` from the repo root works, and our code path (with a
    tokenizer that needs no transformers) never imports torch."""
    vocab, merges = gpt2_files
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(50))
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)"
    )
    cmd = [sys.executable, "-c", probe, "tools/preprocess_data.py", "--input", data, "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
           "--append-eod", "--workers", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "done:" in proc.stderr
    IndexedDataset(str(tmp_path / "out_text_document")).close()


# --------------------------------------------------------------------------- Megatron semantics


@pytest.mark.parametrize("tokenizer_cls,workers", [(FastWordTokenizer, 2), (WordTokenizer, 2), (WordTokenizer, 1)])
@pytest.mark.parametrize("append_eod", [False, True])
def test_semantics_match_reference(tmp_path, tokenizer_cls, workers, append_eod):
    """Empty documents close a document, list values are sentences, empty sentences are skipped,
    eod goes on the last sequence of non-empty documents; both executors agree."""
    records = make_records(400)
    data = write_jsonl(str(tmp_path / "in.jsonl"), records)
    tok = tokenizer_cls()
    flags = ["--append-eod"] if append_eod else []
    argv = ["--input", data, "--output-prefix", tmp_path / "out", "--json-keys", "text", "title",
            "--tokenizer-type", "X", "--workers", workers, "--batch-bytes", 2000, *flags]
    assert run(argv, tokenizer=tok) == 0
    for key in ("text", "title"):
        seqs, docs, dtype = read_dataset(f"{tmp_path}/out_{key}_document")
        ref_seqs, ref_docs = reference_encode(records, key, tok, append_eod)
        assert (seqs, docs) == (ref_seqs, ref_docs)
        assert dtype == np.uint16
        if key == "text":  # the corpus has empty documents, and they are kept
            assert len(np.flatnonzero(np.diff(docs) == 0)) > 0


def test_int32_tokens_for_big_vocab(tmp_path):
    records = make_records(20)
    data = write_jsonl(str(tmp_path / "in.jsonl"), records)
    assert run(["--input", data, "--output-prefix", tmp_path / "o", "--tokenizer-type", "X"], BigVocabTokenizer()) == 0
    seqs, docs, dtype = read_dataset(f"{tmp_path}/o_text_document")
    assert dtype == np.int32 and (seqs, docs) == reference_encode(records, "text", BigVocabTokenizer(), False)


def test_assemble_matches_plain_loop():
    rng = np.random.default_rng(3)
    ids = [list(rng.integers(1, 50, size=int(rng.integers(0, 4)))) for _ in range(60)]
    per_doc = np.array([3] * 20)
    enc = assemble(ids, per_doc, 7, True, np.dtype(np.uint16))
    seqs, docs, pos = [], [0], 0
    for n in per_doc:
        doc = [s for s in ids[pos:pos + n] if s]
        pos += n
        if doc:
            doc[-1] = doc[-1] + [7]
        seqs += doc
        docs.append(len(seqs))
    assert enc.lengths.tolist() == [len(s) for s in seqs]
    assert enc.tokens.tolist() == [t for s in seqs for t in s]
    assert [0] + enc.doc_ends.tolist() == docs


def test_tokenize_error_survives_pickling():
    err = pickle.loads(pickle.dumps(TokenizeError(4, "tokenizer failed: boom")))
    assert err.position == 4 and str(err) == "tokenizer failed: boom"


# --------------------------------------------------------------------------- sentence splitting


class StandInSplitter:
    """Splits after '.', like punkt would on simple text (punkt's model is not installed here)."""

    def tokenize(self, text: str):
        return [s.strip() + "." for s in text.split(".") if s.strip()]


@pytest.mark.parametrize("workers,tokenizer_cls", [(1, FastWordTokenizer), (2, FastWordTokenizer), (2, WordTokenizer)])
def test_split_sentences_with_stand_in_splitter(tmp_path, workers, tokenizer_cls):
    records = [{"text": "One two. Three four five. Six."}, {"text": ""}, {"text": "Seven eight"},
               {"text": ["pre split", "", "list"]}, {"text": "Nine. . Ten eleven."}]
    data = write_jsonl(str(tmp_path / "in.jsonl"), records)
    tok = tokenizer_cls()
    argv = ["--input", data, "--output-prefix", tmp_path / "s", "--split-sentences", "--append-eod",
            "--tokenizer-type", "X", "--workers", workers]
    assert run(argv, tokenizer=tok, splitter=StandInSplitter()) == 0
    assert not os.path.exists(f"{tmp_path}/s_text_document.bin")
    seqs, docs, _ = read_dataset(f"{tmp_path}/s_text_sentence")
    assert (seqs, docs) == reference_encode(records, "text", tok, True, StandInSplitter())
    assert docs == [0, 3, 3, 4, 6, 8]  # several sequences per document; the empty one closes a document


def test_split_sentences_without_punkt_fails_before_writing(tmp_path, monkeypatch, capsys):
    import nltk

    def missing(*args, **kwargs):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk.data, "find", missing)
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(5))
    out = tmp_path / "out"
    rc = run(["--input", data, "--output-prefix", out / "x", "--split-sentences", "--tokenizer-type", "X"], FastWordTokenizer())
    assert rc != 0
    err = capsys.readouterr().err
    assert "nltk.download('punkt_tab')" in err and "--split-sentences" in err
    assert not out.exists()


def test_keep_newlines_sentences_keep_trailing_whitespace():
    from nltk.tokenize import punkt

    base = punkt.PunktSentenceTokenizer()
    keep = punkt.PunktSentenceTokenizer(train_text=base._params, lang_vars=_keep_newlines_vars(punkt.PunktLanguageVars)())
    text = "First line here.\nSecond one?  Third!\n\nLast"
    sentences = split_text(keep, text)
    assert len(sentences) == 4 and "".join(sentences) == text
    assert split_text(base, text) == ["First line here.", "Second one?", "Third!", "Last"]


def test_split_text_splits_huge_texts_in_pieces():
    class Recorder:
        calls = []

        def tokenize(self, text):
            self.calls.append(len(text))
            return [text]

    r = Recorder()
    assert "".join(split_text(r, "x" * 2_500_000)) == "x" * 2_500_000
    assert r.calls == [1_000_000, 1_000_000, 500_000]


def test_load_splitter_error_type(monkeypatch):
    import nltk

    from megatron.training.data_prep.sentences import load_sentence_splitter

    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError("nope")))
    with pytest.raises(SentenceSplitterUnavailable, match="punkt_tab"):
        load_sentence_splitter()


# --------------------------------------------------------------------------- input formats


def test_input_formats_give_identical_outputs(tmp_path):
    """gzip JSONL, Parquet, a save_to_disk folder, an Arrow file, a JSON array, a folder of
    shards and a glob all give the same pair as the plain JSONL."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": r["text"] if isinstance(r["text"], str) else " ".join(r["text"]), "title": r["title"]}
               for r in make_records(300)]
    base = write_jsonl(str(tmp_path / "in.jsonl"), records)
    with open(base, "rb") as f, gzip.open(tmp_path / "in.jsonl.gz", "wb") as g:
        g.write(f.read())
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet", row_group_size=64)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, pa.Table.from_pylist(records).schema) as writer:
            writer.write_table(pa.Table.from_pylist(records), max_chunksize=50)
    with open(tmp_path / "array.json", "w") as f:
        json.dump(records, f)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(str(shards / "a.jsonl"), records[:100])
    write_jsonl(str(shards / "b.jsonl"), records[100:])
    tok = FastWordTokenizer()
    common = ["--json-keys", "text", "title", "--append-eod", "--tokenizer-type", "X", "--batch-bytes", 3000]
    assert run(["--input", base, "--output-prefix", tmp_path / "ref", *common], tok) == 0
    inputs = {"gz": tmp_path / "in.jsonl.gz", "parquet": tmp_path / "in.parquet", "saved": tmp_path / "saved",
              "arrow": tmp_path / "in.arrow", "array": tmp_path / "array.json", "folder": shards,
              "glob": f"{shards}/*.jsonl"}
    for name, path in inputs.items():
        assert run(["--input", path, "--output-prefix", tmp_path / name, *common], tok) == 0, name
        for key in ("text", "title"):
            for ext in (".bin", ".idx"):
                assert same_bytes(f"{tmp_path}/{name}_{key}_document{ext}", f"{tmp_path}/ref_{key}_document{ext}"), name


def test_missing_column_in_parquet_fails_before_writing(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "in.parquet")
    assert run(["--input", tmp_path / "in.parquet", "--output-prefix", tmp_path / "o", "--tokenizer-type", "X"],
               FastWordTokenizer()) == 1
    assert "no column 'text'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.parquet"]


# --------------------------------------------------------------------------- bad input

BAD_LINES = {
    "malformed": (b'{"text": "unterminated\n', "malformed JSON"),
    "missing_key": (b'{"body": "no text key"}\n', "missing key 'text'"),
    "number": (b'{"text": 42}\n', "holds int"),
    "null": (b'{"text": null}\n', "holds null"),
    "list_of_ints": (b'{"text": ["ok", 3]}\n', "item 1 of the list is int"),
    "not_object": (b'["text"]\n', "expected a JSON object"),
    "bad_utf8": (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    "tokenizer_fails": (b'{"text": "fine \\u0000BOOM"}\n', "tokenizer failed"),
}


def _write_with_bad_line(path, bad: bytes, good_records):
    with open(path, "wb") as f:
        for i, record in enumerate(good_records):
            if i == 3:
                f.write(bad)
            f.write(json.dumps(record).encode() + b"\n")
            if i == 5:
                f.write(b"   \n\n")  # blank lines are skipped silently


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("tokenizer_cls", [FastWordTokenizer, WordTokenizer])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, capsys, case, tokenizer_cls):
    bad, message = BAD_LINES[case]
    records = [{"text": f"good record {i}"} for i in range(10)]
    path = tmp_path / "in.jsonl"
    _write_with_bad_line(path, bad, records)
    argv = ["--input", path, "--output-prefix", tmp_path / "out" / "o", "--tokenizer-type", "X", "--workers", 2,
            "--json-keys", "text"]
    assert run(argv, tokenizer_cls()) == 1
    err = capsys.readouterr().err
    assert f"{path}:4:" in err and message in err, err
    assert os.listdir(tmp_path / "out") == []  # nothing finished-looking, no temporaries

    assert run([*argv, "--skip-bad-lines"], tokenizer_cls()) == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad records" in err
    seqs, docs, _ = read_dataset(f"{tmp_path}/out/o_text_document")
    assert (seqs, docs) == reference_encode(records, "text", tokenizer_cls(), False)


def test_flag_errors(tmp_path, capsys):
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(3))
    tok = FastWordTokenizer()
    assert run(["--input", data, "--output-prefix", tmp_path / "o", "--tokenizer-type", "X", "--json-keys", "text",
                "text"], tok) == 1
    assert run(["--input", data, "--output-prefix", tmp_path / "o", "--tokenizer-type", "X", "--workers", 0], tok) == 1
    assert run(["--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-type", "X"], tok) == 1
    err = capsys.readouterr().err
    assert "twice" in err and "--workers must be >= 1" in err and "input not found" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]


# --------------------------------------------------------------------------- progress


def test_progress_lines(tmp_path, capsys):
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(500))
    argv = ["--input", data, "--output-prefix", tmp_path / "o", "--tokenizer-type", "X", "--log-interval", 100,
            "--batch-bytes", 4000]
    assert run(argv, FastWordTokenizer()) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("processed")]
    assert len(lines) >= 5
    assert all("MB/s" in line and "tokens/s" in line and "ETA" in line for line in lines)
    assert lines[-1].startswith("processed 500 documents") and "100.0% of input" in lines[-1]
    assert any(line.startswith("done: 500 documents") for line in err)


def test_saved_dataset_dict_asks_for_a_split_and_keep_newlines_alone_is_a_note(tmp_path, capsys):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a b"}])}).save_to_disk(str(tmp_path / "dd"))
    tok = FastWordTokenizer()
    assert run(["--input", tmp_path / "dd", "--output-prefix", tmp_path / "o", "--tokenizer-type", "X"], tok) == 1
    assert "pass one split's folder" in capsys.readouterr().err
    assert run(["--input", tmp_path / "dd" / "train", "--output-prefix", tmp_path / "o", "--tokenizer-type", "X",
                "--keep-newlines"], tok) == 0
    assert "--keep-newlines has no effect without --split-sentences" in capsys.readouterr().err
    assert read_dataset(f"{tmp_path}/o_text_document")[:2] == ([tok.tokenize("a b")], [0, 1])
