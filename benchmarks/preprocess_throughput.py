#!/usr/bin/env python
"""End-to-end time of `tools/preprocess_data.py` against Megatron-LM's own tool, same input, same flags.

Both tools run as subprocesses on the same JSONL (by default the golden corpus repeated to about
50 MB), with the same flags and worker count, one after the other in each round; the wall time
includes start-up (imports, tokenizer loading), which is what a user waits for. The outputs are
compared byte for byte. Megatron-LM is not part of this repository: pass the root of a checkout
(e.g. core_v0.12.0) with --megatron-root; its tool also needs `six` and `einops`, which
--megatron-pythonpath can point to (e.g. a `pip install --target DIR six einops` folder).

    python benchmarks/preprocess_throughput.py --megatron-root /tmp/megatron-lm-v0.12 \\
        --megatron-pythonpath /tmp/megatron-deps --workers 1 2
    python benchmarks/preprocess_throughput.py --workers 2          # ours only
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_RSS = os.path.join(REPO, "scripts", "peak_rss.py")  # runs a script, prints its peak RSS (kB) last
GOLDEN_INPUT = os.path.join(REPO, "tests", "data", "golden", "preprocess", "input")


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


def tool_flags(args: argparse.Namespace, path: str, prefix: str, workers: int) -> List[str]:
    flags = ["--input", path, "--output-prefix", prefix, "--tokenizer-type", args.tokenizer_type,
             "--append-eod", "--workers", str(workers), "--log-interval", "100000000"]
    if args.tokenizer_type == "GPT2BPETokenizer":
        flags += ["--vocab-file", args.vocab_file, "--merge-file", args.merge_file]
    else:
        flags += ["--tokenizer-model", args.tokenizer_model]
    return flags


def run_tool(root: str, flags: List[str], pythonpath: Optional[str]) -> dict:
    """One run of `<root>/tools/preprocess_data.py`: wall seconds and peak RSS (MB)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, PEAK_RSS, os.path.join(root, "tools", "preprocess_data.py"), *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{root}/tools/preprocess_data.py failed:\n{proc.stderr[-4000:]}")
    return {"wall": wall, "peak_mb": int(proc.stdout.split()[-1]) / 1024, "stderr": proc.stderr}


def identical(prefix_a: str, prefix_b: str) -> bool:
    return all(filecmp.cmp(prefix_a + ext, prefix_b + ext, shallow=False) for ext in (".bin", ".idx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="JSONL to process (default: golden corpus repeated to --megabytes)")
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="one or more worker counts")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (ours and Megatron's alternate); median reported")
    parser.add_argument("--megatron-root", help="root of a Megatron-LM checkout whose tools/preprocess_data.py to time")
    parser.add_argument("--megatron-pythonpath", help="extra PYTHONPATH for Megatron's tool (six, einops)")
    parser.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer", "GPT2BPETokenizer"])
    parser.add_argument("--tokenizer-model", default=os.path.join(GOLDEN_INPUT, "tokenizer"))
    parser.add_argument("--vocab-file", default=os.path.join(GOLDEN_INPUT, "gpt2bpe", "vocab.json"))
    parser.add_argument("--merge-file", default=os.path.join(GOLDEN_INPUT, "gpt2bpe", "merges.txt"))
    args = parser.parse_args()
    if args.megatron_root and not os.path.isfile(os.path.join(args.megatron_root, "tools", "preprocess_data.py")):
        parser.error(f"--megatron-root {args.megatron_root}: no tools/preprocess_data.py there")

    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        path = args.input
        if path is None:
            path = os.path.join(tmp, "bench.jsonl")
            repeat_corpus(os.path.join(GOLDEN_INPUT, "corpus.jsonl"), path, args.megabytes)
        size_mb = os.path.getsize(path) / 1e6
        print(f"input: {size_mb:.1f} MB, {args.tokenizer_type}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        for workers in args.workers:
            ours, theirs = [], []
            for r in range(args.rounds):
                run = run_tool(REPO, tool_flags(args, path, os.path.join(tmp, "ours"), workers), None)
                ours.append(run)
                done = re.search(r"done: ([\d,]+) documents, ([\d,]+) tokens", run["stderr"])
                line = (f"workers {workers} round {r + 1}: ours {run['wall']:.1f} s ({size_mb / run['wall']:.2f} MB/s "
                        f"end to end, {done.group(2) if done else '?'} tokens, peak RSS {run['peak_mb']:.0f} MB)")
                if args.megatron_root:
                    mg = run_tool(args.megatron_root, tool_flags(args, path, os.path.join(tmp, "megatron"), workers),
                                  args.megatron_pythonpath)
                    theirs.append(mg)
                    same = identical(os.path.join(tmp, "ours_text_document"), os.path.join(tmp, "megatron_text_document"))
                    line += (f" | Megatron-LM {mg['wall']:.1f} s ({size_mb / mg['wall']:.2f} MB/s, peak RSS "
                             f"{mg['peak_mb']:.0f} MB) -> {mg['wall'] / run['wall']:.2f}x; outputs "
                             f"{'byte-identical' if same else 'DIFFER'}")
                    if not same:
                        print(line, flush=True)
                        return 1
                print(line + f"; load {os.getloadavg()[0]:.1f}", flush=True)
            ours_s = statistics.median(r["wall"] for r in ours)
            summary = f"workers {workers}: ours median {ours_s:.1f} s ({size_mb / ours_s:.2f} MB/s)"
            if theirs:
                mg_s = statistics.median(r["wall"] for r in theirs)
                summary += f", Megatron-LM median {mg_s:.1f} s ({size_mb / mg_s:.2f} MB/s): {mg_s / ours_s:.2f}x"
            print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
