"""generate(): greedy parity with transformers, cache exactness, dropless MoE, vocabulary padding,
seeded sampling, eod handling, input validation and perplexity scoring, on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron.core.inference import (
    InferenceEngine,
    full_kv_elements_per_token,
    generate,
    generate_with_logits,
    latent_elements_per_token,
    sample_next,
    score_tokens,
)
from megatron.core.models.deepseek import DeepSeekModel
from tests.unit.inference.tiny import converted, uncached_last_logits

# Different lengths (1 to 9 tokens), so left padding, per-row positions and masks all matter.
PROMPTS = [[5, 7, 9, 11, 3], [2, 4], [8, 1, 6, 33, 21, 50, 60, 70, 12], [40]]
NEW = 16
LOGITS_TOL = 1e-5


def hf_greedy(hf, prompts, new, eos=None):
    """transformers' generate(), one prompt at a time (no padding involved): the new tokens."""
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=["v3", "v2_lite", "v2_group"])
def pair(request, tmp_path_factory):
    return converted(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_matches_transformers(pair):
    hf, ours, _ = pair
    want = hf_greedy(hf, PROMPTS, NEW)
    assert len({tuple(w) for w in want}) == len(want)  # the prompts lead to different continuations
    for static in (False, True):
        assert generate(ours, PROMPTS, NEW, static_shapes=static) == want


def test_greedy_matches_transformers_batched_with_padding(pair):
    """transformers' own batched, left-padded generate() agrees too."""
    hf, ours, _ = pair
    longest = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, PROMPTS, NEW) == out[:, longest:].tolist()


@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_equal_uncached_at_every_step(pair, static):
    _, ours, _ = pair
    out = generate_with_logits(ours, PROMPTS, NEW, static_shapes=static, keep_logits=True)
    assert len(out.step_logits) == NEW
    worst = 0.0
    for row, prompt in enumerate(PROMPTS):
        for step in range(NEW):
            full = uncached_last_logits(ours, prompt + out.tokens[row][:step])
            cached = out.step_logits[step][row]
            worst = max(worst, (cached - full).abs().max().item() / full.abs().max().item())
    assert worst <= LOGITS_TOL, worst


def test_eod_stops_each_row_like_transformers(tmp_path):
    hf, ours, _ = converted("v3", tmp_path)
    free = generate(ours, PROMPTS, NEW)
    eod = free[0][3]  # row 0 emits it at step 3; other rows at their first occurrence, if any
    want = hf_greedy(hf, PROMPTS, NEW, eos=eod)
    got = generate(ours, PROMPTS, NEW, eod=eod)
    assert got == want
    assert got[0] == free[0][: free[0].index(eod) + 1]
    assert any(len(g) == NEW for g in got)  # some row never emits it and runs to the end
    # Every row stopping: the loop ends early and each output ends with eod.
    first = [f[0] for f in free]
    all_stop = generate(ours, PROMPTS, NEW, eod=first[0])
    assert all_stop[0] == [first[0]]


def test_dropless_moe_regardless_of_training_capacity(tmp_path):
    """A model trained with token drop generates as if dropless; the drop would change the logits."""
    _, ours, config = converted("v3", tmp_path)
    capped_config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=0.5))
    capped = DeepSeekModel(capped_config).eval()
    capped.load_state_dict(ours.state_dict())
    tokens = [3, 9, 27, 81 % 96, 50, 7, 7, 7, 1, 2, 3, 4]
    with torch.no_grad():
        dropping = capped(torch.tensor([tokens])).logits[0, -1]
    dropless = uncached_last_logits(ours, tokens)
    assert (dropping - dropless).abs().max() > 1e-3  # the capacity really drops something here
    out = generate_with_logits(capped, [tokens], 1, keep_logits=True)
    assert (out.step_logits[0][0] - dropless).abs().max() <= LOGITS_TOL * dropless.abs().max()


def test_static_and_dynamic_moe_dispatch_agree(tmp_path):
    _, ours, _ = converted("v2_group", tmp_path)
    tokens = torch.tensor([PROMPTS[2]])
    slots = torch.arange(tokens.shape[1]).unsqueeze(0)
    results = []
    for static in (False, True):
        engine = InferenceEngine(ours, 1, tokens.shape[1], static_moe=static)
        with torch.no_grad():
            results.append(engine.logits(engine.forward(tokens, slots)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def _vocab_heavy_model(tmp_path):
    """A model whose padding rows 80..95 score 4x the logits of rows 0..15: unmasked, they win often."""
    _, ours, _ = converted("v3", tmp_path)
    with torch.no_grad():
        ours.output_layer.weight[80:] = 4.0 * ours.output_layer.weight[:16]
    return ours


def test_padded_vocab_rows_never_chosen(tmp_path):
    ours = _vocab_heavy_model(tmp_path)
    unmasked = generate(ours, PROMPTS, NEW)
    assert any(t >= 80 for row in unmasked for t in row)  # they would be chosen without vocab_size
    masked = generate(ours, PROMPTS, NEW, vocab_size=80)
    assert all(t < 80 for row in masked for t in row)
    sampled = [generate(ours, PROMPTS, NEW, temperature=1.5, seed=s) for s in range(3)]
    assert any(t >= 80 for out in sampled for row in out for t in row)
    for s in range(3):
        out = generate(ours, PROMPTS, NEW, temperature=1.5, seed=s, vocab_size=80)
        assert all(t < 80 for row in out for t in row)
    with pytest.raises(ValueError, match="outside"):
        generate(ours, [[85]], 2, vocab_size=80)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tmp_path):
    _, ours, _ = converted("v2_lite", tmp_path)
    state = torch.get_rng_state()
    a = generate(ours, PROMPTS, NEW, temperature=1.0, seed=7)
    b = generate(ours, PROMPTS, NEW, temperature=1.0, seed=7)
    c = generate(ours, PROMPTS, NEW, temperature=1.0, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != c
    greedy = generate(ours, PROMPTS, NEW)
    assert a != greedy
    # Degenerate filters reduce sampling to greedy.
    assert generate(ours, PROMPTS, NEW, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(ours, PROMPTS, NEW, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.40, 0.30, 0.20, 0.06, 0.04]])).expand(2000, 5)
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        return torch.bincount(sample_next(logits, temperature=1.0, generator=gen, **kw), minlength=5)

    counts = draws()
    assert (counts > 0).all()
    assert abs(counts[0].item() / 2000 - 0.40) < 0.05  # the race samples the distribution
    assert draws(top_k=2)[2:].sum() == 0 and (draws(top_k=2)[:2] > 0).all()
    nucleus = draws(top_p=0.65)  # 0.40 + 0.30 reaches 0.65: two tokens
    assert nucleus[2:].sum() == 0 and (nucleus[:2] > 0).all()
    assert (draws(top_p=0.75)[:3] > 0).all() and draws(top_p=0.75)[3:].sum() == 0


def test_bad_requests_raise_value_errors(tmp_path):
    _, ours, _ = converted("v2_lite", tmp_path)
    for kwargs, match in [
        (dict(prompts=[[]], max_new_tokens=2), "empty"),
        (dict(prompts=[], max_new_tokens=2), "no prompts"),
        (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens"),
        (dict(prompts=[[1]], max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(prompts=[[1]], max_new_tokens=2, top_k=-2), "top_k"),
        (dict(prompts=[[1]], max_new_tokens=2, vocab_size=1000), "vocab_size"),
        (dict(prompts=[[1]], max_new_tokens=2, eod=96), "eod"),
        (dict(prompts=[[1] * 250], max_new_tokens=10), "max_position_embeddings"),
        (dict(prompts=[[1]], max_new_tokens=2, speculative=True), "MTP"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(ours, **kwargs)
    assert generate(ours, PROMPTS, 0) == [[] for _ in PROMPTS]


def test_cache_holds_only_the_latent(tmp_path):
    _, ours, config = converted("v3", tmp_path)
    mla = config.mla
    engine = InferenceEngine(ours, 2, 8)
    assert latent_elements_per_token(mla) == mla.kv_lora_rank + mla.qk_rope_head_dim == 32
    assert full_kv_elements_per_token(mla) == mla.num_heads * (mla.qk_head_dim + mla.v_head_dim) == 144
    assert engine.cache_bytes_per_token() == config.num_layers * 32 * 4
    assert all(c.data.shape == (2, 8, 32) for c in engine.caches)


def test_score_tokens_equals_windowed_training_loss(tmp_path):
    _, ours, _ = converted("v3", tmp_path)
    tokens = torch.randint(0, 80, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    result = score_tokens(ours, tokens, max_length=16, batch_size=2, vocab_size=80)
    assert result.num_tokens == 49
    want = 0.0
    for start in range(0, 49, 16):  # windows of 17 tokens overlapping by one; the last has 2
        window = torch.tensor([tokens[start : start + 17]])
        with torch.no_grad():
            logits = ours(window[:, :-1]).logits[0].float()
        logits[:, 80:] = float("-inf")
        want += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    assert abs(result.nll_sum - want) <= 1e-5 * want
    assert abs(result.perplexity - torch.tensor(want / 49).exp().item()) < 1e-3


def test_static_decode_step_is_one_graph(tmp_path):
    """With static shapes a decode step (preallocated cache, fixed-capacity MoE) traces to a single
    torch.compile graph: no data-dependent shapes or host synchronisation inside."""
    _, ours, _ = converted("v3", tmp_path)
    engine = InferenceEngine(ours, 3, 32, static_moe=True)
    engine.set_starts(torch.tensor([0, 2, 5]))

    def step(tokens, slots):
        return engine.logits(engine.forward(tokens, slots))

    with torch.inference_mode():
        step(torch.randint(0, 96, (3, 8)), torch.arange(8).expand(3, 8))
        explained = torch._dynamo.explain(step)(torch.randint(0, 96, (3, 1)), torch.full((3, 1), 8))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
