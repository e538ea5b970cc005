"""GPTDataset samples against a naive reference, masks, the index cache, and mock data."""

import glob
import hashlib
import logging
import multiprocessing
import os

import numpy as np
import pytest

from megatron.core.datasets.dataset_config import GPTDatasetConfig
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset, MockGPTLowLevelDataset, gpt_sample
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

EOD = 0
VOCAB = 500


def make_corpus(prefix, num_docs=120, max_len=40, seed=0):
    """Documents of 1..max_len tokens (ids 1..VOCAB-1) each ending with EOD; returns their tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(num_docs):
        doc = np.append(rng.integers(1, VOCAB, size=int(rng.integers(0, max_len))), EOD).astype(np.uint16)
        builder.add_document([doc])
        docs.append(doc.astype(np.int64))
    builder.finalize()
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "data" / "corpus_text_document")
    os.makedirs(os.path.dirname(prefix))
    return prefix, make_corpus(prefix)


def config(tmp_path, seq_length=16, seed=1234, **kw):
    kw.setdefault("path_to_cache", str(tmp_path / "cache"))
    return GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=((1.0, "unused"),), eod_token_id=EOD, **kw)


def reference_windows(docs, begin, end, num_samples, seq_length, seed):
    """Megatron's GPT sampling done naively: shuffle the documents of all epochs (a short final
    epoch apart), concatenate them, cut overlapping windows of seq_length + 1, shuffle windows."""
    tokens_per_epoch = sum(len(d) for d in docs[begin:end])
    epochs = 1
    while epochs * tokens_per_epoch < num_samples * seq_length + 1:
        epochs += 1
    per_epoch = (tokens_per_epoch - 1) // seq_length
    sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    separate = epochs > 1 and (num_samples - sans_final) < int(0.8 * per_epoch)
    rs = np.random.RandomState(seed)
    ids = np.arange(begin, end, dtype=np.int32)
    if separate:
        order = np.tile(ids, epochs - 1)
        rs.shuffle(order)
        last = ids.copy()
        rs.shuffle(last)
        order = np.concatenate([order, last])
    else:
        order = np.tile(ids, epochs)
        rs.shuffle(order)
    stream = np.concatenate([docs[d] for d in order])
    count = (len(stream) - 1) // seq_length
    windows = [stream[k * seq_length : k * seq_length + seq_length + 1] for k in range(count)]
    first_block = sans_final if separate else count
    shuffle = np.arange(first_block, dtype=np.uint32)
    rs.shuffle(shuffle)
    if first_block < count:
        rest = np.arange(first_block, count, dtype=np.uint32)
        rs.shuffle(rest)
        shuffle = np.concatenate([shuffle, rest])
    doc_ends = np.cumsum([len(docs[d]) for d in order])
    return windows, shuffle, epochs, separate, doc_ends


@pytest.mark.parametrize(
    "begin,end,num_samples,seq_length",
    [(0, 120, None, 16), (10, 100, 50, 16), (10, 100, 400, 16), (0, 120, 230, 16), (5, 30, 300, 7), (0, 3, 40, 64)],
)
def test_samples_match_naive_reference(corpus, tmp_path, begin, end, num_samples, seq_length):
    prefix, docs = corpus
    ds = GPTDataset(IndexedDataset(prefix), (begin, end), num_samples, config(tmp_path, seq_length, seed=11))
    windows, shuffle, epochs, separate, doc_ends = reference_windows(
        docs, begin, end, num_samples or 0, seq_length, seed=11
    )
    assert ds.plan.num_epochs == epochs and ds.plan.separate_final_epoch == separate
    assert len(ds) == len(windows) >= (num_samples or 0)
    for i in range(len(ds)):
        sample = ds[i]
        window = windows[shuffle[i]]
        np.testing.assert_array_equal(sample["tokens"], window[:-1])
        np.testing.assert_array_equal(sample["labels"], window[1:])
        assert sample["tokens"].dtype == np.int64 and sample["labels"].dtype == np.int64
        assert sample["tokens"].shape == (seq_length,)
    # the cases do exercise windows spanning documents, and overlapping consecutive windows
    starts = np.arange(len(windows)) * seq_length
    crossing = np.searchsorted(doc_ends, starts, "right") != np.searchsorted(doc_ends, starts + seq_length, "right")
    assert crossing.any()
    if len(windows) > 1:
        assert windows[0][-1] == windows[1][0]


def test_cases_cover_multiple_epochs_and_a_separate_final_epoch(corpus, tmp_path):
    prefix, _ = corpus
    ds = GPTDataset(IndexedDataset(prefix), (10, 100), 400, config(tmp_path))
    assert ds.plan.num_epochs >= 3
    ds = GPTDataset(IndexedDataset(prefix), (0, 120), 230, config(tmp_path))
    assert ds.plan.num_epochs == 2 and ds.plan.separate_final_epoch


def reference_masks(tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's _get_ltor_masks_and_position_ids, loop for loop."""
    n = len(tokens)
    attention = np.tril(np.ones((n, n)))
    loss_mask = np.ones(n, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = np.arange(n)
    prev = 0
    for i in np.flatnonzero(tokens == eod):
        if reset_attention_mask:
            attention[i + 1 :, : i + 1] = 0
        if reset_position_ids:
            position_ids[i + 1 :] -= i + 1 - prev
            prev = i + 1
    return attention[None] < 0.5, loss_mask, position_ids


@pytest.mark.parametrize("flags", [(False, False, False), (True, False, False), (False, True, True), (True, True, True)])
def test_masks_and_position_ids_match_megatron(flags):
    reset_pos, reset_attn, mask_loss = flags
    rng = np.random.default_rng(0)
    for trial in range(20):
        text = rng.integers(0, 4, size=33)  # eod (0) frequent, at the ends too
        if trial == 0:
            text[-2] = EOD
        sample = gpt_sample(text, EOD, reset_pos, reset_attn, mask_loss)
        attention, loss_mask, position_ids = reference_masks(text[:-1], EOD, reset_pos, reset_attn, mask_loss)
        np.testing.assert_array_equal(sample["loss_mask"], loss_mask)
        np.testing.assert_array_equal(sample["position_ids"], position_ids)
        assert sample["loss_mask"].dtype == np.float32 and sample["position_ids"].dtype == np.int64
        if reset_attn:
            np.testing.assert_array_equal(sample["attention_mask"], attention)
            assert sample["attention_mask"].dtype == np.bool_
        else:
            assert "attention_mask" not in sample


def test_dataset_applies_config_masks(corpus, tmp_path):
    prefix, _ = corpus
    cfg = config(tmp_path, eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    sample = GPTDataset(IndexedDataset(prefix), (0, 120), 20, cfg)[3]
    tokens = sample["tokens"]
    assert (sample["loss_mask"][tokens == EOD] == 0).all() and (sample["loss_mask"][tokens != EOD] == 1).all()
    assert sample["attention_mask"].shape == (1, 16, 16)


# ---- cache ------------------------------------------------------------------------------------


def index_files(directory, key):
    return {os.path.basename(p).split("-", 1)[1]: p for p in glob.glob(os.path.join(directory, f"{key}-*"))}


def test_cache_is_written_then_reused(corpus, tmp_path):
    prefix, _ = corpus
    cfg = config(tmp_path)
    first = GPTDataset(IndexedDataset(prefix), (0, 100), 300, cfg)
    files = index_files(cfg.path_to_cache, first.cache_key)
    assert set(files) == {"document_index.npy", "sample_index.npy", "shuffle_index.npy", "description.json"}
    assert not isinstance(first.sample_index, np.memmap)
    second = GPTDataset(IndexedDataset(prefix), (0, 100), 300, cfg)
    assert second.cache_key == first.cache_key
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert isinstance(getattr(second, name), np.memmap)  # loaded, not rebuilt
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    for i in range(0, len(first), 7):
        np.testing.assert_array_equal(second[i]["tokens"], first[i]["tokens"])
    # anything that changes the indices changes the key
    keys = {first.cache_key}
    for ds in (
        GPTDataset(IndexedDataset(prefix), (0, 100), 301, cfg),
        GPTDataset(IndexedDataset(prefix), (0, 99), 300, cfg),
        GPTDataset(IndexedDataset(prefix), (0, 100), 300, config(tmp_path, seed=5)),
        GPTDataset(IndexedDataset(prefix), (0, 100), 300, config(tmp_path, seq_length=17)),
    ):
        keys.add(ds.cache_key)
    assert len(keys) == 5


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage_values", "wrong_dtype", "not_npy"])
def test_corrupt_cache_file_is_rebuilt(corpus, tmp_path, caplog, damage):
    prefix, _ = corpus
    cfg = config(tmp_path)
    fresh = GPTDataset(IndexedDataset(prefix), (0, 100), 300, cfg)
    files = index_files(cfg.path_to_cache, fresh.cache_key)
    path = files["shuffle_index.npy"] if damage == "garbage_values" else files["sample_index.npy"]
    size = os.path.getsize(path)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "garbage_values":
        with open(path, "r+b") as f:
            f.seek(size - 64)
            f.write(b"\xff" * 64)
    elif damage == "wrong_dtype":
        np.save(path, np.asarray(fresh.sample_index, dtype=np.int64))
    else:
        with open(path, "wb") as f:
            f.write(b"this is not an npy file" * 10)
    with caplog.at_level(logging.WARNING):
        rebuilt = GPTDataset(IndexedDataset(prefix), (0, 100), 300, cfg)
    assert "rebuilding" in caplog.text
    assert not isinstance(rebuilt.sample_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(fresh, name))
    again = GPTDataset(IndexedDataset(prefix), (0, 100), 300, cfg)  # the rewrite is valid
    assert isinstance(again.sample_index, np.memmap)
    np.testing.assert_array_equal(again.shuffle_index, fresh.shuffle_index)


def _build_and_digest(prefix, cache_dir, barrier, queue):
    try:
        cfg = GPTDatasetConfig(random_seed=3, sequence_length=16, blend=((1.0, prefix),), path_to_cache=cache_dir)
        barrier.wait(timeout=30)  # both processes build at the same moment
        ds = GPTDataset(IndexedDataset(prefix), (0, 120), 2000, cfg)
        digest = hashlib.sha256()
        for arr in (ds.document_index, ds.sample_index, ds.shuffle_index):
            digest.update(np.ascontiguousarray(arr).tobytes())
        queue.put(("ok", digest.hexdigest()))
    except BaseException as exc:  # report, do not hang the test
        queue.put(("error", repr(exc)))


def test_concurrent_builders_share_one_cache(corpus, tmp_path):
    prefix, _ = corpus
    cache_dir = str(tmp_path / "shared_cache")
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_and_digest, args=(prefix, cache_dir, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert all(status == "ok" for status, _ in results), results
    assert results[0][1] == results[1][1]
    assert not glob.glob(os.path.join(cache_dir, "*.tmp")) and not glob.glob(os.path.join(cache_dir, ".*.tmp"))
    # a later build loads what they wrote and agrees with it
    cfg = GPTDatasetConfig(random_seed=3, sequence_length=16, blend=((1.0, prefix),), path_to_cache=cache_dir)
    ds = GPTDataset(IndexedDataset(prefix), (0, 120), 2000, cfg)
    assert isinstance(ds.shuffle_index, np.memmap)
    digest = hashlib.sha256()
    for arr in (ds.document_index, ds.sample_index, ds.shuffle_index):
        digest.update(np.ascontiguousarray(arr).tobytes())
    assert digest.hexdigest() == results[0][1]


def test_default_cache_lives_next_to_the_data(corpus, tmp_path):
    prefix, _ = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 120), 10, config(tmp_path, path_to_cache=None))
    cache_dir = os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices")
    assert set(index_files(cache_dir, ds.cache_key)) >= {"document_index.npy", "sample_index.npy", "shuffle_index.npy"}


def test_unwritable_cache_path_names_the_flag(corpus, tmp_path):
    prefix, _ = corpus
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = config(tmp_path, path_to_cache=str(blocker / "sub"))
    with pytest.raises(ValueError, match="--data-cache-path"):
        GPTDataset(IndexedDataset(prefix), (0, 120), 10, cfg)


def test_bad_ranges_and_counts(corpus, tmp_path):
    prefix, _ = corpus
    with pytest.raises(ValueError, match="outside"):
        GPTDataset(IndexedDataset(prefix), (0, 121), 10, config(tmp_path))
    with pytest.raises(ValueError):
        GPTDataset(IndexedDataset(prefix), (0, 10), -1, config(tmp_path))
    ds = GPTDataset(IndexedDataset(prefix), (0, 120), 10, config(tmp_path))
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---- mock -------------------------------------------------------------------------------------


def mock_config(seed=5, **kw):
    return GPTDatasetConfig(random_seed=seed, sequence_length=32, mock=True, vocab_size=100,
                            mock_num_documents=300, mock_max_document_length=50, **kw)


def test_mock_documents_are_deterministic_and_well_formed():
    a = MockGPTLowLevelDataset.from_config(mock_config())
    b = MockGPTLowLevelDataset.from_config(mock_config())
    assert a.eod == 99 and len(a) == 300
    for i in range(0, 300, 13):
        doc = a[i]
        np.testing.assert_array_equal(doc, b[i])
        assert len(doc) == a.sequence_lengths[i] and doc[-1] == a.eod
        assert (doc[:-1] != a.eod).all() and doc.min() >= 0 and doc.max() < 100
        np.testing.assert_array_equal(a.get(i, 1, 2), doc[1:3])
    other = MockGPTLowLevelDataset.from_config(mock_config(seed=6))
    assert not all(np.array_equal(a[i], other[i]) for i in range(10))


def test_mock_dataset_samples_match_reference():
    cfg = mock_config(eod_mask_loss=True)
    low = MockGPTLowLevelDataset.from_config(cfg)
    docs = [low[i] for i in range(len(low))]
    ds = MockGPTDataset(low, (20, 250), 500, cfg)
    assert ds.cache_key is None
    windows, shuffle, *_ = reference_windows(docs, 20, 250, 500, 32, seed=5)
    for i in range(0, len(ds), 11):
        sample = ds[i]
        np.testing.assert_array_equal(sample["tokens"], windows[shuffle[i]][:-1])
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert (sample["loss_mask"][sample["tokens"] == 99] == 0).all()


def test_pickles_by_file_name_for_spawned_workers(corpus, tmp_path):
    import pickle

    prefix, _ = corpus
    cfg = config(tmp_path)
    GPTDataset(IndexedDataset(prefix), (0, 120), 300, cfg)
    ds = GPTDataset(IndexedDataset(prefix), (0, 120), 300, cfg)  # cached: memory-mapped indices
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # names, not contents
    clone = pickle.loads(blob)
    assert isinstance(clone.dataset, IndexedDataset) and isinstance(clone.shuffle_index, np.memmap)
    for i in range(0, len(ds), 17):
        np.testing.assert_array_equal(clone[i]["tokens"], ds[i]["tokens"])
    fresh = GPTDataset(IndexedDataset(prefix), (0, 120), 300, config(tmp_path, path_to_cache=str(tmp_path / "c2")))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fresh))[5]["labels"], fresh[5]["labels"])
