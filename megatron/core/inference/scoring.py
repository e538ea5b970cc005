"""Next-token loss and perplexity of a token stream, chunked by the model's maximum length.

The stream t_0..t_{N-1} is cut into windows of `max_length` + 1 tokens that overlap by one token
(window i = t[iL .. iL + L]), so each of t_1..t_{N-1} is predicted exactly once, from at most L
preceding tokens of its own window. Windows run through the same inference path as generation
(latent attention, dropless MoE), equal-length ones batched. The softmax is taken over the
tokenizer's vocabulary when `vocab_size` is given (padding rows of the embedding excluded, as in
generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.inference.engine import InferenceEngine
from megatron.core.inference.sampling import mask_padded_vocab

_LOGITS_CHUNK = 512  # positions per logits slice: bounds the [b, s, V] fp32 buffer


@dataclass
class ScoreResult:
    """Summed negative log-likelihood (nats) over `num_tokens` predicted tokens."""

    nll_sum: float
    num_tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")


def _window_nll(engine: InferenceEngine, windows: torch.Tensor, vocab_size: Optional[int]) -> float:
    """Summed NLL of windows [b, L + 1]: inputs [:, :-1] predict targets [:, 1:]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch, length = inputs.shape
    slots = torch.arange(length, device=inputs.device).expand(batch, length)
    hidden = engine.forward(inputs, slots, kv_len=length)  # [b, L, H]
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for start in range(0, length, _LOGITS_CHUNK):
        logits = mask_padded_vocab(engine.logits(hidden[:, start : start + _LOGITS_CHUNK]), vocab_size)
        target = targets[:, start : start + _LOGITS_CHUNK]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double()
    return float(total)


@torch.inference_mode()
def score_tokens(
    model: nn.Module,
    tokens: Sequence[int],
    max_length: Optional[int] = None,
    batch_size: int = 1,
    vocab_size: Optional[int] = None,
) -> ScoreResult:
    """Summed next-token NLL of `tokens` under `model` (a single-process DeepSeekModel).

    max_length: tokens of context per window (default: the model's max_position_embeddings).
    """
    max_length = model.config.max_position_embeddings if max_length is None else max_length
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be positive, got {max_length}, {batch_size}")
    model_vocab = model.config.vocab_size
    limit = vocab_size or model_vocab
    if vocab_size is not None and not 0 < vocab_size <= model_vocab:
        raise ValueError(f"vocab_size must be in [1, {model_vocab}], got {vocab_size}")
    ids = torch.tensor([int(t) for t in tokens], dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise ValueError(f"token ids must be in [0, {limit})")
    if ids.numel() < 2:
        return ScoreResult(0.0, 0)
    device = model.embedding.weight.device
    ids = ids.to(device)
    full = (ids.numel() - 1) // max_length  # windows of exactly max_length predictions
    nll = 0.0
    if full:
        windows = ids[: full * max_length + 1].unfold(0, max_length + 1, max_length)  # [full, L + 1]
        engine: Optional[InferenceEngine] = None
        for first in range(0, full, batch_size):
            batch = windows[first : first + batch_size]
            if engine is None or engine.batch_size != batch.shape[0]:
                engine = InferenceEngine(model, batch.shape[0], max_length)
            nll += _window_nll(engine, batch, vocab_size)
    tail = ids[full * max_length :]  # the remaining predictions, fewer than max_length
    if tail.numel() >= 2:
        nll += _window_nll(InferenceEngine(model, 1, tail.numel() - 1), tail.unsqueeze(0), vocab_size)
    return ScoreResult(nll, ids.numel() - 1)
