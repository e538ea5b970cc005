"""A corpus of bad inputs for tools/preprocess_data.py: for each, the exact message the user sees,
and that nothing is lost: the previous output pair at the same prefix is byte-for-byte intact and
no temporary file, commit marker or half pair is left behind. (Bad datasets at training start are
in tests/unit/core/datasets/test_dataset_validation.py and test_pair_commit.py.)"""

from __future__ import annotations

import errno
import os

import pytest

from tests.unit.tools.preprocess_testlib import (  # noqa: F401  (fixtures are used by name)
    FastWordTokenizer,
    WordTokenizer,
    _restore_tokenizer_env,
)
from megatron.core.datasets import indexed_dataset
from tools import preprocess_data

HINT = " (pass --skip-bad-lines to skip bad records instead)"

# name: (bad line written as line 4 of the input, message after "error: <file>:4: ")
BAD_LINES = {
    "unterminated_string": (b'{"text": "no end quote', "malformed JSON: Unterminated string starting at column 10"),
    "raw_newline_in_string": (b'{"text": "broken\n still"}', "malformed JSON: Invalid control character at column 17"),
    "tab_in_string": (b'{"text": "a\tb"}', "malformed JSON: Invalid control character at column 12"),
    "trailing_garbage": (b'{"text": "a"} x', "malformed JSON: Extra data at column 15"),
    "missing_key": (b'{"body": "no text key"}', "missing key 'text' (keys present: 'body')"),
    "number": (b'{"text": 42}', "key 'text' holds int, expected a string or a list of strings"),
    "null": (b'{"text": null}', "key 'text' holds null, expected a string or a list of strings"),
    "object": (b'{"text": {"a": 1}}', "key 'text' holds dict, expected a string or a list of strings"),
    "list_of_ints": (b'{"text": ["ok", 3]}', "key 'text': item 1 of the list is int, expected a string"),
    "not_an_object": (b'["text"]', "expected a JSON object, got list"),
    "bad_utf8": (b'{"text": "caf\xe9"}', "invalid UTF-8 (byte 13 of the line)"),
    "lone_surrogate": (b'{"text": "x \\ud800 y"}', "key 'text': lone surrogate \\ud800 at character 2 (a JSON \\u "
                       "escape that is half of a UTF-16 pair) is not valid Unicode text"),
    "surrogate_in_list": (b'{"text": ["fine", "\\udfff"]}', "key 'text': item 1 of the list: lone surrogate \\udfff at "
                          "character 0 (a JSON \\u escape that is half of a UTF-16 pair) is not valid Unicode text"),
    "tokenizer_fails": (b'{"text": "fine \\u0000BOOM"}', "tokenizer failed: RuntimeError: cannot tokenize this"),
}

GOOD = [b'{"text": "good record %d"}' % i for i in range(6)]


def _old_pair(tmp_path, tokenizer) -> tuple[str, dict]:
    """A finished dataset at the prefix the bad run will write to."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(GOOD) + b"\n")
    prefix = tmp_path / "out" / "o"
    assert preprocess_data.main(["--input", str(good), "--output-prefix", str(prefix), "--tokenizer-type", "X"],
                                tokenizer=tokenizer) == 0
    final = f"{prefix}_text_document"
    return str(prefix), {ext: open(final + ext, "rb").read() for ext in (".bin", ".idx")}


def _assert_intact(tmp_path, snapshot) -> None:
    final = f"{tmp_path}/out/o_text_document"
    assert {ext: open(final + ext, "rb").read() for ext in (".bin", ".idx")} == snapshot
    assert sorted(os.listdir(tmp_path / "out")) == ["o_text_document.bin", "o_text_document.idx"]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("tokenizer_cls,workers", [(FastWordTokenizer, 2), (WordTokenizer, 2)])
def test_bad_line_exact_message_and_old_pair_intact(tmp_path, capsys, case, tokenizer_cls, workers):
    prefix, snapshot = _old_pair(tmp_path, tokenizer_cls())
    bad, message = BAD_LINES[case]
    path = tmp_path / "in.jsonl"
    last = case == "unterminated_string"  # at the end of the file, without a newline
    body = GOOD[:3] + GOOD[4:] + [bad] if last else GOOD[:3] + [bad] + GOOD[3:]
    path.write_bytes(b"\n".join(body) + (b"" if last else b"\n"))
    line = len(body) if last else 4
    capsys.readouterr()
    rc = preprocess_data.main(["--input", str(path), "--output-prefix", prefix, "--tokenizer-type", "X",
                               "--workers", str(workers)], tokenizer=tokenizer_cls())
    assert rc == 1
    assert capsys.readouterr().err == f"error: {path}:{line}: {message}{HINT}\n"
    _assert_intact(tmp_path, snapshot)


def test_full_disk_on_rerun_keeps_the_old_pair(tmp_path, capsys, monkeypatch):
    prefix, snapshot = _old_pair(tmp_path, FastWordTokenizer())
    path = tmp_path / "new.jsonl"
    path.write_bytes(b'{"text": "a different corpus"}\n' * 50)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(indexed_dataset, "_write_index_file", full_disk)
    capsys.readouterr()
    assert preprocess_data.main(["--input", str(path), "--output-prefix", prefix, "--tokenizer-type", "X"],
                                tokenizer=FastWordTokenizer()) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    _assert_intact(tmp_path, snapshot)


@pytest.mark.parametrize("case", ["missing_input", "empty_list", "missing_list", "empty_folder", "bad_shard_size"])
def test_bad_arguments_exact_message(tmp_path, capsys, case):
    prefix, snapshot = _old_pair(tmp_path, FastWordTokenizer())
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "empty_dir").mkdir()
    argv, message = {
        "missing_input": (["--input", f"{tmp_path}/nope.jsonl"], f"input not found: {tmp_path}/nope.jsonl"),
        "empty_list": (["--input", f"@{tmp_path}/empty.txt"], f"--input @{tmp_path}/empty.txt: the list file names no inputs"),
        "missing_list": (["--input", f"@{tmp_path}/nope.txt"], f"--input @{tmp_path}/nope.txt: list file not found"),
        "empty_folder": (["--input", f"{tmp_path}/empty_dir"],
                         f"{tmp_path}/empty_dir: folder holds no input files (.jsonl, .json, .jsonl.gz, .json.gz, "
                         ".ndjson, .ndjson.gz, .parquet, .arrow, ...)"),
        "bad_shard_size": (["--input", f"{tmp_path}/good.jsonl", "--shard-size-mb", "0"],
                           "--shard-size-mb must be positive, got 0.0"),
    }[case]
    capsys.readouterr()
    assert preprocess_data.main([*argv, "--output-prefix", prefix, "--tokenizer-type", "X"],
                                tokenizer=FastWordTokenizer()) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    _assert_intact(tmp_path, snapshot)
