#!/usr/bin/env python
"""Start-up costs of the training datasets: a blend of many prefixes, and the token-id scan.

    python benchmarks/dataset_open.py blend --datasets 1000     # build + cache, then a warm start
    python benchmarks/dataset_open.py scan --tokens 1e9         # vocabulary check of one .bin

`blend` writes N small `.bin/.idx` pairs, then times `build_train_valid_test_datasets` over the
blend of all of them (every prefix opened and validated, its token ids scanned, its GPT indices
built and cached, the blend indices built and cached) with a cold cache, and again with the
cache warm (what every later start, and every rank but the first, pays). `scan` writes one pair
of the given size (random uint16 ids) and times `scan_token_range` on it: once right after
writing (pages cached) and the cached check of a second start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.core.datasets.dataset_builder import build_train_valid_test_datasets  # noqa: E402
from megatron.core.datasets.dataset_config import GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from megatron.core.datasets.token_range import cached_token_range, scan_token_range  # noqa: E402


def write_pair(prefix: str, documents: int, mean_length: int, rng: np.random.Generator, vocab: int) -> int:
    lengths = np.maximum(1, rng.lognormal(np.log(mean_length), 0.7, size=documents).astype(np.int64))
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    tokens = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.uint16)
    builder.add_raw(tokens.tobytes(), lengths.astype(np.int32), np.arange(1, documents + 1))
    builder.finalize()
    return int(lengths.sum())


def bench_blend(args: argparse.Namespace, tmp: str) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    prefixes, tokens = [], 0
    for k in range(args.datasets):
        prefix = os.path.join(tmp, "data", f"shard_{k:05d}")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        tokens += write_pair(prefix, args.documents, args.mean_length, rng, 4000)
        prefixes.append(prefix)
    print(f"wrote {args.datasets} pairs, {tokens:,} tokens, in {time.perf_counter() - start:.1f} s", flush=True)
    weights = rng.uniform(0.5, 2.0, size=args.datasets)
    blend = tuple((float(w), p) for w, p in zip(weights, prefixes))
    config = GPTDatasetConfig(random_seed=1, sequence_length=args.seq_length, blend=blend, split="99,1,0",
                              path_to_cache=os.path.join(tmp, "cache"), vocab_size=4096)
    samples = (args.samples, args.samples // 100, 0)
    for label in ("cold cache (build + write)", "warm cache (every later start)"):
        start = time.perf_counter()
        train, valid, _ = build_train_valid_test_datasets(config, samples)
        seconds = time.perf_counter() - start
        print(f"{args.datasets} datasets, {len(train):,} train samples, {label}: {seconds:.2f} s", flush=True)


def bench_scan(args: argparse.Namespace, tmp: str) -> None:
    prefix = os.path.join(tmp, "big")
    total = int(args.tokens)
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    rng = np.random.default_rng(0)
    chunk = 1 << 26
    lengths = []
    for begin in range(0, total, chunk):
        n = min(chunk, total - begin)
        builder.write_token_bytes(rng.integers(0, 50000, size=n, dtype=np.uint16).tobytes())
        lengths.append(n)
    docs = np.full(total // 1000, 1000, dtype=np.int32)
    docs[-1] += total - docs.sum()
    builder.add_raw(b"", docs, np.arange(1, len(docs) + 1))
    builder.finalize()
    start = time.perf_counter()
    dataset = IndexedDataset(prefix)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    low, high = scan_token_range(dataset)
    scanned = time.perf_counter() - start
    cached_token_range(dataset, os.path.join(tmp, "cache"))
    start = time.perf_counter()
    cached_token_range(dataset, os.path.join(tmp, "cache"))
    cached = time.perf_counter() - start
    print(f"{total:,} tokens ({os.path.getsize(prefix + '.bin') / 1e9:.1f} GB .bin, {len(docs):,} documents): open + "
          f"index validation {opened:.2f} s; token id scan {scanned:.2f} s (ids {low}..{high}); cached check "
          f"{cached * 1000:.1f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    blend = sub.add_parser("blend")
    blend.add_argument("--datasets", type=int, default=1000)
    blend.add_argument("--documents", type=int, default=200, help="documents per dataset")
    blend.add_argument("--mean-length", type=int, default=500, help="mean tokens per document")
    blend.add_argument("--seq-length", type=int, default=1024)
    blend.add_argument("--samples", type=int, default=200_000, help="train samples of the blend")
    scan = sub.add_parser("scan")
    scan.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dataset-open-", dir=args.dir) as tmp:
        (bench_blend if args.what == "blend" else bench_scan)(args, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
