#!/usr/bin/env python
"""Throughput of `tools/preprocess_data.py` in MB/s of JSONL input and tokens/s.

Why: the reference tool managed about 0.8-1.6 MB/s with 2 workers on a 2-core machine with a
4k-vocabulary BPE tokenizer; ours must be at least twice as fast. This script builds (or takes) a
JSONL, runs the tool as a subprocess (so start-up costs such as loading the tokenizer are counted
separately from the steady rate the tool itself reports), and prints both figures.

    python benchmarks/preprocess_throughput.py                       # golden corpus repeated to ~50 MB
    python benchmarks/preprocess_throughput.py --input big.jsonl --workers 4 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_INPUT = os.path.join(os.path.dirname(REPO), "shared", "golden", "preprocess", "input")


def repeat_corpus(source: str, target: str, megabytes: float) -> None:
    """Concatenate `source` until `target` holds at least `megabytes` MB."""
    with open(source, "rb") as f:
        data = f.read()
    if not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, int(megabytes * 1e6 // len(data)) + 1)
    with open(target, "wb") as f:
        for _ in range(copies):
            f.write(data)


_BASELINE_TOKENIZER = None


class PythonGPT2BPE:
    """GPT-2 byte-level BPE in plain Python (regex split, byte-to-unicode map, merges by rank with
    a per-word cache), the kind of encoder the reference tool's GPT2BPETokenizer runs; used only
    as the baseline's tokenizer for `--tokenizer-type GPT2BPETokenizer`."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        import json

        import regex

        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")[1:-1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if len(line.split()) == 2}
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
        self.split = regex.compile(self.PATTERN).findall
        self.cache: dict = {}
        self.eod = self.vocab["<|endoftext|>"]

    def _bpe(self, word: str) -> list:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, 1 << 60), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 60:
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the pair, left to right
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return [self.vocab[p] for p in parts]

    def tokenize(self, text: str) -> list:
        ids = []
        for piece in self.split(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            if word not in self.cache:
                self.cache[word] = self._bpe(word)
            ids.extend(self.cache[word])
        return ids


def _baseline_init(config) -> None:
    global _BASELINE_TOKENIZER
    if config.tokenizer_type == "GPT2BPETokenizer":
        _BASELINE_TOKENIZER = PythonGPT2BPE(config.vocab_file, config.merge_file)
        return
    from megatron.training.tokenizer import build_tokenizer

    _BASELINE_TOKENIZER = build_tokenizer(config)


def _baseline_encode(line: str):
    import json

    ids = _BASELINE_TOKENIZER.tokenize(json.loads(line)["text"])
    if ids:
        ids.append(_BASELINE_TOKENIZER.eod)
    return ids, len(line)


def run_baseline(path: str, workers: int, config, out_prefix: str) -> tuple[float, int, float]:
    """The reference tool's architecture, re-created for a same-machine, same-moment comparison:
    a pool of `workers` processes tokenizing one document per call (`imap`, 32 lines per chunk),
    the parent writing each document with `add_document`. Returns (seconds, tokens, CPU seconds
    of parent and workers, the workers' tokenizer loading included)."""
    import multiprocessing

    import numpy as np

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
    from megatron.training.tokenizer import build_tokenizer

    builder = IndexedDatasetBuilder(out_prefix, dtype=optimal_dtype(build_tokenizer(config).vocab_size))
    tokens = 0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_baseline_init, initargs=(config,))
    pool.map(abs, range(workers))  # let the workers finish loading the tokenizer
    start, cpu = time.perf_counter(), time.process_time()
    with open(path, encoding="utf-8") as f:
        for ids, _ in pool.imap(_baseline_encode, f, 32):
            builder.add_document([np.asarray(ids)] if ids else [])
            tokens += len(ids)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    pool.close()
    pool.join()
    builder.finalize()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return seconds, tokens, cpu


# Runs the tool, then prints its own peak RSS (VmHWM, kB): wait4's ru_maxrss would include the
# pre-exec size of this (forking) process, large once the baseline has loaded transformers.
_REPORT_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
with open("/proc/self/status") as f:
    print([line.split()[1] for line in f if line.startswith("VmHWM:")][0])
sys.exit(code)
"""


def run_tool(path: str, out_prefix: str, args: argparse.Namespace) -> dict:
    """One run of tools/preprocess_data.py as a subprocess; its own steady-state figures (measured
    after start-up) plus end-to-end wall time, CPU time and peak RSS."""
    cmd = [sys.executable, "-c", _REPORT_PEAK, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", path,
           "--output-prefix", out_prefix, "--tokenizer-type", args.tokenizer_type,
           "--append-eod", "--workers", str(args.workers), "--log-interval", "100000000"]
    if args.tokenizer_type == "GPT2BPETokenizer":
        cmd += ["--vocab-file", args.vocab_file, "--merge-file", args.merge_file]
    else:
        cmd += ["--tokenizer-model", args.tokenizer_model]
    cmd += args.extra
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, err = proc.stdout, proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"tool failed:\n{err}")
    done = re.search(r"done: ([\d,]+) documents, ([\d,]+) tokens.* in [\d:]+ \(([\d.]+) MB/s, ([\d,]+) tokens/s\)", err)
    if done is None:
        raise RuntimeError(f"no summary line in the tool's output:\n{err}")
    return {"mb_s": float(done.group(3)), "tokens_s": int(done.group(4).replace(",", "")),
            "tokens": int(done.group(2).replace(",", "")), "wall": wall, "peak_mb": int(out.split()[-1]) / 1024,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="JSONL to process (default: golden corpus repeated to --megabytes)")
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="repeat (interleaved with --baseline); best round reported")
    parser.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer", "GPT2BPETokenizer"])
    parser.add_argument("--tokenizer-model", default=os.path.join(GOLDEN_INPUT, "tokenizer"))
    parser.add_argument("--vocab-file", default=os.path.join(GOLDEN_INPUT, "gpt2bpe", "vocab.json"))
    parser.add_argument("--merge-file", default=os.path.join(GOLDEN_INPUT, "gpt2bpe", "merges.txt"))
    parser.add_argument("--baseline", action="store_true",
                        help="also time a re-creation of the reference tool's per-document process pool, same input")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for the tool")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        path = args.input
        if path is None:
            corpus = os.path.join(GOLDEN_INPUT, "corpus.jsonl")
            if not os.path.isfile(corpus):
                print(f"no --input and no golden corpus at {corpus}", file=sys.stderr)
                return 2
            path = os.path.join(tmp, "bench.jsonl")
            repeat_corpus(corpus, path, args.megabytes)
        size_mb = os.path.getsize(path) / 1e6
        print(f"input: {size_mb:.1f} MB, {args.tokenizer_type}, workers {args.workers}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        ours, base = [], []
        for r in range(args.rounds):
            run = run_tool(path, os.path.join(tmp, "out"), args)
            ours.append(run)
            line = (f"round {r + 1}: ours {run['mb_s']:.2f} MB/s, {run['tokens_s']:,} tokens/s (tool's clock, after "
                    f"start-up); end to end {size_mb / run['wall']:.2f} MB/s incl. start-up; "
                    f"{run['cpu_s'] / size_mb:.2f} CPU-s/MB; peak RSS {run['peak_mb']:.0f} MB")
            if args.baseline:
                sys.path.insert(0, REPO)
                from megatron.training.tokenizer import TokenizerConfig

                config = TokenizerConfig(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                         vocab_file=args.vocab_file, merge_file=args.merge_file)
                seconds, _, cpu = run_baseline(path, args.workers, config, os.path.join(tmp, "baseline"))
                base.append(size_mb / seconds)
                line += (f" | per-document pool baseline {base[-1]:.2f} MB/s, {cpu / size_mb:.2f} CPU-s/MB"
                         f" -> {run['mb_s'] / base[-1]:.1f}x")
            print(line, flush=True)
        best = max(ours, key=lambda run: run["mb_s"])
        print(f"best: {best['mb_s']:.2f} MB/s, {best['tokens_s']:,} tokens/s"
              + (f"; baseline best {max(base):.2f} MB/s -> {best['mb_s'] / max(base):.1f}x" if base else ""))
        print("reference (Megatron-LM core_v0.12.0, 2 workers, this 2-core machine): 0.8-1.6 MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
