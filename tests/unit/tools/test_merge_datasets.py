"""tools/merge_datasets.py: merging preprocessed halves equals preprocessing the whole, document
indices are offset (user-needs row 29), mismatched dtypes and half pairs are clear errors."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.unit.tools.preprocess_testlib import (  # noqa: F401  (fixtures are used by name)
    BigVocabTokenizer,
    FastWordTokenizer,
    _restore_tokenizer_env,
    make_records,
    read_dataset,
    write_jsonl,
)
from tools import merge_datasets, preprocess_data


def _preprocess(path, prefix, tokenizer=None, extra=()) -> None:
    argv = ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer-type", "X", "--append-eod", *extra]
    assert preprocess_data.main(argv, tokenizer=tokenizer or FastWordTokenizer()) == 0


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("split", [False, True])
def test_merge_halves_equals_whole(tmp_path, split):
    records = make_records(301)
    whole = write_jsonl(str(tmp_path / "whole.jsonl"), records)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(str(parts / "a.jsonl"), records[:150])
    write_jsonl(str(parts / "b.jsonl"), records[150:])
    level = "document"
    extra = []
    if split:  # several sequences per document: offsets of document_indices matter
        level, extra = "sentence", ["--split-sentences"]
    splitter = _DotSplitter() if split else None
    for name in ("whole", "a", "b"):
        src = whole if name == "whole" else parts / f"{name}.jsonl"
        argv = ["--input", str(src), "--output-prefix", str(tmp_path / "out" / name), "--tokenizer-type", "X",
                "--append-eod", *extra]
        assert preprocess_data.main(argv, tokenizer=FastWordTokenizer(), splitter=splitter) == 0
    out = tmp_path / "out"
    a, b = f"{out}/a_text_{level}", f"{out}/b_text_{level}"
    assert merge_datasets.main(["--input-prefixes", a, b, "--output-prefix", str(tmp_path / "merged")]) == 0
    for ext in (".bin", ".idx"):
        assert _bytes(f"{tmp_path}/merged{ext}") == _bytes(f"{out}/whole_text_{level}{ext}")
    # --input DIR: every pair in the folder, by name (a before b)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for prefix in (a, b):
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, folder)
    assert merge_datasets.main(["--input", str(folder), "--output-prefix", str(tmp_path / "merged_dir")]) == 0
    for ext in (".bin", ".idx"):
        assert _bytes(f"{tmp_path}/merged_dir{ext}") == _bytes(f"{out}/whole_text_{level}{ext}")
    seqs, docs, _ = read_dataset(str(tmp_path / "merged_dir"))
    assert len(docs) == len(records) + 1 and docs[-1] == len(seqs)


class _DotSplitter:
    def tokenize(self, text):
        return [s + "." for s in text.split(" the ") if s]


def test_merge_refuses_mixed_dtypes(tmp_path, capsys):
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(10))
    _preprocess(data, tmp_path / "small")
    _preprocess(data, tmp_path / "big", tokenizer=BigVocabTokenizer())
    rc = merge_datasets.main(["--input-prefixes", f"{tmp_path}/small_text_document", f"{tmp_path}/big_text_document",
                              "--output-prefix", str(tmp_path / "m")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "token dtype int32" in err and "uint16" in err
    assert not os.path.exists(f"{tmp_path}/m.bin") and not os.path.exists(f"{tmp_path}/m.idx")


def test_merge_refuses_half_pairs_and_missing_inputs(tmp_path, capsys):
    data = write_jsonl(str(tmp_path / "in.jsonl"), make_records(10))
    folder = tmp_path / "pairs"
    _preprocess(data, folder / "x")
    os.remove(folder / "x_text_document.idx")
    assert merge_datasets.main(["--input", str(folder), "--output-prefix", str(tmp_path / "m")]) == 1
    assert merge_datasets.main(["--input-prefixes", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m")]) == 1
    assert merge_datasets.main(["--input", str(tmp_path / "empty_missing"), "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "x_text_document.idx is missing" in err and "not found" in err and "not a directory" in err
    assert not os.path.exists(f"{tmp_path}/m.bin")
