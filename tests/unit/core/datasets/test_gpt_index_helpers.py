"""Index numerics of the GPT datasets against plain-Python transcriptions of Megatron's rules."""

import shutil
import time

import numpy as np
import pytest

from megatron.core.datasets import blending_kernel, helpers


# ---- references: Megatron's loops, written out naively ---------------------------------------


def reference_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch):
    """Megatron's helpers.cpp build_sample_idx (drop_last, one extra token), line by line."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = [(0, 0)]
    doc_pos, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_len = sizes[document_index[doc_pos]] - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - 1
                remaining = 0
            else:
                doc_pos += 1
                offset = 0
        out.append((doc_pos, offset))
    return np.array(out, dtype=np.int64)


def reference_blend(weights, size):
    counts = [0] * len(weights)
    out = []
    for i in range(size):
        t = float(max(i, 1))
        errors = [w * t - c for w, c in zip(weights, counts)]
        k = errors.index(max(errors))  # first maximum: ties go to the lowest index
        out.append((k, counts[k]))
        counts[k] += 1
    return np.array(out, dtype=np.int64).reshape(-1, 2)


# ---- splits ----------------------------------------------------------------------------------


def test_parse_split_normalises_and_pads():
    assert helpers.parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert helpers.parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert helpers.parse_split(" 1 ") == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "nan,1", "inf"])
def test_parse_split_rejects_bad_values_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--split"):
        helpers.parse_split(bad)


@pytest.mark.parametrize("split", ["969,30,1", "1,1,1", "2,1,1", "90,10,0", "0,1,0", "1,0,1", "7,2,1"])
@pytest.mark.parametrize("n", [1, 7, 10, 101, 999, 123457])
def test_split_ranges_match_megatron(split, n):
    weights = helpers.parse_split(split)
    # Megatron: bookends are running sums; each is scaled by n and rounded; weight 0 -> None.
    bookends = [0.0]
    for w in weights:
        bookends.append(bookends[-1] + w)
    expected = [
        None if hi <= lo else (int(round(lo * float(n))), int(round(hi * float(n))))
        for lo, hi in zip(bookends[:-1], bookends[1:])
    ]
    ranges = helpers.split_document_ranges(weights, n)
    assert ranges == expected
    present = [r for r in ranges if r is not None]
    assert present[0][0] == 0 and present[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(present, present[1:]))  # contiguous, no overlap


def test_split_ranges_examples():
    assert helpers.split_document_ranges(helpers.parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert helpers.split_document_ranges(helpers.parse_split("1,1,1"), 10) == [(0, 3), (3, 7), (7, 10)]
    assert helpers.split_document_ranges(helpers.parse_split("1,0,1"), 10) == [(0, 5), None, (5, 10)]


# ---- GPT indices ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("seq_length", [1, 3, 8, 50])
def test_sample_index_matches_megatron_walk(seed, seq_length):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 30, size=60).astype(np.int32)  # zero-length documents included
    sizes[[3, 11]] = 0
    num_epochs = 3
    document_index = np.tile(np.arange(60, dtype=np.int32), num_epochs)
    np.random.RandomState(seed).shuffle(document_index)
    empty_positions = np.flatnonzero(sizes[document_index] == 0)[:2]
    document_index[[0, 1]], document_index[empty_positions] = document_index[empty_positions], document_index[[0, 1]]
    assert sizes[document_index[0]] == 0  # starts with an empty document, as shuffles can
    tokens_per_epoch = int(sizes.sum())
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    got = helpers.build_sample_index(sizes, document_index, seq_length, num_samples, np.dtype(np.int64))
    want = reference_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch)
    np.testing.assert_array_equal(got, want)


def reference_plan(tokens_per_epoch, num_samples, seq_length):
    """Megatron's _get_num_epochs loop and separate-final-epoch rule."""
    num_epochs, tokens = 1, tokens_per_epoch
    while tokens < num_samples * seq_length + 1:
        num_epochs += 1
        tokens += tokens_per_epoch
    if num_epochs == 1:
        return num_epochs, False
    sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    return num_epochs, (num_samples - sans_final) < int(0.8 * per_epoch)


@pytest.mark.parametrize("num_samples", [0, 1, 5, 30, 31, 32, 55, 60, 61, 90, 200, 1000])
def test_epochs_and_final_epoch_separation(num_samples):
    sizes = np.full(25, 13, dtype=np.int32)  # 325 tokens per epoch, 32 samples of 10
    plan = helpers.plan_gpt_indices(sizes, (0, 25), num_samples, 10)
    assert (plan.num_epochs, plan.separate_final_epoch) == reference_plan(325, num_samples, 10)
    assert plan.num_samples >= num_samples
    assert plan.num_samples == (plan.num_epochs * 325 - 1) // 10


def test_build_gpt_indices_consumes_random_state_like_megatron():
    sizes = np.arange(1, 41, dtype=np.int32)
    docs, sample_index, shuffle, plan = helpers.build_gpt_indices(sizes, (5, 35), 100, 16, seed=7)
    assert plan.num_epochs > 1
    rs = np.random.RandomState(7)
    documents = np.arange(5, 35, dtype=np.int32)
    if plan.separate_final_epoch:
        first = np.tile(documents, plan.num_epochs - 1)
        rs.shuffle(first)
        last = documents.copy()
        rs.shuffle(last)
        want_docs = np.concatenate([first, last])
    else:
        want_docs = np.tile(documents, plan.num_epochs)
        rs.shuffle(want_docs)
    np.testing.assert_array_equal(docs, want_docs)
    first = np.arange(plan.num_samples_sans_final_epoch, dtype=np.uint32)
    rs.shuffle(first)
    rest = np.arange(plan.num_samples_sans_final_epoch, plan.num_samples, dtype=np.uint32)
    if rest.size:
        rs.shuffle(rest)
    np.testing.assert_array_equal(shuffle, np.concatenate([first, rest]))
    assert docs.dtype == np.int32 and sample_index.dtype == np.int32 and shuffle.dtype == np.uint32
    assert helpers.check_gpt_indices(plan, (5, 35), docs, sample_index, shuffle) is None
    assert helpers.check_gpt_indices(plan, (5, 35), docs[:-1], sample_index, shuffle) is not None
    bad = shuffle.copy()
    bad[3] = plan.num_samples
    assert "shuffle" in helpers.check_gpt_indices(plan, (5, 35), docs, sample_index, bad)


def test_separate_final_epoch_keeps_partial_epoch_apart():
    sizes = np.full(50, 21, dtype=np.int32)  # 1050 tokens, 52 samples of 20 per epoch
    docs, _, shuffle, plan = helpers.build_gpt_indices(sizes, (0, 50), 60, 20, seed=3)
    assert plan.num_epochs == 2 and plan.separate_final_epoch
    assert sorted(docs[50:]) == list(range(50))  # the last epoch is whole, shuffled apart
    assert set(shuffle[: plan.num_samples_sans_final_epoch]) == set(range(plan.num_samples_sans_final_epoch))


# ---- blending ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0], [0.3, 0.7], [0.5, 0.5], [0.2, 0.2, 0.6], [0.1] * 10, [1, 2, 3, 4, 5]])
def test_blend_matches_greedy_reference(weights):
    w = np.array(helpers.normalize_weights(weights))
    dataset_index, sample_index = blending_kernel.build_blending_indices(w, 3000)
    want = reference_blend(list(w), 3000)
    np.testing.assert_array_equal(dataset_index, want[:, 0])
    np.testing.assert_array_equal(sample_index, want[:, 1])
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64


def test_blend_prefixes_track_weights():
    w = np.array(helpers.normalize_weights([3, 1, 5, 0.5, 2]))
    dataset_index, sample_index = blending_kernel.build_blending_indices(w, 50_000)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[dataset_index], axis=0)  # [n, K] after each prefix
    target = np.arange(1, 50_001)[:, None] * w[None, :]
    assert np.abs(counts - target).max() < 1.5
    # within a dataset, samples are taken in order 0, 1, 2, ...
    for k in range(len(w)):
        np.testing.assert_array_equal(sample_index[dataset_index == k], np.arange(counts[-1, k]))


needs_cc = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler"
)


@needs_cc
def test_native_blend_agrees_with_python_loop():
    rng = np.random.default_rng(0)
    for k in (2, 3, 17):
        w = rng.random(k)
        w /= w.sum()
        native = blending_kernel.blend_indices_native(w, 40_000)
        python = blending_kernel.blend_indices_python(w, 40_000)
        np.testing.assert_array_equal(native[0], python[0])
        np.testing.assert_array_equal(native[1], python[1])


@needs_cc
def test_blend_of_millions_is_fast():
    w = np.array(helpers.normalize_weights([0.1, 0.25, 0.3, 0.35]))
    start = time.perf_counter()
    dataset_index, _ = blending_kernel.build_blending_indices(w, 5_000_000)
    elapsed = time.perf_counter() - start
    assert np.abs(np.bincount(dataset_index) - w * 5_000_000).max() <= 1
    assert elapsed < 10, f"blending 5e6 samples took {elapsed:.1f} s"


def test_blend_dataset_sizes_have_margin():
    assert helpers.blend_dataset_sizes([0.3, 0.7], 1000) == [302, 704]
    assert helpers.blend_dataset_sizes([1, 3], 0) == [0, 0]


def test_blend_without_a_compiler_falls_back_to_python(monkeypatch):
    w = np.array(helpers.normalize_weights([1, 2, 4]))
    size = blending_kernel.NATIVE_MIN_STEPS // 3 + 10  # large enough to try the compiler
    monkeypatch.setattr(blending_kernel.shutil, "which", lambda name: None)
    assert blending_kernel.blend_indices_native(w, size) is None
    dataset_index, sample_index = blending_kernel.build_blending_indices(w, size)
    want = reference_blend(list(w), size)
    np.testing.assert_array_equal(dataset_index, want[:, 0])
    np.testing.assert_array_equal(sample_index, want[:, 1])
