#!/usr/bin/env python
"""Tokenize a corpus into Megatron `.bin/.idx` pairs (one per --json-keys key).

Same flags and byte-identical output as Megatron-LM core_v0.12.0's `tools/preprocess_data.py`,
but streaming (bounded memory), batch-tokenized (Rust tokenizer threads) and strict about bad
input. Example:

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer \\
        --append-eod --workers 8

Inputs: JSON lines (.jsonl/.json, optionally .gz), Parquet, Arrow, a `datasets.save_to_disk`
folder, CSV/TSV/text via `datasets`, a folder of such files, a glob, or `@list.txt` (a file
listing inputs one per line). The logic lives in `megatron.training.data_prep`; nothing here
imports torch.

Sharded and resumable (one pair per input file, or per N MB of JSON lines; a manifest of
finished units; several machines split the units with --shard-index/--num-shards):

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok --append-eod \
        --shard-size-mb 512 --shard-index 0 --num-shards 4 --resume
    python tools/merge_datasets.py --manifest data/corpus_shards --output-prefix data/corpus
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/preprocess_data.py` from a checkout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="input file, glob, folder of files or save_to_disk folder")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize, one output pair each")
    group.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (NLTK punkt)")
    group.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed records (bad JSON, missing key, non-text value, bad UTF-8), count and report them")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, help="e.g. HuggingFaceTokenizer, GPT2BPETokenizer")
    group.add_argument("--tokenizer-model", default=None, help="tokenizer folder / model file")
    group.add_argument("--vocab-file", default=None)
    group.add_argument("--merge-file", default=None)
    group.add_argument("--vocab-size", type=int, default=None, help="for tokenizers that need it (NullTokenizer)")
    group.add_argument("--extra-vocab-size", type=int, default=0)
    group.add_argument("--vocab-extra-ids", type=int, default=0, help="accepted for Megatron compatibility; must be 0")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--lang", default="english", help="punkt language for --split-sentences")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_{document|sentence}.bin/.idx")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads (or processes)")
    group.add_argument("--partitions", type=int, default=1,
                       help="Megatron's partitions; only the document order of the output depends on it")
    group.add_argument("--log-interval", type=int, default=1000, help="progress line every this many documents")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="with --partitions: contiguous chunks instead of round-robin (keeps input order)")
    group.add_argument("--batch-bytes", type=int, default=1 << 20, help=argparse.SUPPRESS)

    group = parser.add_argument_group("sharding")
    group.add_argument("--sharded", action="store_true",
                       help="one output pair per input file under {prefix}_shards/, with a manifest of finished units")
    group.add_argument("--shard-size-mb", type=float, default=None,
                       help="also cut JSON-lines files into units of this many MB (implies --sharded)")
    group.add_argument("--shard-index", type=int, default=0, help="this process's share: units u with u %% n == i")
    group.add_argument("--num-shards", type=int, default=1, help="number of processes (machines) splitting the units")
    group.add_argument("--resume", action="store_true", help="skip units whose recorded output verifies")
    group.add_argument("--executor", choices=["auto", "threads", "processes"], default="auto", help=argparse.SUPPRESS)
    return parser


def build_tokenizer_from_args(args: argparse.Namespace):
    """The project tokenizer for Megatron's tokenizer flags."""
    from megatron.training.tokenizer import TokenizerConfig, build_tokenizer

    if args.vocab_extra_ids:
        raise ValueError("--vocab-extra-ids (T5 sentinel tokens) is not supported by our tokenizers; leave it at 0")
    config = TokenizerConfig(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        extra_vocab_size=args.extra_vocab_size,
    )
    return build_tokenizer(config)


def main(argv: Optional[List[str]] = None, tokenizer=None, splitter=None) -> int:
    """Returns the exit status; `tokenizer` / `splitter` may be injected (tests)."""
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetError
    from megatron.training.data_prep.encode import configure_thread_pool
    from megatron.training.data_prep.inputs import InputError
    from megatron.training.data_prep.pipeline import PreprocessConfig, preprocess
    from megatron.training.data_prep.sentences import SentenceSplitterUnavailable, load_sentence_splitter

    config = PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, append_eod=args.append_eod,
        workers=args.workers, partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
        log_interval=args.log_interval, skip_bad_lines=args.skip_bad_lines, lang=args.lang, batch_bytes=args.batch_bytes,
        executor=args.executor,
    )
    try:
        config.validate()
        if config.split_sentences and splitter is None:
            splitter = load_sentence_splitter(config.lang, config.keep_newlines)  # before the slow tokenizer load
        configure_thread_pool(config.workers)  # before the tokenizer library first runs
        if tokenizer is None:
            tokenizer = build_tokenizer_from_args(args)
        sharded = args.sharded or args.shard_size_mb is not None or args.num_shards > 1 or args.resume
        if sharded:
            from megatron.training.data_prep.shards import run_sharded

            if args.shard_size_mb is not None and args.shard_size_mb <= 0:
                raise ValueError(f"--shard-size-mb must be positive, got {args.shard_size_mb}")
            shard_bytes = int(args.shard_size_mb * 1e6) if args.shard_size_mb is not None else None
            run_sharded(config, tokenizer, splitter, shard_bytes, args.shard_index, args.num_shards, args.resume)
        else:
            preprocess(config, tokenizer, splitter)
    except (InputError, SentenceSplitterUnavailable, IndexedDatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
