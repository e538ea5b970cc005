"""Routing parity with HF's DeepseekV3TopkRouter and DeepseekV2TopkRouter (fp32, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from tests.unit.core.transformer.moe.moe_test_utils import hf_v2_moe, hf_v3_moe, tiny_config, initialized

from megatron.core.transformer.moe import TopKRouter


def _sorted(probs: torch.Tensor, indices: torch.Tensor):
    order = indices.argsort(dim=-1)
    return probs.gather(1, order), indices.gather(1, order)


def _v3_router(**kwargs):
    cfg = tiny_config(
        num_experts=16, topk=4, num_groups=4, group_topk=2, routed_scaling_factor=2.5,
        enable_expert_bias=True, **kwargs,
    )
    router = initialized(TopKRouter(cfg))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        # Nonzero bias, large enough to change choices and group selection.
        router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 16)[torch.randperm(16)])
    hf = hf_v3_moe(cfg).gate
    with torch.no_grad():
        hf.weight.copy_(router.weight)
        hf.e_score_correction_bias.copy_(router.expert_bias)
    return router, hf


@pytest.mark.parametrize("norm", [True, False])
def test_v3_routing_matches_hf_with_bias_and_groups(norm: bool) -> None:
    torch.manual_seed(0)
    router, hf = _v3_router(norm_topk_prob=norm)
    x = torch.randn(3, 20, 32)
    out = router(x)
    hf_logits, hf_w, hf_idx = hf(x)
    ours_p, ours_i = _sorted(out.probs, out.indices)
    ref_p, ref_i = _sorted(hf_w, hf_idx)
    assert torch.equal(ours_i, ref_i)
    assert torch.allclose(ours_p, ref_p, atol=1e-6, rtol=0)
    assert torch.equal(out.logits, hf_logits)
    assert out.probs.dtype == torch.float32
    # The bias and the group limit both really matter in this example.
    unbiased = torch.sigmoid(out.logits).topk(4, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(unbiased, ours_i)
    ungrouped = (torch.sigmoid(out.logits) + router.expert_bias).topk(4, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(ungrouped, ours_i)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_v2_routing_matches_hf(groups) -> None:
    torch.manual_seed(1)
    num_groups, group_topk = groups
    cfg = tiny_config(
        num_experts=16, topk=3, score_function="softmax", num_groups=num_groups, group_topk=group_topk,
        routed_scaling_factor=1.7, norm_topk_prob=True,  # norm is ignored with softmax, as in HF
    )
    router = initialized(TopKRouter(cfg))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    hf = hf_v2_moe(cfg).gate
    with torch.no_grad():
        hf.weight.copy_(router.weight)
    x = torch.randn(2, 25, 32)
    out = router(x)
    _, hf_w, hf_idx = hf(x)
    ours_p, ours_i = _sorted(out.probs, out.indices)
    ref_p, ref_i = _sorted(hf_w, hf_idx)
    assert torch.equal(ours_i, ref_i)
    assert torch.allclose(ours_p, ref_p, atol=1e-6, rtol=0)
    if num_groups > 1:  # with k > group_topk the group limit changes some choices
        greedy = torch.softmax(out.logits, dim=-1).topk(3, dim=-1).indices.sort(dim=-1).values
        assert not torch.equal(greedy, ours_i)


def test_bf16_model_routes_in_fp32_and_keeps_fp32_bias() -> None:
    torch.manual_seed(2)
    router, hf = _v3_router()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and router.local_tokens_per_expert.dtype == torch.float32
    assert torch.equal(router.expert_bias, hf.e_score_correction_bias)  # exact, not rounded through bf16
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    out = router(x)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    ref = torch.nn.functional.linear(x.float(), router.weight.float()).view(-1, 16)
    assert torch.equal(out.logits, ref)


def test_router_rejects_bad_input() -> None:
    router = initialized(TopKRouter(tiny_config()))
    with pytest.raises(ValueError):
        router(torch.randn(4, 31))
    with pytest.raises(ValueError):
        router(torch.randn(2, 3, 32), token_mask=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError):
        router.update_expert_bias()  # no expert bias configured
