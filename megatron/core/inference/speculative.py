"""Greedy self-speculative decoding: MTP depths draft, the main model verifies.

MTP depth k (1-based) at slot j combines the previous depth's hidden state at j (the main stack's
for k = 1) with the embedding of the token at slot j + k and predicts the token at j + k + 1. So
after the main model has committed tokens up to slot m (the newest, t_m, not yet fed), depth k
at slot m - 1 drafts the token at slot m + k, depths running in order so that each one's input
token is the previous depth's draft. One round:

1. verify: the main model runs on slots m..m+D (t_m and the D drafts) and its greedy choices g
   at those slots predict slots m+1..m+D+1;
2. accept the longest prefix of drafts equal to g (a of them) plus g's next token: a + 1 new
   tokens, all of them plain greedy's, so the output is token-for-token greedy's;
3. draft: depth k (re)runs a fixed window of D + k slots ending at the new m' - 1, which covers
   every slot whose inputs changed since the last round (tokens accepted now, and the provisional
   drafts the window held last round), with fixed shapes whatever was accepted.

Caches are slot-indexed: entries written from rejected drafts sit at slots beyond m' and are
overwritten before any query at a later slot reads them (causal mask by slot). Each row of the
batch advances by its own a; slots, positions and masks are per row. The prompts are left-padded
with a margin of 2D + 1 extra slots so that the first windows never start before slot 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core.inference.engine import InferenceEngine
from megatron.core.inference.generation import check_request, left_pad
from megatron.core.inference.sampling import mask_padded_vocab


@dataclass
class SpeculativeStats:
    """rounds: verification forwards of the main model (after the prefill); drafted / accepted:
    draft tokens proposed to and accepted by rows still generating."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _gather_rows(buffer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buffer [b, L, H] at slots [b, s] -> [b, s, H]."""
    return buffer.gather(1, slots.unsqueeze(-1).expand(-1, -1, buffer.shape[-1]))


def _scatter_rows(buffer: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, slots[b, i]] = values[b, i] for [b, L, H], [b, s], [b, s, H]."""
    buffer.scatter_(1, slots.unsqueeze(-1).expand(-1, -1, buffer.shape[-1]), values.to(buffer.dtype))


class _Drafter:
    """Runs the MTP depths over their windows and writes the drafts into the token buffer."""

    def __init__(
        self, engine: InferenceEngine, tokens: torch.Tensor, hiddens: List[torch.Tensor], vocab_size: Optional[int]
    ) -> None:
        self.engine, self.tokens, self.hiddens, self.vocab_size = engine, tokens, hiddens, vocab_size
        self.depths = len(engine.mtp)

    def draft(self, newest: torch.Tensor, widths: Sequence[int], kv_len: Optional[int]) -> None:
        """Depth k runs slots newest - widths[k-1] .. newest - 1 and drafts slot newest + k.

        newest [b]: slot of each row's newest committed token. hiddens[k-1] [b, L, H] holds the
        input hidden of depth k by slot (the main stack's output for k = 1).
        """
        for k in range(1, self.depths + 1):
            width = widths[k - 1]
            slots = (newest - width).unsqueeze(-1) + torch.arange(width, device=newest.device)  # [b, W]
            prev = _gather_rows(self.hiddens[k - 1], slots)
            hidden = self.engine.mtp_forward(k - 1, prev, self.tokens.gather(1, slots + k), slots, kv_len)
            if k < self.depths:
                _scatter_rows(self.hiddens[k], slots, hidden)
            logits = mask_padded_vocab(self.engine.mtp_logits(k - 1, hidden[:, -1]), self.vocab_size)
            self.tokens.scatter_(1, (newest + k).unsqueeze(-1), logits.argmax(-1, keepdim=True))


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eod: Optional[int] = None,
    vocab_size: Optional[int] = None,
    num_draft: Optional[int] = None,
    static_shapes: Optional[bool] = None,
) -> Tuple[List[List[int]], SpeculativeStats]:
    """Greedy generation drafted by the first `num_draft` MTP depths (default all): the tokens of
    `generate(..., temperature=0)` for the same arguments, and acceptance statistics."""
    check_request(model, prompts, max_new_tokens, eod, vocab_size)
    depths = len(getattr(model, "mtp", []))
    num_draft = depths if num_draft is None else num_draft
    if depths == 0:
        raise ValueError("speculative decoding drafts with the model's MTP depths, and this model has none")
    if not 1 <= num_draft <= depths:
        raise ValueError(f"num_draft must be in [1, {depths}] (the model's MTP depths), got {num_draft}")
    batch, stats = len(prompts), SpeculativeStats()
    if max_new_tokens == 0:
        return [[] for _ in range(batch)], stats
    device = model.embedding.weight.device
    static = device.type == "hpu" if static_shapes is None else static_shapes
    d = num_draft
    prompt_len = max(len(p) for p in prompts) + 2 * d + 1  # margin: windows start >= slot 0
    max_len = prompt_len + max_new_tokens + 2 * d + 2  # furthest slot a finished row can touch, + 1
    engine = InferenceEngine(model, batch, max_len, mtp_depths=d, static_moe=static)
    prompt_tokens, starts = left_pad(prompts, prompt_len, device)
    engine.set_starts(starts)

    tokens = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # committed tokens, then drafts
    tokens[:, :prompt_len] = prompt_tokens
    hidden_size = model.config.hidden_size
    hiddens = [torch.zeros(batch, max_len, hidden_size, dtype=engine.dtype, device=device) for _ in range(d)]
    drafter = _Drafter(engine, tokens, hiddens, vocab_size)

    def kv(bound: int) -> Optional[int]:
        return None if static else min(max_len, bound)

    # Prefill: main stack over the prompt block, first token, then every depth over the whole block.
    slots = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
    main_hidden = engine.forward(prompt_tokens, slots, kv(prompt_len))
    hiddens[0][:, :prompt_len] = main_hidden
    first = mask_padded_vocab(engine.logits(main_hidden[:, -1]), vocab_size).argmax(-1)
    tokens[:, prompt_len] = first
    newest = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
    count = torch.ones(batch, dtype=torch.long, device=device)
    done = torch.full((batch,), max_new_tokens == 1, dtype=torch.bool, device=device)
    if eod is not None:
        done |= first == eod
    drafter.draft(newest, [prompt_len] * d, kv(prompt_len + d))
    bound = prompt_len  # host-side upper bound of max(newest): no sync to size the attention window

    offsets = torch.arange(d + 1, device=device)
    drafted = torch.zeros((), dtype=torch.long, device=device)
    accepted_total = torch.zeros((), dtype=torch.long, device=device)
    all_done = bool(done.all())
    while not all_done:  # one host sync per round
        slots = newest.unsqueeze(-1) + offsets  # [b, D + 1]: t_m and the drafts
        main_hidden = engine.forward(tokens.gather(1, slots), slots, kv(bound + d + 1))
        _scatter_rows(hiddens[0], slots, main_hidden)
        greedy = mask_padded_vocab(engine.logits(main_hidden), vocab_size).argmax(-1)  # [b, D + 1] for slots + 1
        drafts = tokens.gather(1, slots[:, 1:])  # [b, D]
        accepted = (drafts == greedy[:, :d]).long().cumprod(-1).sum(-1)  # [b] leading matches
        tokens.scatter_(1, slots + 1, greedy)  # the accepted drafts equal greedy; the rest is stale
        committed = offsets <= accepted.unsqueeze(-1)  # [b, D + 1]: greedy[:, i] is a new token
        new = accepted + 1
        finished = torch.zeros_like(done)
        if eod is not None:
            is_eod = (greedy == eod) & committed
            finished = is_eod.any(-1)
            new = torch.where(finished, is_eod.long().argmax(-1) + 1, new)  # up to and including eod
        active = ~done
        count = torch.where(active, count + torch.minimum(new, max_new_tokens - count), count)
        done = done | (active & (finished | (count >= max_new_tokens)))
        drafted += d * active.sum()
        accepted_total += (accepted * active).sum()
        stats.rounds += 1
        newest = torch.where(active, newest + accepted + 1, newest)
        bound = min(bound + d + 1, max_len - d - 1)
        all_done = bool(done.all())
        if not all_done:
            drafter.draft(newest, [d + k for k in range(1, d + 1)], kv(bound + d))
    stats.drafted, stats.accepted = int(drafted), int(accepted_total)

    rows, counts = tokens.tolist(), count.tolist()
    return [rows[b][prompt_len : prompt_len + counts[b]] for b in range(batch)], stats
