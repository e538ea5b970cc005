#!/usr/bin/env python
"""Generate text from, or measure the perplexity of, a DeepSeek model in one process.

    python tools/generate.py --hf-path HF_DIR --prompt "Once upon a time" --max-new-tokens 32
    python tools/generate.py --load CKPT_DIR --tokenizer-model TOK_DIR --prompt-file prompts.txt \\
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1 --stop "\\n\\n"
    echo "a prompt" | python tools/generate.py --hf-path HF_DIR --prompt - --max-new-tokens 16
    python tools/generate.py --hf-path HF_DIR --perplexity corpus.txt

Model: `--hf-path` is a Hugging Face DeepSeek-V3/V2 directory read through our converter;
`--load` a training checkpoint of any parallel layout, gathered into this process.
Tokenizer: `--tokenizer-model DIR` (with `--tokenizer-type`, default HuggingFaceTokenizer); else
the HF directory itself for `--hf-path`, or the tokenizer flags saved with a training checkpoint.
Prompts: every `--prompt`, then the lines of `--prompt-file` (one prompt per non-empty line);
`--prompt -` reads stdin the same way. Generation stops per prompt at the tokenizer's end of
document, at `--max-new-tokens`, or where a `--stop` string appears (the continuation is cut
before it). One continuation per prompt goes to stdout (`--output-format jsonl` for one JSON
object per line); tokens/s goes to stderr.
`--perplexity FILE`: mean next-token loss and perplexity of the file's raw text, in windows of
the model's max_position_embeddings tokens (`--max-length` to override).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/generate.py` from a checkout

_DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face DeepSeek-V3/V2 directory (config.json + safetensors)")
    src.add_argument("--load", help="training checkpoint directory (any TP/PP/EP layout)")
    p.add_argument("--tokenizer-model", help="tokenizer directory or file (default: --hf-path, or the checkpoint's)")
    p.add_argument("--tokenizer-type", default=None, help="Megatron tokenizer type (default HuggingFaceTokenizer)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --tokenizer-type NullTokenizer")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; '-' reads prompts from stdin")
    p.add_argument("--prompt-file", help="file with one prompt per non-empty line")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="greedy self-speculative decoding with the MTP depths")
    p.add_argument("--num-draft", type=int, default=None, help="MTP depths used for drafting (default: all)")
    p.add_argument("--perplexity", metavar="FILE", help="report loss and perplexity of FILE's text instead")
    p.add_argument("--max-length", type=int, default=None, help="perplexity window (default: max_position_embeddings)")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "hpu"))
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    p.add_argument("--output-format", default="text", choices=("text", "jsonl"))
    return p


# ---- loading ---------------------------------------------------------------------------------------
def load_training_checkpoint(load_dir: str) -> Tuple[Any, Any, Any]:
    """(model, config, saved TokenizerConfig or None) of a training checkpoint. The one place that
    imports the training checkpoint reader."""
    from megatron.training.checkpointing import CheckpointError, checkpoint_args, load_full_model

    try:
        model, config = load_full_model(load_dir)
    except CheckpointError as exc:
        raise ValueError(f"--load {load_dir}: {exc}") from exc
    return model, config, saved_tokenizer_config(checkpoint_args(load_dir) or {})


def saved_tokenizer_config(flat_args: dict) -> Any:
    """The TokenizerConfig stored in a checkpoint's flat run arguments ("tokenizer.<field>"), or None."""
    import dataclasses

    from megatron.training.tokenizer import TokenizerConfig

    values = {
        f.name: flat_args[f"tokenizer.{f.name}"]
        for f in dataclasses.fields(TokenizerConfig)
        if f"tokenizer.{f.name}" in flat_args
    }
    if not values.get("tokenizer_type"):
        return None
    return TokenizerConfig(**values)


def load_model(args: argparse.Namespace) -> Tuple[Any, Any, Any]:
    """(model, config, tokenizer config saved with the checkpoint or None)."""
    if args.hf_path:
        from megatron.core.models.deepseek import load_hf_checkpoint

        model, config = load_hf_checkpoint(args.hf_path)
        return model, config, None
    return load_training_checkpoint(args.load)


def load_tokenizer(args: argparse.Namespace, saved_config: Any) -> Any:
    from megatron.training.tokenizer import TokenizerConfig, build_tokenizer

    if args.tokenizer_model or args.tokenizer_type:
        kind = args.tokenizer_type or "HuggingFaceTokenizer"
        return build_tokenizer(TokenizerConfig(kind, tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size))
    if args.hf_path:
        return build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=args.hf_path))
    if saved_config is not None and saved_config.tokenizer_type:
        return build_tokenizer(saved_config)
    raise ValueError("no tokenizer: pass --tokenizer-model DIR (or --tokenizer-type NullTokenizer --vocab-size N)")


def read_prompts(args: argparse.Namespace) -> List[str]:
    prompts: List[str] = []
    for text in args.prompt:
        if text == "-":
            prompts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
        else:
            prompts.append(text)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts.extend(line for line in f.read().splitlines() if line.strip())
    return prompts


# ---- output ------------------------------------------------------------------------------------------
def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    """text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def continuation_text(tokenizer: Any, tokens: List[int], eod: Optional[int], stops: Sequence[str]) -> str:
    if eod is not None and tokens and tokens[-1] == eod:
        tokens = tokens[:-1]
    return cut_at_stop(tokenizer.detokenize(tokens), stops)[0]


def run_generation(args: argparse.Namespace, model: Any, tokenizer: Any, vocab_size: Optional[int], eod: Optional[int]) -> int:
    from megatron.core.inference import generate

    prompts = read_prompts(args)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT, --prompt-file FILE or --prompt - (stdin)")
    if args.max_new_tokens is None:
        raise ValueError("--max-new-tokens is required for generation")
    ids = tokenizer.tokenize_batch(prompts)
    start = time.perf_counter()
    outputs = generate(
        model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eod=eod, seed=args.seed, vocab_size=vocab_size, speculative=args.speculative, num_draft=args.num_draft,
    )
    elapsed = time.perf_counter() - start
    for prompt, tokens in zip(prompts, outputs):
        text = continuation_text(tokenizer, tokens, eod, args.stop)
        if args.output_format == "jsonl":
            print(json.dumps({"prompt": prompt, "continuation": text, "tokens": tokens}, ensure_ascii=False))
        else:
            print(text)
    total = sum(len(t) for t in outputs)
    print(f"generated {total} tokens for {len(prompts)} prompts in {elapsed:.3f} s "
          f"({total / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def run_perplexity(args: argparse.Namespace, model: Any, tokenizer: Any, vocab_size: Optional[int]) -> int:
    from megatron.core.inference import score_tokens

    with open(args.perplexity, encoding="utf-8") as f:
        ids = tokenizer.tokenize(f.read())
    if len(ids) < 2:
        raise ValueError(f"{args.perplexity}: needs at least 2 tokens, has {len(ids)}")
    start = time.perf_counter()
    result = score_tokens(model, ids, args.max_length, args.batch_size, vocab_size)
    elapsed = time.perf_counter() - start
    print(f"tokens {result.num_tokens} loss {result.loss:.6f} perplexity {result.perplexity:.4f}")
    print(f"scored {result.num_tokens} tokens in {elapsed:.3f} s ({result.num_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0 if math.isfinite(result.loss) else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron.core.device import get_device

    try:
        model, config, saved_tokenizer = load_model(args)
        tokenizer = load_tokenizer(args, saved_tokenizer)
        device = get_device(args.device).torch_device()
        model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size} rows")
        vocab_size = tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None
        try:
            eod: Optional[int] = tokenizer.eod
        except (ValueError, NotImplementedError, AttributeError):
            eod = None
        if args.perplexity:
            return run_perplexity(args, model, tokenizer, vocab_size)
        return run_generation(args, model, tokenizer, vocab_size, eod)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
