#!/usr/bin/env python
"""Generation throughput on CPU: our generate() vs transformers' generate(), same weights; latent
cache size; self-speculative decoding with MTP drafts on a small trained model.

    python benchmarks/generate.py                      # all three parts, fp32, 2 threads
    python benchmarks/generate.py --no-speculative --reps 5 --json out.json
    python benchmarks/generate.py --append-results     # also add a row to benchmarks/RESULTS.md

1. Throughput: a random HF DeepseekV3ForCausalLM (sizes below, ~8M parameters: vocab 4096,
   hidden 256, 4 layers with the first dense, 16 routed experts top-4 in 4 groups, MLA with
   q LoRA 96, kv LoRA 64, 8 heads of 32 + 16 rope, v 32) is saved and loaded through our converter,
   so both run the SAME weights. The same batch of prompts of different lengths (left-padded
   with an attention mask for transformers) is decoded greedily for --new tokens; timed runs
   alternate between the two after one warm-up each. tokens/s = batch * new / wall time, median.
   The new tokens of both are compared.
2. Cache: bytes per token over all layers of our latent cache (kv_lora_rank + qk_rope_head_dim per
   layer), of a conventional full K/V cache (num_heads * (qk_head_dim + v_head_dim) per layer),
   and what transformers' DynamicCache actually held after its run; also the DeepSeek-V3 671B
   figures in bf16.
3. Speculative: our model with MTP depths is trained for --train-steps on the repository's
   English test corpus (tests/data/golden/preprocess/input, 4096-entry BPE), then held-out
   prompts are decoded greedily, plainly and with 1..D MTP drafts: acceptance rate, main-model
   forwards, tokens/s and whether the tokens equal plain greedy's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from megatron.core.config import MLAConfig, MTPConfig  # noqa: E402
from megatron.core.inference import (  # noqa: E402
    InferenceEngine,
    full_kv_elements_per_token,
    generate,
    latent_elements_per_token,
    speculative_generate,
)
from megatron.core.models.deepseek import DeepSeekModel, config_from_hf, load_hf_checkpoint  # noqa: E402

CORPUS_DIR = os.path.join(_REPO_ROOT, "tests", "data", "golden", "preprocess", "input")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--reps", type=int, default=3, help="timed runs of each implementation")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the speculative model")
    p.add_argument("--mtp-depths", type=int, default=2)
    p.add_argument("--no-speculative", action="store_true")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--append-results", action="store_true", help="append a row to benchmarks/RESULTS.md")
    return p


def hf_config(vocab: int = 4096):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        max_position_embeddings=1024, num_nextn_predict_layers=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def timed(fn: Callable[[], object], cpu: List[float] | None = None) -> float:
    """Wall seconds of fn(); its process CPU seconds are appended to `cpu` (a fairer figure when
    other jobs share the machine)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


# ---- 1 + 2: throughput and cache ---------------------------------------------------------------------
def throughput(args: argparse.Namespace) -> Dict[str, object]:
    from transformers import DeepseekV3ForCausalLM

    config = hf_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(config).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours, our_config = load_hf_checkpoint(tmp)
    ours.eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [32 + 16 * (i % 4) for i in range(args.batch)]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    longest = max(lengths)
    ids = torch.zeros(args.batch, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                               pad_token_id=0, return_dict_in_generate=True)

    def run_ours():
        return generate(ours, prompts, args.new)

    hf_out, our_tokens = run_hf(), run_ours()  # warm-up, and the outputs to compare
    hf_tokens = hf_out.sequences[:, longest:].tolist()
    times: Dict[str, List[float]] = {"hf": [], "ours": []}
    cpu: Dict[str, List[float]] = {"hf": [], "ours": []}
    for _ in range(args.reps):
        times["hf"].append(timed(run_hf, cpu["hf"]))
        times["ours"].append(timed(run_ours, cpu["ours"]))
    tokens = args.batch * args.new
    hf_tps = tokens / statistics.median(times["hf"])
    our_tps = tokens / statistics.median(times["ours"])

    # Cache: ours from the engine, transformers' from the tensors its DynamicCache held.
    cache = hf_out.past_key_values
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    hf_tokens_cached = args.batch * (longest + args.new - 1)
    engine = InferenceEngine(ours, 1, 1)
    mla = our_config.mla
    full = full_kv_elements_per_token(mla) * our_config.num_layers * 4
    v3 = MLAConfig()  # DeepSeek-V3 671B: 61 layers, bf16
    return {
        "params": sum(p.numel() for p in ours.parameters()),
        "batch": args.batch, "prompt_lengths": lengths, "new_tokens": args.new,
        "hf_tokens_per_s": round(hf_tps, 1), "ours_tokens_per_s": round(our_tps, 1),
        "ratio": round(our_tps / hf_tps, 2),
        "hf_times_s": [round(t, 3) for t in times["hf"]], "ours_times_s": [round(t, 3) for t in times["ours"]],
        "cpu_ratio": round(statistics.median(cpu["hf"]) / statistics.median(cpu["ours"]), 2),
        "rows_identical": sum(a == b for a, b in zip(our_tokens, hf_tokens)),
        "cache_bytes_per_token_ours": engine.cache_bytes_per_token(),
        "cache_bytes_per_token_full_kv": full,
        "cache_bytes_per_token_hf_measured": round(hf_bytes / hf_tokens_cached, 1),
        "v3_671b_bf16_bytes_per_token_latent": latent_elements_per_token(v3) * 61 * 2,
        "v3_671b_bf16_bytes_per_token_full_kv": full_kv_elements_per_token(v3) * 61 * 2,
    }


# ---- 3: speculative decoding -------------------------------------------------------------------------
def corpus_tokens() -> List[List[int]]:
    from megatron.training.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(os.path.join(CORPUS_DIR, "tokenizer"))
    with open(os.path.join(CORPUS_DIR, "corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [ids + [tok.eod] for ids in tok.tokenize_batch(texts)]


def speculative(args: argparse.Namespace) -> Dict[str, object]:
    docs = corpus_tokens()
    held_out = [d for d in docs[-200:] if len(d) >= 48][: args.batch]
    stream = torch.tensor([t for d in docs[:-200] for t in d])
    config = config_from_hf(hf_config())
    config = dataclasses.replace(config, mtp=MTPConfig(num_layers=args.mtp_depths, loss_scaling_factor=0.3))
    torch.manual_seed(0)
    model = DeepSeekModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq, micro = 128, 8
    start = time.perf_counter()
    losses = []
    for step in range(args.train_steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
        offsets = torch.randint(0, stream.numel() - seq - 1, (micro,), generator=gen)
        window = torch.stack([stream[o : o + seq + 1] for o in offsets.tolist()])
        out = model(window[:, :-1], labels=window[:, 1:])
        loss = model.loss(out, torch.ones(micro, seq))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(out.losses.mean().item())
    train_s = time.perf_counter() - start
    model.eval()
    prompts = [d[:32] for d in held_out]
    plain = generate(model, prompts, args.new)
    result: Dict[str, object] = {
        "train_steps": args.train_steps, "train_s": round(train_s, 1),
        "final_lm_loss": round(statistics.mean(losses[-20:]), 3),
    }
    tokens = len(prompts) * args.new
    depths = range(1, args.mtp_depths + 1)

    def plain_alone():  # latency use: each prompt decoded on its own (batch 1)
        for p in prompts:
            generate(model, [p], args.new)

    def spec_alone(d: int):
        for p in prompts:
            speculative_generate(model, [p], args.new, num_draft=d)

    runs: Dict[str, Callable[[], object]] = {
        "plain": lambda: generate(model, prompts, args.new), "plain_b1": plain_alone,
    }
    for d in depths:
        runs[f"spec{d}"] = lambda d=d: speculative_generate(model, prompts, args.new, num_draft=d)
        runs[f"spec{d}_b1"] = lambda d=d: spec_alone(d)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.reps):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    result["plain_tokens_per_s"] = round(tps["plain"], 1)
    result["plain_batch1_tokens_per_s"] = round(tps["plain_b1"], 1)
    for d in depths:
        out, stats = speculative_generate(model, prompts, args.new, num_draft=d)
        single = [speculative_generate(model, [p], args.new, num_draft=d)[1] for p in prompts]
        result[f"draft{d}"] = {
            "identical_to_greedy": out == plain,
            "acceptance_rate": round(stats.acceptance_rate, 3),
            "acceptance_rate_batch1": round(sum(s.accepted for s in single) / sum(s.drafted for s in single), 3),
            "main_forwards_batch": stats.rounds + 1,
            "main_forwards_per_prompt_alone": [s.rounds + 1 for s in single],
            "tokens_per_s": round(tps[f"spec{d}"], 1),
            "speedup": round(tps[f"spec{d}"] / tps["plain"], 2),
            "batch1_tokens_per_s": round(tps[f"spec{d}_b1"], 1),
            "speedup_batch1": round(tps[f"spec{d}_b1"] / tps["plain_b1"], 2),
        }
    return result


def machine_load() -> str:
    try:
        return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load n/a"


def append_results(figures: Dict[str, object], command: str) -> None:
    date = subprocess.run(["date", "+%Y-%m-%d %H:%M"], capture_output=True, text=True, check=False).stdout.strip()
    t = figures["throughput"]
    parts = [
        f"ours {t['ours_tokens_per_s']} tokens/s vs HF generate() {t['hf_tokens_per_s']} tokens/s: {t['ratio']}x "
        f"(process CPU time ratio {t['cpu_ratio']}x) "
        f"(batch {t['batch']}, prompts {t['prompt_lengths']}, {t['new_tokens']} new, {t['params'] / 1e6:.1f}M params, "
        f"greedy, {t['rows_identical']}/{t['batch']} rows token-identical)",
        f"cache bytes/token fp32: latent {t['cache_bytes_per_token_ours']} vs full K/V {t['cache_bytes_per_token_full_kv']} "
        f"({t['cache_bytes_per_token_full_kv'] / t['cache_bytes_per_token_ours']:.1f}x less; transformers 5.24's "
        f"DynamicCache held {t['cache_bytes_per_token_hf_measured']}); DeepSeek-V3 671B bf16: "
        f"{t['v3_671b_bf16_bytes_per_token_latent']} vs {t['v3_671b_bf16_bytes_per_token_full_kv']}",
    ]
    s = figures.get("speculative")
    if s:
        for key in sorted(k for k in s if k.startswith("draft")):
            d = s[key]
            parts.append(
                f"speculative {key[5:]} MTP draft(s) after {s['train_steps']} training steps (LM loss {s['final_lm_loss']}): "
                f"acceptance {d['acceptance_rate']}, main-model forwards {d['main_forwards_batch']} vs {t['new_tokens']}, "
                f"batch {t['batch']}: {d['tokens_per_s']} vs plain {s['plain_tokens_per_s']} tokens/s = {d['speedup']}x, "
                f"batch 1: {d['batch1_tokens_per_s']} vs {s['plain_batch1_tokens_per_s']} = {d['speedup_batch1']}x; "
                f"identical to greedy: {d['identical_to_greedy']}"
            )
    row = f"| {date} | CPU 2-core, {figures['load']} | `{command}` | " + "; ".join(parts) + " |\n"
    with open(os.path.join(_REPO_ROOT, "benchmarks", "RESULTS.md"), "a", encoding="utf-8") as f:
        f.write(row)


def main(argv: List[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    figures: Dict[str, object] = {"load_before": machine_load()}
    figures["throughput"] = throughput(args)
    print(json.dumps({"throughput": figures["throughput"]}, indent=1), flush=True)
    if not args.no_speculative:
        figures["speculative"] = speculative(args)
        print(json.dumps({"speculative": figures["speculative"]}, indent=1), flush=True)
    figures["load"] = f"{figures['load_before']} at start, {machine_load()} at end"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    if args.append_results:
        append_results(figures, "python benchmarks/generate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
