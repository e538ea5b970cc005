#!/usr/bin/env python
"""Merge Megatron `.bin/.idx` datasets into one.

    python tools/merge_datasets.py --input DIR --output-prefix data/merged           # all pairs in DIR, by name
    python tools/merge_datasets.py --input-prefixes data/a data/b --output-prefix data/merged

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
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.bin and {prefix}.idx")
    parser.add_argument("--multimodal", action="store_true", help=argparse.SUPPRESS)  # Megatron flag; not supported
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetError
    from megatron.training.data_prep.merge import merge_datasets, prefixes_in_directory

    try:
        if args.multimodal:
            raise ValueError("--multimodal datasets (sequence modes) are not supported by this tool")
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


if __name__ == "__main__":
    sys.exit(main())
