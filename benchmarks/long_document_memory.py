#!/usr/bin/env python
"""Peak memory of `tools/preprocess_data.py` on one very long document.

    python benchmarks/long_document_memory.py --megabytes 5 20 200

Writes a JSONL holding a single document of the given size (English-like words, with newlines
every few hundred words unless --no-newlines), runs the tool on it in a fresh process (golden
byte-level BPE tokenizer, --append-eod, 2 workers) and prints the tool's own peak RSS (VmHWM) and
wall time. With --check, the tool's output is compared with tokenizing the whole document in
one call (sizes up to 50 MB: whole-text tokenization needs ~70 bytes of memory per character).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_RSS = os.path.join(REPO, "scripts", "peak_rss.py")  # runs a script, prints its peak RSS (kB) last
GOLDEN_TOKENIZER = os.path.join(REPO, "tests", "data", "golden", "preprocess", "input", "tokenizer")


WORDS = ("the of and to in is was for on that with as by at from model token expert layer router gate attention "
         "mixture sparse dense rope scale norm loss batch sequence parallel pipeline training data corpus").split()


def write_document(path: str, megabytes: float, newlines: bool, seed: int = 0) -> int:
    """One JSON line {"text": ...} of about `megabytes` MB, written in slices (never held whole)."""
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"text": "')
        while size < target:
            words = [rng.choice(WORDS) for _ in range(2000)]
            text = " ".join(words) + (". \\n\\n" if newlines else ". ")
            f.write(text)
            size += len(text)
        f.write('"}\n')
    return size


def run(path: str, prefix: str, workers: int) -> tuple[float, float]:
    cmd = [sys.executable, PEAK_RSS, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", path,
           "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", GOLDEN_TOKENIZER,
           "--append-eod", "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start, int(proc.stdout.split()[-1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, nargs="+", default=[5, 20, 200])
    parser.add_argument("--no-newlines", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare with whole-document tokenization")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="long-doc-") as tmp:
        for mb in args.megabytes:
            path = os.path.join(tmp, "doc.jsonl")
            chars = write_document(path, mb, not args.no_newlines)
            seconds, peak = run(path, os.path.join(tmp, "out"), args.workers)
            line = f"one document of {chars / 1e6:.0f} MB: peak RSS {peak:.0f} MB, {seconds:.1f} s"
            if args.check and mb > 50:
                line += "; not checked against whole-document tokenization (it needs ~70 bytes per character)"
            elif args.check:
                sys.path.insert(0, REPO)
                import numpy as np

                from megatron.core.datasets.indexed_dataset import IndexedDataset
                from megatron.training.tokenizer import HuggingFaceTokenizer

                tok = HuggingFaceTokenizer(GOLDEN_TOKENIZER)
                with open(path, encoding="utf-8") as f:
                    whole = tok.tokenize(json.loads(f.readline())["text"]) + [tok.eod]
                ds = IndexedDataset(os.path.join(tmp, "out_text_document"))
                same = np.array_equal(ds[0], np.asarray(whole))
                line += f"; equal to whole-document tokenization: {same}"
            print(line + f"; load {os.getloadavg()[0]:.1f}", flush=True)
            os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
