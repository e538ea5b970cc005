#!/usr/bin/env python
"""Convert DeepSeek-V3 / V2 checkpoints between Hugging Face format and ours.

    python tools/convert_hf_checkpoint.py import --hf-path HF_DIR --output OUR_DIR [--dtype bfloat16]
    python tools/convert_hf_checkpoint.py export --checkpoint OUR_DIR --hf-path HF_OUT [--model-type deepseek_v2]

import: HF directory (config.json + safetensors, per-expert or fused expert keys, block-FP8 weights
dequantised) -> our format (config.json of DeepSeekConfig + safetensors with our names; see
megatron/core/models/deepseek/hf_io.py). Peak memory: about the model plus one tensor.
export: our format -> HF safetensors (per-expert keys, as DeepSeek released them) + config.json,
loadable by transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM. Streams one of our
tensors at a time. Both write shards of at most --max-shard-size bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/convert_hf_checkpoint.py` from a checkout

_DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'4GB', '500MiB', '123' -> bytes."""
    stripped = text.strip().upper()
    digits = stripped.rstrip("KMGIB")
    unit = stripped[len(digits):]
    if unit not in _UNITS or not digits:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 4GB, 500MiB or a byte count")
    return int(float(digits) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> our checkpoint")
    imp.add_argument("--hf-path", required=True, help="HF model directory (config.json + *.safetensors)")
    imp.add_argument("--output", required=True, help="our checkpoint directory to write")
    imp.add_argument("--dtype", choices=_DTYPES, default="float32", help="parameter dtype of the output (expert bias stays fp32)")
    imp.add_argument("--max-shard-size", type=parse_size, default=parse_size("4GB"))
    imp.add_argument("--missing-mtp", choices=("drop", "error"), default="drop",
                     help="config declares MTP layers the checkpoint lacks (HF save_pretrained drops them)")
    exp = sub.add_parser("export", help="our checkpoint -> HF checkpoint")
    exp.add_argument("--checkpoint", required=True, help="our checkpoint directory")
    exp.add_argument("--hf-path", required=True, help="HF directory to write")
    exp.add_argument("--model-type", choices=("deepseek_v3", "deepseek_v2"), default="deepseek_v3")
    exp.add_argument("--dtype", choices=_DTYPES, default=None, help="cast floating tensors (default: keep)")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("4GB"))
    return parser


def _is_training_checkpoint(path: str) -> bool:
    """A `--save` directory of pretrain_gpt.py (tracker file) or one of its iter_N directories."""
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")) or (
        os.path.basename(os.path.normpath(path)).startswith("iter_") and os.path.isfile(os.path.join(path, "common.json"))
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron.core.models.deepseek.hf_conversion import export_hf_checkpoint, load_hf_checkpoint
    from megatron.core.models.deepseek.hf_io import save_checkpoint

    from megatron.training.checkpoint_io import CheckpointError

    start = time.perf_counter()
    try:
        if args.command == "import":
            model, config = load_hf_checkpoint(args.hf_path, getattr(torch, args.dtype), "cpu", missing_mtp=args.missing_mtp)
            names = save_checkpoint(model, config, args.output, args.max_shard_size)
            count = sum(p.numel() for p in model.parameters())
            print(f"imported {args.hf_path} -> {args.output}: {count:,} parameters, {len(names)} shard(s), "
                  f"{config.num_layers} layers + {config.mtp.num_layers} MTP, {time.perf_counter() - start:.1f}s")
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            source = args.checkpoint
            if _is_training_checkpoint(source):
                # torch_dist checkpoint of any parallel layout: gather it into one model first.
                from megatron.training.checkpointing import load_full_model

                source, _ = load_full_model(args.checkpoint)
            names = export_hf_checkpoint(source, args.hf_path, args.model_type, dtype=dtype, max_shard_bytes=args.max_shard_size)
            print(f"exported {args.checkpoint} -> {args.hf_path} ({args.model_type}): {len(names)} shard(s), "
                  f"{time.perf_counter() - start:.1f}s")
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
