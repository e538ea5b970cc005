#!/usr/bin/env python
"""Run transformers' DeepSeek model and ours on the same tokens and compare their logits.

    python tools/compare_with_hf.py --hf-path HF_DIR --token-ids "1 2 3 4" --token-ids "5 6 7"
    python tools/compare_with_hf.py --hf-path HF_DIR --checkpoint OUR_DIR --prompts "Hello" --tokenizer TOK_DIR

Our model is converted from --hf-path unless --checkpoint names one of ours: a training checkpoint
of any parallel layout (a `--save` directory, an iter_N directory, or the output of
`tools/convert_hf_checkpoint.py import`) or the single-process format (config.json + safetensors);
the tool says which it found. Each sequence runs on
its own (no padding). Prints max |diff|, max relative difference (max |diff| / max |HF logit| per
sequence), KL(HF || ours) averaged over tokens, and top-1 agreement; exits 1 when a figure is
outside its tolerance (defaults depend on --dtype, flags override), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/compare_with_hf.py` from a checkout

# dtype -> (max relative difference, mean KL, min top-1 agreement)
DEFAULT_TOLERANCES = {"float32": (1e-4, 1e-6, 0.99), "bfloat16": (5e-2, 5e-3, 0.9), "float16": (1e-2, 1e-3, 0.95)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-path", required=True, help="HF DeepSeek-V3 / V2 model directory")
    parser.add_argument("--checkpoint", help="our checkpoint: training checkpoint or single-process directory (default: convert --hf-path)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--token-ids", action="append", help='space-separated token ids, e.g. "1 2 3" (repeatable)')
    inputs.add_argument("--prompts", nargs="+", help="texts to tokenize with --tokenizer")
    parser.add_argument("--tokenizer", help="tokenizer directory for --prompts (default: --hf-path)")
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOLERANCES), default="float32")
    parser.add_argument("--attn-implementation", default="eager", help="HF attention implementation (eager, sdpa)")
    parser.add_argument("--max-rel", type=float, help="max allowed relative logit difference")
    parser.add_argument("--max-abs", type=float, help="max allowed absolute logit difference (default: unchecked)")
    parser.add_argument("--max-kl", type=float, help="max allowed mean KL(HF || ours)")
    parser.add_argument("--min-top1", type=float, help="min allowed top-1 agreement (fraction of tokens)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser


def compare_logits(hf_logits: "List", our_logits: "List") -> Dict[str, float]:
    """Figures over sequences: lists of [s, V] (or [1, s, V]) logits of HF and ours."""
    import torch

    max_abs = max_rel = kl_sum = agree = 0.0
    tokens = 0
    for ref, ours in zip(hf_logits, our_logits):
        ref, ours = ref.double().reshape(-1, ref.shape[-1]), ours.double().reshape(-1, ours.shape[-1])
        diff = (ref - ours).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(ref.abs().max().item(), 1e-30))
        log_ref, log_ours = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kl_sum += (log_ref.exp() * (log_ref - log_ours)).sum().item()
        agree += (ref.argmax(-1) == ours.argmax(-1)).sum().item()
        tokens += ref.shape[0]
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "mean_kl": kl_sum / max(tokens, 1),
            "top1_agreement": agree / max(tokens, 1), "tokens": tokens}


def _sequences(args: argparse.Namespace) -> List[List[int]]:
    if args.token_ids:
        try:
            seqs = [[int(t) for t in text.replace(",", " ").split()] for text in args.token_ids]
        except ValueError as err:
            raise ValueError(f"--token-ids must be integers: {err}") from None
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.hf_path)
        seqs = [tokenizer(text)["input_ids"] for text in args.prompts]
    if any(not s for s in seqs):
        raise ValueError("every sequence needs at least one token")
    return seqs


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.core.models.deepseek.hf_conversion import load_hf_checkpoint
    from megatron.training.checkpoint_export import load_any_model
    from megatron.training.checkpoint_io import CheckpointError

    dtype = getattr(torch, args.dtype)
    try:
        seqs = _sequences(args)
        hf = AutoModelForCausalLM.from_pretrained(args.hf_path, dtype=dtype, attn_implementation=args.attn_implementation).eval()
        if args.checkpoint:
            ours, _, found = load_any_model(args.checkpoint, dtype)
            print(f"our model: {found}")
        else:
            ours, _ = load_hf_checkpoint(args.hf_path, dtype)
    except (ValueError, FileNotFoundError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ours.eval()
    vocab = ours.config.vocab_size
    if any(t < 0 or t >= vocab for s in seqs for t in s):
        print(f"error: token ids must be in [0, {vocab})", file=sys.stderr)
        return 2
    hf_out, our_out = [], []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            hf_out.append(hf(ids).logits.float())
            our_out.append(ours(ids).logits.float())
    figures = compare_logits(hf_out, our_out)
    rel_tol, kl_tol, top1_tol = DEFAULT_TOLERANCES[args.dtype]
    checks = [
        ("max_rel_diff", figures["max_rel_diff"], args.max_rel if args.max_rel is not None else rel_tol, "<="),
        ("mean_kl", figures["mean_kl"], args.max_kl if args.max_kl is not None else kl_tol, "<="),
        ("top1_agreement", figures["top1_agreement"], args.min_top1 if args.min_top1 is not None else top1_tol, ">="),
    ]
    if args.max_abs is not None:
        checks.append(("max_abs_diff", figures["max_abs_diff"], args.max_abs, "<="))
    failed = [name for name, value, tol, op in checks if not (value <= tol if op == "<=" else value >= tol)]
    print(f"{len(seqs)} sequence(s), {figures['tokens']} tokens, dtype {args.dtype}")
    for name, value, tol, op in checks + ([] if args.max_abs is not None else [("max_abs_diff", figures["max_abs_diff"], None, "")]):
        bound = "" if tol is None else f"  (tolerance {op} {tol:g}){'  FAIL' if name in failed else ''}"
        print(f"  {name:15s} {value:.6g}{bound}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(figures, failed=failed, dtype=args.dtype), f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
