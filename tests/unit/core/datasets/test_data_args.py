"""Megatron's --data-args-path / --per-split-data-args-path file formats, and blends built from
them equal to the same blend given on the command line; building a blend is safe when every
rank starts at once on one cache directory."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from megatron.core.datasets.data_args import read_data_args_file, read_per_split_data_args_file
from megatron.core.datasets.dataset_builder import build_train_valid_test_datasets
from megatron.core.datasets.dataset_config import GPTDatasetConfig, parse_data_path
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def make_corpora(folder, count, docs=40):
    prefixes = []
    for k in range(count):
        prefix = str(folder / f"part_{k:03d}")
        rng = np.random.default_rng(k)
        builder = IndexedDatasetBuilder(prefix, np.uint16)
        for _ in range(docs):
            builder.add_document([rng.integers(100 * k + 1, 100 * k + 100, int(rng.integers(2, 30)))])
        builder.finalize()
        prefixes.append(prefix)
    return prefixes


def config(blend_values, cache):
    return GPTDatasetConfig(random_seed=5, sequence_length=16, blend=parse_data_path(blend_values), split="90,10,0",
                            path_to_cache=str(cache), vocab_size=4000)


def test_data_args_file_equals_command_line_blend(tmp_path):
    prefixes = make_corpora(tmp_path, 12)
    cli = [v for i, p in enumerate(prefixes) for v in (str(0.5 + i % 4), p)]
    args_file = tmp_path / "blend.txt"
    lines = ["# twelve parts, weights 0.5 to 3.5"] + [f"{w}  {p}" for w, p in zip(cli[0::2], cli[1::2])]
    args_file.write_text("\n".join(lines) + "\n")
    assert read_data_args_file(str(args_file)) == cli
    a, av, _ = build_train_valid_test_datasets(config(cli, tmp_path / "c1"), (500, 40, 0))
    b, bv, _ = build_train_valid_test_datasets(config(read_data_args_file(str(args_file)), tmp_path / "c2"), (500, 40, 0))
    for x, y in ((a, b), (av, bv)):
        assert np.array_equal(x.dataset_index, y.dataset_index)
        assert np.array_equal(x.dataset_sample_index, y.dataset_sample_index)
        for i in range(0, len(x), 37):
            assert np.array_equal(x[i]["tokens"], y[i]["tokens"])


def test_per_split_file(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [0.3, "a", "0.7", "b"], "valid": "c", "test": []}))
    assert read_per_split_data_args_file(str(path)) == {"train": ["0.3", "a", "0.7", "b"], "valid": ["c"], "test": []}
    path.write_text(json.dumps({"train": ["a"]}))
    assert read_per_split_data_args_file(str(path)) == {"train": ["a"], "valid": [], "test": []}


def _error(fn, path) -> str:
    with pytest.raises(ValueError) as err:
        fn(str(path))
    return str(err.value)


def test_errors_name_the_file(tmp_path):
    f = tmp_path / "args.txt"
    assert _error(read_data_args_file, f) == f"--data-args-path {f}: file not found"
    f.write_text("# nothing but a comment\n\n")
    assert _error(read_data_args_file, f) == (
        f"--data-args-path {f}: the file lists no datasets (expected a prefix, or weight/prefix pairs)")
    f.write_text("0.3 a 0.7\n")
    assert _error(read_data_args_file, f) == (
        f"--data-args-path {f}: takes one prefix or weight/prefix pairs ('0.3 pathA 0.7 pathB'), got ['0.3', 'a', '0.7']")
    f.write_text("0.3 a heavy b\n")
    assert _error(read_data_args_file, f) == f"--data-args-path {f}: weight 'heavy' (before 'b') is not a number"
    j = tmp_path / "s.json"
    j.write_text('{"train": ["a"]\n "valid": ["b"]}')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: not valid JSON: Expecting ',' delimiter (line 2, column 2)")
    j.write_text('["a"]')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: expected a JSON object with keys 'train', 'valid', 'test', got list")
    j.write_text('{"train": ["a"], "validation": ["b"]}')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: unknown key(s) 'validation'; the keys are 'train', 'valid', 'test'")
    j.write_text('{"train": {"a": 1}}')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: 'train' must be a list of weights and prefixes (or one string), got dict")
    j.write_text('{"train": ["a", null]}')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: 'train': item 1 is NoneType None, expected a weight or a path prefix")
    j.write_text('{"valid": ["0.5", "a", "b"]}')
    assert _error(read_per_split_data_args_file, j) == (
        f"--per-split-data-args-path {j}: 'valid': takes one prefix or weight/prefix pairs ('0.3 pathA 0.7 pathB'), "
        "got ['0.5', 'a', 'b']")
    j.write_text('{"train": [], "valid": ""}')
    assert _error(read_per_split_data_args_file, j) == f"--per-split-data-args-path {j}: no split lists any dataset"


def _rank_build(values, cache, queue):
    train, _, _ = build_train_valid_test_datasets(config(values, cache), (300, 20, 0))
    queue.put((train.dataset_index.tobytes(), train.dataset_sample_index.tobytes(),
               b"".join(d.shuffle_index.tobytes() for d in train.datasets)))


@pytest.mark.slow
def test_ranks_starting_at_once_share_one_cache(tmp_path):
    prefixes = make_corpora(tmp_path, 30)
    values = [v for p in prefixes for v in ("1", p)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    ranks = [ctx.Process(target=_rank_build, args=(values, tmp_path / "cache", queue)) for _ in range(4)]
    for rank in ranks:
        rank.start()
    results = [queue.get(timeout=120) for _ in ranks]
    for rank in ranks:
        rank.join(timeout=60)
        assert rank.exitcode == 0
    assert all(r == results[0] for r in results)
    leftovers = [n for n in os.listdir(tmp_path / "cache") if n.endswith(".tmp")]
    assert leftovers == []
    # a later start reads everything from the cache and gets the same order
    queue2 = ctx.Queue()
    _rank_build(values, tmp_path / "cache", queue2)
    assert queue2.get(timeout=10) == results[0]
