"""Next-token choice from fp32 logits: greedy, temperature, top-k, top-p, seeded sampling.

Sampling draws from an explicit `torch.Generator` (never the global RNG), so a seed reproduces a
generation whatever else the process does. It uses the exponential race: argmax_i p_i / E_i with
E_i ~ Exp(1) picks i with probability p_i; it has fixed shapes and no host synchronisation.
Rows at index >= `vocab_size` (the embedding's padding beyond the tokenizer's vocabulary) get
-inf before anything else, so they can never be chosen.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError for out-of-range sampling arguments."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """logits [..., V] with columns >= vocab_size set to -inf (unchanged when vocab_size is None or V)."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    column = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(column >= vocab_size, float("-inf"))


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row [b, V] (ties at the k-th value are kept too)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter of rows [b, V]: keep the smallest set of most likely tokens whose probability
    reaches `top_p` (the most likely token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token of each row: logits [b, V] (fp32) -> [b] int64.

    temperature 0 is greedy (first index among equal maxima, as torch.argmax); otherwise the
    logits are divided by the temperature, filtered by top-k then top-p, and sampled with
    `generator` (required for sampling).
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("sampling (temperature > 0) needs a torch.Generator")
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)  # [b, V]; filtered entries are exactly 0
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
