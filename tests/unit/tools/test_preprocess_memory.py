"""Bounded memory: preprocessing a JSONL much larger than the tool's peak resident memory.

User-needs row 27: Megatron's tool exhausted 250 GB of RAM on a 43 GB JSONL. Ours streams (bounded
batches in, add_raw out), so its peak RSS must not grow with the input.

How it is measured: the tool runs in a fresh subprocess, which reports its own peak RSS (VmHWM
from /proc/self/status) when the tool returns, or that of its largest worker process
(RUSAGE_CHILDREN of the tool process: the workers it forked and reaped) if larger. Not ru_maxrss
that this pytest process gets from wait4: Linux carries the pre-exec high-water mark of the
forked child into it, i.e. the size of this pytest process, which can be hundreds of MB once
other tests loaded torch. Not an RLIMIT_AS below the
input size either: Rust thread pools, glibc malloc arenas (64 MB of address space reserved per
thread) and thread stacks reserve virtual memory that is never touched, so an address-space limit
measures reservations, not use, and fails spuriously.
The tokenizer is a real GPT-2 BPE (through its word cache, so `--workers` are worker processes),
trained on long generated words so that each word is one token and the 250 MB run stays short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.unit.tools.preprocess_testlib import REPO_ROOT
from megatron.core.datasets.indexed_dataset import IndexedDataset

PEAK_RSS = os.path.join(REPO_ROOT, "scripts", "peak_rss.py")  # runs a script, prints its peak RSS (kB) last

pytestmark = pytest.mark.slow


def _long_word_bpe(folder: str) -> list:
    from tokenizers import ByteLevelBPETokenizer

    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(32, 48)))) for _ in range(40)]
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(rng.choice(words, size=200)) for _ in range(200)]
    bpe.train_from_iterator(corpus, vocab_size=3000, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(folder)
    return words


def _generate(path: str, words: list, megabytes: float) -> tuple[int, int]:
    """Documents drawn from a pool of 300 distinct ones, so generation is I/O bound."""
    rng = np.random.default_rng(0)
    pool = [(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(100, 3000))))}) + "\n").encode()
            for _ in range(300)]
    size = lines = 0
    with open(path, "wb") as f:
        while size < megabytes * 1e6:
            picks = rng.integers(0, len(pool), 100)
            chunk = b"".join(pool[i] for i in picks)
            f.write(chunk)
            size += len(chunk)
            lines += len(picks)
    return size, lines




def _peak_rss_mb(folder: str, data: str, prefix: str) -> float:
    cmd = [sys.executable, PEAK_RSS, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", data,
           "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{folder}/vocab.json",
           "--merge-file", f"{folder}/merges.txt", "--append-eod", "--workers", "2", "--log-interval", "1000000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS (VmHWM) from /proc")
def test_peak_memory_is_bounded_by_batches_not_input(tmp_path):
    folder = str(tmp_path)
    words = _long_word_bpe(folder)
    small, _ = _generate(f"{folder}/small.jsonl", words, 5)
    big, big_lines = _generate(f"{folder}/big.jsonl", words, 250)
    try:
        peak_small = _peak_rss_mb(folder, f"{folder}/small.jsonl", f"{folder}/small")
        peak_big = _peak_rss_mb(folder, f"{folder}/big.jsonl", f"{folder}/big")
        ds = IndexedDataset(f"{folder}/big_text_document")
        assert ds.num_documents == big_lines
        ds.close()
    finally:
        os.remove(f"{folder}/big.jsonl")
    print(f"input {small / 1e6:.0f} MB -> peak RSS {peak_small:.0f} MB; input {big / 1e6:.0f} MB -> {peak_big:.0f} MB")
    assert peak_big < big / 1e6 / 2, f"peak RSS {peak_big:.0f} MB is not well below the {big / 1e6:.0f} MB input"
    assert peak_big - peak_small < 40, f"peak RSS grew from {peak_small:.0f} to {peak_big:.0f} MB with a 35x larger input"
