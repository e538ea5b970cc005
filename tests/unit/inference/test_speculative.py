"""Self-speculative decoding with the MTP depths: token-exact with plain greedy, whatever is
accepted; the cached MTP path computes what the training forward computes."""

from __future__ import annotations

import pytest
import torch

from megatron.core.inference import InferenceEngine, generate, speculative_generate
from megatron.core.models.deepseek.model import roll_left
from tests.unit.inference.tiny import train_successor_model, with_mtp

NEW = 24


@pytest.fixture(scope="module")
def trained():
    return train_successor_model(depths=2, steps=30)


def mixed_prompts(rule):
    """Rows inside the trained half of the vocabulary (drafts mostly right) and outside it (drafts
    mostly wrong), with different lengths."""
    half = rule.numel()
    on_rule = [3, int(rule[3]), int(rule[rule[3]])]
    return [on_rule, [half + 5, half + 9], [7], [half + 1, 2, half + 30, 11, half + 3]]


@pytest.mark.parametrize("num_draft", [1, 2])
def test_speculative_equals_greedy_with_partial_acceptance(trained, num_draft):
    model, rule = trained
    prompts = mixed_prompts(rule)
    want = generate(model, prompts, NEW)
    got, stats = speculative_generate(model, prompts, NEW, num_draft=num_draft)
    assert got == want
    # Both outcomes happen, in one batch whose rows advance by different amounts.
    assert 0.2 < stats.acceptance_rate < 1.0, stats
    # A row whose drafts are right needs about NEW / (num_draft + 1) main-model forwards, not NEW - 1.
    alone, alone_stats = speculative_generate(model, prompts[:1], NEW, num_draft=num_draft)
    assert alone == want[:1] and alone_stats.rounds <= NEW // (num_draft + 1) + 1, alone_stats
    assert generate(model, prompts, NEW, speculative=True, num_draft=num_draft) == want


def test_speculative_with_eod_and_limits(trained):
    model, rule = trained
    prompts = mixed_prompts(rule)
    free = generate(model, prompts, NEW)
    eod = free[0][5]
    want = generate(model, prompts, NEW, eod=eod)
    assert len(want[0]) == 6
    for static in (False, True):
        got, _ = speculative_generate(model, prompts, NEW, eod=eod, static_shapes=static)
        assert got == want
    for new in (1, 2, 3):  # budgets smaller than a round's possible output
        assert speculative_generate(model, prompts, new)[0] == [f[:new] for f in free]
    assert speculative_generate(model, prompts, NEW, vocab_size=80)[0] == generate(model, prompts, NEW, vocab_size=80)


def test_speculative_equals_greedy_with_random_drafts():
    """Untrained MTP: nearly every draft is rejected, output still greedy's."""
    model = with_mtp("v2_group", depths=2, seed=3)
    prompts = [[5, 7, 9, 11, 3], [2, 4], [8, 1, 6, 33, 21, 50, 60, 70, 12]]
    got, stats = speculative_generate(model, prompts, NEW)
    assert got == generate(model, prompts, NEW)
    assert stats.acceptance_rate < 0.2


def test_cached_mtp_logits_equal_the_training_forward():
    """Teacher-forced MTP depths through the engine vs the training forward's MTP logits."""
    model = with_mtp("v3", depths=2, seed=5)
    tokens = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    captured = {}
    hooks = [
        depth.final_layernorm.register_forward_hook(lambda mod, inp, out, k=k: captured.__setitem__(k, out))
        for k, depth in enumerate(model.mtp)
    ]
    with torch.no_grad():
        model(tokens, labels=roll_left(tokens, 1))
    for h in hooks:
        h.remove()
    engine = InferenceEngine(model, 1, 20, mtp_depths=2)
    slots = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        hidden = engine.forward(tokens, slots)
        for k in range(2):
            hidden = engine.mtp_forward(k, hidden, roll_left(tokens, k + 1), slots)
            want = model.output_layer(captured[k]).float()
            got = engine.mtp_logits(k, hidden)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_speculative_input_errors(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(model, [[1]], 4, num_draft=3)
    with pytest.raises(ValueError, match="greedy"):
        generate(model, [[1]], 4, temperature=0.5, speculative=True)
