"""build_train_valid_test_datasets: single prefix, blends, mock; config validation."""

import os

import numpy as np
import pytest

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.dataset_builder import build_train_valid_test_datasets
from megatron.core.datasets.dataset_config import GPTDatasetConfig, parse_data_path
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOD = 0


def make_corpus(prefix, num_docs, first_token, seed):
    """Documents whose tokens all lie in [first_token, first_token + 100): tells corpora apart."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix, np.int32)
    for _ in range(num_docs):
        builder.add_document([np.append(rng.integers(first_token, first_token + 100, int(rng.integers(1, 30))), EOD)])
    builder.finalize()


@pytest.fixture
def corpora(tmp_path):
    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    make_corpus(a, 200, 1000, 0)
    make_corpus(b, 150, 2000, 1)
    make_corpus(c, 80, 3000, 2)
    return a, b, c


def cfg(tmp_path, blend, split="90,8,2", **kw):
    return GPTDatasetConfig(random_seed=9, sequence_length=12, blend=blend, split=split,
                            path_to_cache=str(tmp_path / "cache"), eod_token_id=EOD, **kw)


def test_single_prefix_splits(corpora, tmp_path):
    a, _, _ = corpora
    train, valid, test = build_train_valid_test_datasets(cfg(tmp_path, [(1.0, a)]), (100, 20, 5))
    assert all(isinstance(d, GPTDataset) for d in (train, valid, test))
    assert (train.document_range, valid.document_range, test.document_range) == ((0, 180), (180, 196), (196, 200))
    assert len(train) >= 100 and len(valid) >= 20 and len(test) >= 5
    train2, valid2, _ = build_train_valid_test_datasets(cfg(tmp_path, [(1.0, a)], split="1,0,1"), (100, 20, 5))
    assert valid2 is None and train2.document_range == (0, 100)


def test_blend_proportions_and_determinism(corpora, tmp_path):
    a, b, c = corpora
    blend = [(2.0, a), (5.0, b), (3.0, c)]
    train, valid, test = build_train_valid_test_datasets(cfg(tmp_path, blend), (1000, 100, 10))
    assert isinstance(train, BlendedDataset) and (len(train), len(valid), len(test)) == (1000, 100, 10)
    np.testing.assert_allclose(train.weights, [0.2, 0.5, 0.3])
    for dataset, n in ((train, 1000), (valid, 100)):
        counts = np.bincount(dataset.dataset_index, minlength=3)
        assert np.abs(counts - np.array([0.2, 0.5, 0.3]) * n).max() <= 1
    # components were asked for weight * n * 1.005 samples, rounded up
    assert [d.num_samples for d in train.datasets] == [201, 503, 302]
    # each sample comes from the corpus the index says (token ranges tell the corpora apart)
    for i in range(0, 1000, 37):
        sample = train[i]
        body = sample["tokens"][sample["tokens"] != EOD]
        assert ((body // 1000) == sample["dataset_id"] + 1).all()
        np.testing.assert_array_equal(
            sample["tokens"], train.datasets[train.dataset_index[i]][train.dataset_sample_index[i]]["tokens"]
        )
    again, *_ = build_train_valid_test_datasets(cfg(tmp_path, blend), (1000, 100, 10))
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)
    for i in range(0, 1000, 53):
        np.testing.assert_array_equal(again[i]["tokens"], train[i]["tokens"])
    assert isinstance(again.dataset_index, np.memmap)  # blend indices came from the cache
    import pickle

    blob = pickle.dumps(again)  # as sent to spawned DataLoader workers: file names, not arrays
    assert len(blob) < 16384
    np.testing.assert_array_equal(pickle.loads(blob)[999]["tokens"], train[999]["tokens"])


def test_blend_with_zero_weight_split(corpora, tmp_path):
    a, b, _ = corpora
    train, valid, test = build_train_valid_test_datasets(cfg(tmp_path, [(1, a), (1, b)], split="1,0,0"), (50, 0, 0))
    assert isinstance(train, BlendedDataset) and valid is None and test is None


def test_mock_builder(tmp_path):
    config = GPTDatasetConfig(random_seed=1, sequence_length=8, mock=True, vocab_size=64,
                              mock_num_documents=1000, mock_max_document_length=20)
    train, valid, test = build_train_valid_test_datasets(config, (200, 20, 2))
    assert all(isinstance(d, MockGPTDataset) for d in (train, valid, test))
    assert train[0]["tokens"].shape == (8,)
    train2, *_ = build_train_valid_test_datasets(config, (200, 20, 2))
    np.testing.assert_array_equal(train2[17]["labels"], train[17]["labels"])


def test_empty_split_that_must_give_samples_names_the_flag(tmp_path):
    prefix = str(tmp_path / "tiny")
    make_corpus(prefix, 10, 1000, 0)
    with pytest.raises(ValueError, match="--split"):
        build_train_valid_test_datasets(cfg(tmp_path, [(1.0, prefix)], split="969,30,1"), (10, 1, 1))
    train, valid, test = build_train_valid_test_datasets(cfg(tmp_path, [(1.0, prefix)], split="969,30,1"), (10, 0, 0))
    assert train is not None and valid is None and test is None


def test_missing_prefix_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--data-path"):
        build_train_valid_test_datasets(cfg(tmp_path, [(1.0, str(tmp_path / "nope"))]), (1, 0, 0))


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(sequence_length=0), "--seq-length"),
        (dict(sequence_length=2.5), "--seq-length"),
        (dict(split="1,2,3,4"), "--split"),
        (dict(split="0,0"), "--split"),
        (dict(blend=None), "--data-path"),
        (dict(blend=[]), "--data-path"),
        (dict(blend=[(0.0, "a")]), "--data-path"),
        (dict(blend=[(-1, "a"), (2, "b")]), "--data-path"),
        (dict(blend=[(1.0, "a.bin")]), "--data-path"),
        (dict(blend=[(1.0, "")]), "--data-path"),
        (dict(mock=True), "--mock-data"),
        (dict(mock=True, blend=None, vocab_size=1), "--mock-data"),
        (dict(random_seed=-1), "--seed"),
        (dict(eod_token_id=None, eod_mask_loss=True), "--eod-mask-loss"),
        (dict(eod_token_id=None, reset_position_ids=True), "--reset-position-ids"),
    ],
)
def test_config_validation_names_the_flag(tmp_path, kwargs, flag):
    base = dict(random_seed=1, sequence_length=8, blend=[(1.0, "data/a")], eod_token_id=0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=flag):
        GPTDatasetConfig(**base)


def test_cache_path_that_is_a_file_names_the_flag(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    with pytest.raises(ValueError, match="--data-cache-path"):
        GPTDatasetConfig(random_seed=1, sequence_length=8, blend=[(1.0, "a")], path_to_cache=str(path))


def test_config_is_frozen_and_blend_is_a_tuple():
    config = GPTDatasetConfig(random_seed=1, sequence_length=8, blend=[[0.3, "a"], [0.7, "b"]])
    assert config.blend == ((0.3, "a"), (0.7, "b"))
    assert config.blend_weights == pytest.approx([0.3, 0.7])
    with pytest.raises(Exception):
        config.sequence_length = 4  # type: ignore[misc]
    hash(config)


def test_parse_data_path():
    assert parse_data_path(["a"]) == ((1.0, "a"),)
    assert parse_data_path("0.3 a 0.7 b") == ((0.3, "a"), (0.7, "b"))
    for bad in (["0.3", "a", "0.7"], ["x", "a", "0.5", "b"], []):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)


def test_bad_sample_counts():
    config = GPTDatasetConfig(random_seed=1, sequence_length=8, mock=True, vocab_size=10, mock_num_documents=20)
    for bad in ((1, 2), (1, -1, 0), (1.5, 0, 0)):
        with pytest.raises(ValueError):
            build_train_valid_test_datasets(config, bad)


def test_blended_dataset_refuses_short_components(corpora, tmp_path):
    a, b, _ = corpora
    config = cfg(tmp_path, [(1, a), (1, b)])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    small = GPTDataset(IndexedDataset(a), (0, 10), None, config)
    big = GPTDataset(IndexedDataset(b), (0, 150), 1000, config)
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([small, big], [0.5, 0.5], 2 * len(small) + 10, config)
    with pytest.raises(ValueError):
        BlendedDataset([small], [0.5, 0.5], 10, config)
    assert os.path.isdir(config.path_to_cache)
