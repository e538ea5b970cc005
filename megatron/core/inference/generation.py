"""Batched autoregressive generation with the latent cache.

Prompts of different lengths are left-padded to the longest one P, so every row writes its next
token to the same cache slot P + step (one slot index for the whole batch, fixed shapes); row b's
padding occupies slots [0, P - len_b) and is masked out of attention, and its rope positions
start at 0 on its first real token. The loop: one prefill forward over [b, P], then one
single-token forward per new token. Rows that emitted `eod` keep running (static shapes) but
their later tokens are discarded; the loop ends early when every row is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core.inference.engine import InferenceEngine
from megatron.core.inference.sampling import check_sampling_args, sample_next

PAD_TOKEN = 0  # id written into padding slots; never attended to, so any valid id works


def check_request(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eod: Optional[int], vocab_size: Optional[int]
) -> None:
    """ValueError for malformed prompts, lengths or token ids."""
    model_vocab = model.config.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if vocab_size is not None and not 0 < vocab_size <= model_vocab:
        raise ValueError(f"vocab_size must be in [1, {model_vocab}] (the model's embedding rows), got {vocab_size}")
    if eod is not None and not 0 <= eod < model_vocab:
        raise ValueError(f"eod id {eod} outside the model's vocabulary [0, {model_vocab})")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    limit = vocab_size or model_vocab
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < limit]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {limit}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    max_positions = model.config.max_position_embeddings
    if longest + max_new_tokens > max_positions:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({max_positions})"
        )


def left_pad(prompts: Sequence[Sequence[int]], length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in [b, length] int64 (PAD_TOKEN before them), and each row's first real slot [b]."""
    tokens = torch.full((len(prompts), length), PAD_TOKEN, dtype=torch.long)
    starts = torch.empty(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        starts[row] = length - len(prompt)
        tokens[row, length - len(prompt) :] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
    return tokens.to(device), starts.to(device)


@dataclass
class GenerationOutput:
    """tokens: the new tokens of each prompt (including a final eod when one stopped it);
    step_logits: when requested, the fp32 logits each step's choice was made from, [b, V] per step."""

    tokens: List[List[int]]
    step_logits: List[torch.Tensor] = field(default_factory=list)


@torch.inference_mode()
def generate_with_logits(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod: Optional[int] = None,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    *,
    static_shapes: Optional[bool] = None,
    keep_logits: bool = False,
) -> GenerationOutput:
    """`generate`, optionally also returning every step's logits (`keep_logits`)."""
    check_request(model, prompts, max_new_tokens, eod, vocab_size)
    check_sampling_args(temperature, top_k, top_p)
    batch = len(prompts)
    if max_new_tokens == 0:
        return GenerationOutput([[] for _ in range(batch)])
    device = model.embedding.weight.device
    static = device.type == "hpu" if static_shapes is None else static_shapes
    prompt_len = max(len(p) for p in prompts)
    engine = InferenceEngine(model, batch, prompt_len + max_new_tokens, static_moe=static)
    tokens, starts = left_pad(prompts, prompt_len, device)
    engine.set_starts(starts)
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    # Prefill: the whole padded prompt block; only the last position's logits are needed.
    slots = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
    hidden = engine.forward(tokens, slots, kv_len=None if static else prompt_len)
    logits = engine.logits(hidden[:, -1])  # [b, V]

    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    kept: List[torch.Tensor] = []
    steps = max_new_tokens
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits.clone())
        nxt = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size, generator=generator
        )
        if eod is not None:
            nxt = torch.where(done, eod, nxt)
            stops = ~done & (nxt == eod)
            lengths = torch.where(stops, step + 1, lengths)
            done = done | stops
        out[:, step] = nxt
        if step + 1 == max_new_tokens:
            break
        if eod is not None and bool(done.all()):  # one host sync per step, only with an eod
            steps = step + 1
            break
        slot = prompt_len + step
        slots = torch.full((batch, 1), slot, dtype=torch.long, device=device)
        hidden = engine.forward(nxt.unsqueeze(-1), slots, kv_len=None if static else slot + 1)
        logits = engine.logits(hidden[:, -1])
    lengths = lengths.clamp(max=steps).tolist()
    rows = out.tolist()
    return GenerationOutput([rows[b][: lengths[b]] for b in range(batch)], kept)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod: Optional[int] = None,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    *,
    speculative: bool = False,
    num_draft: Optional[int] = None,
    static_shapes: Optional[bool] = None,
) -> List[List[int]]:
    """New tokens for each prompt (lists of token ids, any lengths, run as one batch).

    Args:
        model: single-process DeepSeekModel (only read; the main head generates).
        max_new_tokens: at most this many new tokens per prompt.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_k, top_p: sampling filters (0 and 1 = off).
        eod: a row stops after emitting this id (which is included in its output).
        seed: seeds the sampling generator (a private torch.Generator).
        vocab_size: the tokenizer's vocabulary; embedding rows >= vocab_size are never chosen.
        speculative: greedy self-speculative decoding with the model's MTP depths (`num_draft` of
            them, default all); same tokens as plain greedy, fewer main-model forwards.
        static_shapes: attend over the whole preallocated cache and use fixed-shape MoE dispatch
            every step (default: on HPU only); otherwise attention reads only the filled slots.
    """
    if speculative:
        if temperature != 0.0:
            raise ValueError("speculative decoding is greedy only: use temperature 0")
        from megatron.core.inference.speculative import speculative_generate

        tokens, _ = speculative_generate(
            model, prompts, max_new_tokens, eod=eod, vocab_size=vocab_size, num_draft=num_draft,
            static_shapes=static_shapes,
        )
        return tokens
    return generate_with_logits(
        model, prompts, max_new_tokens, temperature, top_k, top_p, eod, seed, vocab_size, static_shapes=static_shapes
    ).tokens
