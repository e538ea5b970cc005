#!/usr/bin/env python
"""Convert DeepSeek-V3 / V2 checkpoints between Hugging Face format and ours.

    python tools/convert_hf_checkpoint.py import --hf-path HF_DIR --output CKPT_DIR [--dtype bfloat16]
    python tools/convert_hf_checkpoint.py export --checkpoint CKPT_DIR --hf-path HF_OUT [--model-type deepseek_v2]

import: HF directory (config.json + safetensors, per-expert or fused expert keys, block-FP8 weights
dequantised) -> a training checkpoint (the distributed `torch_dist` format, iteration 0, weights
only, with the model's arguments): training starts from it with `--load CKPT_DIR` (plus
`--finetune` / `--use-checkpoint-args`), `tools/verify_checkpoint.py` checks it, and
`tools/compare_with_hf.py --checkpoint` compares it. Peak memory: about the model plus one tensor.
export: a training checkpoint of any parallel layout (or the older single-process format:
config.json + safetensors with our names) -> HF safetensors (per-expert keys, as DeepSeek released
them) + config.json, loadable by transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, in
shards of at most --max-shard-size bytes. The HF model type follows the checkpoint's router
(softmax: deepseek_v2, sigmoid: deepseek_v3); --model-type overrides it.
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
    imp.add_argument("--output", required=True, help="training checkpoint directory to write (iteration 0)")
    imp.add_argument("--dtype", choices=_DTYPES, default="float32", help="parameter dtype of the output (expert bias stays fp32)")
    imp.add_argument("--missing-mtp", choices=("drop", "error"), default="drop",
                     help="config declares MTP layers the checkpoint lacks (HF save_pretrained drops them)")
    exp = sub.add_parser("export", help="our checkpoint -> HF checkpoint")
    exp.add_argument("--checkpoint", required=True, help="training checkpoint (save root or iter_N) or single-process directory")
    exp.add_argument("--hf-path", required=True, help="HF directory to write")
    exp.add_argument("--model-type", choices=("deepseek_v3", "deepseek_v2"), default=None,
                     help="HF model type (default: from the checkpoint's router: softmax -> deepseek_v2, sigmoid -> deepseek_v3)")
    exp.add_argument("--dtype", choices=_DTYPES, default=None, help="cast floating tensors (default: keep)")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("4GB"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron.core.models.deepseek.hf_conversion import export_hf_checkpoint, load_hf_checkpoint
    from megatron.core.models.deepseek.hf_io import read_our_config
    from megatron.training.checkpoint_export import describe, infer_model_type, load_any_model, save_model_checkpoint
    from megatron.training.checkpoint_io import CheckpointError

    start = time.perf_counter()
    try:
        if args.command == "import":
            model, config = load_hf_checkpoint(args.hf_path, getattr(torch, args.dtype), "cpu", missing_mtp=args.missing_mtp)
            path = save_model_checkpoint(model, config, args.output)
            count = sum(p.numel() for p in model.parameters())
            print(f"imported {args.hf_path} -> {path} (training checkpoint, iteration 0, weights only): {count:,} "
                  f"parameters, {config.num_layers} layers + {config.mtp.num_layers} MTP, {time.perf_counter() - start:.1f}s")
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            found = describe(args.checkpoint)
            print(f"reading {found}")
            if found.startswith("single-process"):  # streamed tensor by tensor from its safetensors
                source, config = args.checkpoint, read_our_config(args.checkpoint)
            else:  # any parallel layout, gathered into one process
                source, config, _ = load_any_model(args.checkpoint)
            model_type = args.model_type or infer_model_type(config)
            names = export_hf_checkpoint(source, args.hf_path, model_type, dtype=dtype, max_shard_bytes=args.max_shard_size)
            print(f"exported {args.checkpoint} -> {args.hf_path} ({model_type}"
                  f"{'' if args.model_type else ', from the checkpoint'}): {len(names)} shard(s), {time.perf_counter() - start:.1f}s")
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
