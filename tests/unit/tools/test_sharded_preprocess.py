"""Sharded, resumable preprocessing: units per input file / per N MB, a verified manifest,
--resume after a SIGKILL, several processes splitting the units; merging the units gives exactly
the output of an unsharded run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from tests.unit.tools.preprocess_testlib import (  # noqa: F401  (fixtures are used by name)
    REPO_ROOT,
    FastWordTokenizer,
    _restore_tokenizer_env,
    golden_dir,
    make_records,
    write_jsonl,
)
from megatron.core.datasets.shard_manifest import ShardManifestError, finished_prefixes, manifest_data_path
from tools import merge_datasets, preprocess_data


def same_pair(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    records = make_records(900)
    for i, name in enumerate(("a.jsonl", "b.jsonl", "c.jsonl")):
        write_jsonl(str(folder / name), records[300 * i: 300 * (i + 1)])
    (tmp_path / "list.txt").write_text("# the three parts\nin/a.jsonl\nin/b.jsonl\n\nin/c.jsonl\n")
    return folder


def run(argv) -> int:
    return preprocess_data.main([str(a) for a in argv], tokenizer=FastWordTokenizer())


def test_sharded_units_merge_to_the_unsharded_output(inputs, tmp_path, capsys):
    common = ["--tokenizer-type", "X", "--append-eod", "--json-keys", "text", "title"]
    assert run(["--input", inputs, "--output-prefix", tmp_path / "plain", *common]) == 0
    for spec in (inputs, f"@{tmp_path / 'list.txt'}", f"{inputs}/*.jsonl"):
        out = tmp_path / "sh"
        for index in (1, 0):  # two "machines", in either order
            assert run(["--input", spec, "--output-prefix", out, *common, "--shard-size-mb", 0.004,
                        "--shard-index", index, "--num-shards", 2]) == 0
        err = capsys.readouterr().err
        assert "this process (shard 1 of 2)" in err and "all " in err and "units finished; merge them with" in err
        assert merge_datasets.main(["--manifest", f"{out}_shards", "--output-prefix", str(tmp_path / "merged")]) == 0
        for key in ("text", "title"):
            assert same_pair(f"{tmp_path}/merged_{key}_document", f"{tmp_path}/plain_{key}_document"), (spec, key)
        units = len(finished_prefixes(f"{out}_shards")["text"])
        assert units > 6  # several byte ranges per file
        data_path = manifest_data_path(f"{out}_shards", "text")
        assert len(data_path) == 2 * units and data_path[1].endswith("unit_00000_text_document")
        shutil.rmtree(f"{out}_shards")


def test_resume_skips_verified_units_and_redoes_damaged_ones(inputs, tmp_path, capsys):
    argv = ["--input", inputs, "--output-prefix", tmp_path / "sh", "--tokenizer-type", "X", "--sharded"]
    assert run(argv) == 0
    capsys.readouterr()
    folder = f"{tmp_path}/sh_shards"
    with open(f"{folder}/unit_00001_text_document.bin", "r+b") as f:  # damage one finished unit
        f.write(b"\xff\xff")
    with pytest.raises(ShardManifestError, match=r"1 of 3 units are not finished \(units 1\)"):
        finished_prefixes(folder)
    assert run([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("already finished and verified, skipped") == 2 and "shard unit 1 done" in err
    assert len(finished_prefixes(folder)["text"]) == 3


def test_plan_mismatch_and_unfinished_merge_are_errors(inputs, tmp_path, capsys):
    out = tmp_path / "sh"
    assert run(["--input", inputs, "--output-prefix", out, "--tokenizer-type", "X", "--sharded",
                "--shard-index", 0, "--num-shards", 2]) == 0
    assert merge_datasets.main(["--manifest", f"{out}_shards", "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert (f"error: {out}_shards: 1 of 3 units are not finished (units 1); run tools/preprocess_data.py again with the "
            "same flags and --resume (with --shard-index/--num-shards on several machines) to finish them") in err
    assert not os.path.exists(f"{tmp_path}/m_text_document.bin")
    assert run(["--input", inputs, "--output-prefix", out, "--tokenizer-type", "X", "--sharded", "--append-eod"]) == 1
    err = capsys.readouterr().err
    assert f"error: {out}_shards/plan.json was written for other settings than this run's; use another --output-prefix, " \
           f"or delete {out}_shards to start over" in err
    assert run(["--input", inputs, "--output-prefix", out, "--tokenizer-type", "X", "--sharded",
                "--shard-index", 2, "--num-shards", 2]) == 1
    assert "--shard-index must be in [0, --num-shards), got 2 of 2" in capsys.readouterr().err


def test_bad_line_in_a_later_byte_range_names_its_file_line(tmp_path, capsys):
    lines = [json.dumps({"text": f"record {i} " + "word " * 20}) for i in range(200)]
    lines[150] = '{"text": 7}'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert run(["--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "sh", "--tokenizer-type", "X",
                "--shard-size-mb", 0.005]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in.jsonl'}:151: key 'text' holds int, expected a string or a list of strings" in err


# ------------------------------------------------------------------------- real processes, SIGKILL


def _cli(golden, inputs, prefix, *extra):
    g = f"{golden}/input"
    return [sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", str(inputs),
            "--output-prefix", str(prefix), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
            f"{g}/gpt2bpe/vocab.json", "--merge-file", f"{g}/gpt2bpe/merges.txt", "--append-eod", "--workers", "1",
            *map(str, extra)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_and_two_machines(golden_dir, tmp_path):
    corpus = f"{golden_dir}/input/corpus.jsonl"
    plain = subprocess.run(_cli(golden_dir, corpus, tmp_path / "plain"), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    shard = ["--shard-size-mb", "0.03"]  # ~47 units
    proc = subprocess.Popen(_cli(golden_dir, corpus, tmp_path / "run", *shard), stderr=subprocess.PIPE, text=True)
    done = 0
    for line in proc.stderr:
        done += line.startswith("shard unit")
        if done == 5:
            proc.send_signal(signal.SIGKILL)  # in the middle of the sixth unit
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_cli(golden_dir, corpus, tmp_path / "run", *shard, "--resume"), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("already finished and verified, skipped") >= 5
    units = len(finished_prefixes(f"{tmp_path}/run_shards")["text"])
    assert resumed.stderr.count("shard unit") == units  # every unit once: skipped or done, none twice
    assert merge_datasets.main(["--manifest", f"{tmp_path}/run_shards", "--output-prefix", str(tmp_path / "m1")]) == 0
    assert same_pair(f"{tmp_path}/m1_text_document", f"{tmp_path}/plain_text_document")
    assert not [n for n in os.listdir(f"{tmp_path}/run_shards") if ".tmp." in n or n.endswith(".commit")]

    # two machines at once, no coordination
    machines = [subprocess.Popen(_cli(golden_dir, corpus, tmp_path / "two", *shard, "--shard-index", i,
                                      "--num-shards", 2), stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outputs = [None, None]

    def drain(i):
        outputs[i] = machines[i].stderr.read()

    readers = [threading.Thread(target=drain, args=(i,)) for i in (0, 1)]
    for t in readers:
        t.start()
    for i, m in enumerate(machines):
        assert m.wait(timeout=300) == 0
        readers[i].join()
    assert merge_datasets.main(["--manifest", f"{tmp_path}/two_shards", "--output-prefix", str(tmp_path / "m2")]) == 0
    assert same_pair(f"{tmp_path}/m2_text_document", f"{tmp_path}/plain_text_document")
