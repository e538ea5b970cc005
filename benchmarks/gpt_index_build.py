"""Time building the GPT dataset indices for a ~1e9-token corpus (seq length 4096, one epoch).

Only the `.idx` matters for index building, so the corpus is fake: realistic document lengths
(lognormal, mean ~1000 tokens) in a real `.idx`, and a sparse `.bin` of the right size (no disk
space, reads as zeros). Prints seconds for: the pure index build (numpy), a cold GPTDataset
(build + write the cache), a warm one (load the cache), reading samples, and a blend.

    python benchmarks/gpt_index_build.py [--tokens 1e9] [--seq-length 4096] [--blend-samples 1e7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets import helpers  # noqa: E402
from megatron.core.datasets.blending_kernel import build_blending_indices  # noqa: E402
from megatron.core.datasets.dataset_config import GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset, write_index  # noqa: E402


def fake_corpus(prefix: str, total_tokens: int, mean_length: float, sigma: float, seed: int) -> int:
    """Write `<prefix>.idx` with lognormal document lengths summing to `total_tokens` and a sparse
    `<prefix>.bin` of matching size; returns the number of documents."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean_length) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lengths = np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=int(total_tokens / mean_length * 1.2) + 10)))
    lengths = np.minimum(lengths, 2**31 - 1).astype(np.int64)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, total_tokens)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(ends[n - 1]) - total_tokens  # exact total
    lengths = lengths[lengths > 0].astype(np.int32)
    dtype = np.dtype(np.uint16)
    write_index(prefix + ".idx", dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * dtype.itemsize)
    return len(lengths)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--mean-doc-length", type=float, default=1000.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of document lengths")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--blend-samples", type=float, default=1e7, help="0 to skip the blending timing")
    parser.add_argument("--blend-datasets", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="where to put the fake corpus (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="gpt-index-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        prefix = os.path.join(workdir, "fake_text_document")
        total = int(args.tokens)
        num_docs, secs = timed(lambda: fake_corpus(prefix, total, args.mean_doc_length, args.sigma, args.seed))
        ds = IndexedDataset(prefix)
        sizes = np.asarray(ds.sequence_lengths)
        num_samples = (total - 1) // args.seq_length  # one epoch's worth
        print(f"corpus: {total:.3g} tokens, {num_docs} documents (mean {sizes.mean():.0f}, max {sizes.max()}),"
              f" written in {secs:.2f} s")
        print(f"target: {num_samples} samples of {args.seq_length} tokens (one epoch)")

        (_, _, _, plan), secs = timed(
            lambda: helpers.build_gpt_indices(sizes, (0, num_docs), num_samples, args.seq_length, args.seed)
        )
        print(f"index build (numpy, in memory):      {secs:8.3f} s  ({plan.num_epochs} epoch, {plan.num_samples} samples)")

        cache = os.path.join(workdir, "cache")
        config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length,
                                  blend=((1.0, prefix),), path_to_cache=cache)
        _, secs = timed(lambda: GPTDataset(IndexedDataset(prefix), (0, num_docs), num_samples, config))
        print(f"GPTDataset cold (build + write cache): {secs:8.3f} s")
        gpt, secs = timed(lambda: GPTDataset(IndexedDataset(prefix), (0, num_docs), num_samples, config))
        print(f"GPTDataset warm (load + check cache):  {secs:8.3f} s")
        picks = np.random.default_rng(0).integers(0, len(gpt), size=1000)
        _, cold = timed(lambda: [gpt[int(i)] for i in picks])
        _, warm = timed(lambda: [gpt[int(i)] for i in picks])
        print(f"__getitem__: {cold / len(picks) * 1e6:.0f} us per sample with cold pages of the sparse .bin, "
              f"{warm / len(picks) * 1e6:.0f} us warm")

        if args.blend_samples > 0:
            weights = np.random.default_rng(0).random(args.blend_datasets) + 0.1
            weights /= weights.sum()
            n = int(args.blend_samples)
            _, secs = timed(lambda: build_blending_indices(weights, n))
            print(f"blend indices ({n:.0e} samples, {args.blend_datasets} datasets): {secs:8.3f} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
