#!/usr/bin/env python
"""Merge Megatron `.bin/.idx` datasets into one.

    python tools/merge_datasets.py --input DIR --output-prefix data/merged           # all pairs in DIR, by name
    python tools/merge_datasets.py --input-prefixes data/a data/b --output-prefix data/merged
    python tools/merge_datasets.py --manifest data/corpus_shards --output-prefix data/corpus   # sharded run
    python tools/merge_datasets.py --manifest data/corpus_shards --print-data-path             # train on the shards

Inputs must share one token dtype. Document indices are offset correctly and the output is
reopened and checked before the tool reports success. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/merge_datasets.py` from a checkout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory: merge every .bin/.idx pair in it, sorted by name")
    source.add_argument("--input-prefixes", nargs="+", help="dataset prefixes (path without .bin/.idx), merged in this order")
    source.add_argument("--manifest", help="shard folder of a sharded preprocessing run: its units in order, per key")
    parser.add_argument("--output-prefix", help="writes {prefix}.bin and {prefix}.idx ({prefix}_{key}_{level} with --manifest)")
    parser.add_argument("--print-data-path", action="store_true",
                        help="with --manifest: print a --data-path list over the finished shards instead of merging")
    parser.add_argument("--multimodal", action="store_true", help=argparse.SUPPRESS)  # Megatron flag; not supported
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetError
    from megatron.training.data_prep.merge import merge_datasets, prefixes_in_directory

    try:
        if args.multimodal:
            raise ValueError("--multimodal datasets (sequence modes) are not supported by this tool")
        if args.manifest:
            return _merge_manifest(args)
        if not args.output_prefix:
            raise ValueError("--output-prefix is required")
        prefixes = prefixes_in_directory(args.input) if args.input else list(args.input_prefixes)
        merged = merge_datasets(prefixes, args.output_prefix)
    except (IndexedDatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {merged.num_documents:,} documents, "
        f"{len(merged):,} sequences, dtype {merged.dtype}",
        file=sys.stderr,
    )
    merged.close()
    return 0


def _merge_manifest(args: argparse.Namespace) -> int:
    """Merge (or list for --data-path) the units of a sharded run, every key; units must all be
    finished and match their recorded checksums."""
    from megatron.core.datasets.shard_manifest import finished_prefixes, manifest_data_path, read_plan
    from megatron.training.data_prep.merge import merge_datasets
    from megatron.training.data_prep.pipeline import output_prefix_for

    plan = read_plan(args.manifest)
    if args.print_data_path:
        for key in plan["keys"]:
            print(" ".join(manifest_data_path(args.manifest, key)))
        return 0
    if not args.output_prefix:
        raise ValueError("--output-prefix is required to merge (or pass --print-data-path)")
    for key, entries in finished_prefixes(args.manifest).items():
        output = output_prefix_for(args.output_prefix, key, plan["level"] == "sentence")
        merged = merge_datasets([e["prefix"] for e in entries], output)
        print(f"merged {len(entries)} units into {output}: {merged.num_documents:,} documents, {len(merged):,} "
              f"sequences, dtype {merged.dtype}", file=sys.stderr)
        merged.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
