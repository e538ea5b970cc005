"""MLA and core attention against HF's DeepseekV3Attention / DeepseekV2Attention with the same weights.

Parity bar (fp32): max |ours - hf| / max |hf| <= 1e-5 for outputs, <= 1e-4 for the gradients of
the input and of every weight.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from megatron.core.config import KernelConfig
from megatron.core.device import Device
from megatron.core.models.deepseek.hf_config import config_from_hf
from megatron.core.transformer.attention import core_attention, eager_attention
from megatron.core.transformer.mla import MultiLatentAttention

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707)
YARN_RATIO = dict(YARN, factor=4.0, mscale=0.8, mscale_all_dim=1.0)  # cos/sin multiplier != 1
PLAIN = dict(rope_type="default", rope_theta=10000.0)

# name -> (HF config class, q_lora_rank, rope_parameters, extra HF fields)
CASES = {
    "v3_qlora_yarn": (DeepseekV3Config, 24, YARN, {}),
    "v3_qlora_yarn_ratio_bias": (DeepseekV3Config, 24, YARN_RATIO, {"attention_bias": True}),
    "v3_noqlora_plain": (DeepseekV3Config, None, PLAIN, {}),
    "v3_rotate_half": (DeepseekV3Config, 24, YARN, {"rope_interleave": False}),
    "v2_qlora_yarn": (DeepseekV2Config, 24, YARN_V2, {"topk_method": "greedy"}),
    "v2_noqlora_yarn": (DeepseekV2Config, None, YARN_V2, {"topk_method": "greedy"}),
}


def _hf_config(cls, q_lora, rope, extra):
    config = cls(
        vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=q_lora, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
        v_head_dim=10, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, num_key_value_heads=4,
        max_position_embeddings=2560, rope_parameters=dict(rope), **extra,
    )
    config._attn_implementation = "eager"
    return config


def _build(case, kernels=KernelConfig(), device=None):
    cls, q_lora, rope, extra = CASES[case]
    hf_config = _hf_config(cls, q_lora, rope, extra)
    torch.manual_seed(0)
    if cls is DeepseekV3Config:
        hf_attn, hf_rotary = hf_v3.DeepseekV3Attention(hf_config, 0), hf_v3.DeepseekV3RotaryEmbedding(hf_config)
    else:
        hf_attn, hf_rotary = hf_v2.DeepseekV2Attention(hf_config, 0), hf_v2.DeepseekV2RotaryEmbedding(hf_config)
    with torch.no_grad():
        for name, p in hf_attn.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "layernorm" not in name else 0.2) + (1.0 if "layernorm" in name else 0.0))
    config = config_from_hf(hf_config, kernels=kernels)
    ours = MultiLatentAttention(config, device=device)
    ours.load_state_dict(hf_attn.state_dict(), strict=True)
    return ours, hf_attn, hf_rotary


def _hf_forward(hf_attn, hf_rotary, x, position_ids):
    s = x.shape[1]
    mask = torch.full((s, s), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
    pos_emb = hf_rotary(x, position_ids)
    if isinstance(hf_attn, hf_v3.DeepseekV3Attention):
        return hf_attn(x, position_embeddings=pos_emb, attention_mask=mask)[0]
    return hf_attn(x, attention_mask=mask, position_embeddings=pos_emb)[0]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _parity(case, position_offset=0, kernels=KernelConfig()):
    ours, hf_attn, hf_rotary = _build(case, kernels)
    torch.manual_seed(1)
    x = torch.randn(2, 9, 48)
    position_ids = torch.arange(9)[None].expand(2, -1) + torch.tensor([[position_offset], [2 * position_offset]])
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x_ours, position_ids if position_offset else None)
    y_hf = _hf_forward(hf_attn, hf_rotary, x_hf, position_ids)
    grad = torch.randn_like(y_hf)
    y_ours.backward(grad)
    y_hf.backward(grad)
    errors = {"output": _rel(y_ours, y_hf), "input_grad": _rel(x_ours.grad, x_hf.grad)}
    hf_params = dict(hf_attn.named_parameters())
    for name, p in ours.named_parameters():
        errors[name] = _rel(p.grad, hf_params[name].grad)
    assert set(hf_params) == {n for n, _ in ours.named_parameters()}
    return errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf_attention_fp32(case):
    errors = _parity(case)
    assert errors.pop("output") <= 1e-5, errors
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("case", ["v3_qlora_yarn", "v2_noqlora_yarn"])
def test_matches_hf_with_position_ids_and_eager_kernel(case):
    errors = _parity(case, position_offset=700, kernels=KernelConfig(use_fused_sdpa=False))
    assert errors.pop("output") <= 1e-5, errors
    assert max(errors.values()) <= 1e-4, errors


def test_parameter_names_and_shapes():
    ours, _, _ = _build("v3_qlora_yarn")
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (24, 48), "q_a_layernorm.weight": (24,), "q_b_proj.weight": (4 * 20, 24),
        "kv_a_proj_with_mqa.weight": (20 + 8, 48), "kv_a_layernorm.weight": (20,),
        "kv_b_proj.weight": (4 * (12 + 10), 20), "o_proj.weight": (48, 4 * 10),
    }
    assert ours.q_a_layernorm.eps == ours.kv_a_layernorm.eps == 1e-6
    no_lora, _, _ = _build("v3_noqlora_plain")
    assert "q_proj.weight" in dict(no_lora.named_parameters()) and not hasattr(no_lora, "q_a_proj")


def test_eager_fallback_equals_sdpa_path():
    sdpa, _, _ = _build("v3_qlora_yarn")
    eager, _, _ = _build("v3_qlora_yarn", KernelConfig(use_fused_sdpa=False))
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(eager(x), sdpa(x), rtol=1e-5, atol=1e-6)


def test_precomputed_rotary_tables_are_used():
    ours, _, _ = _build("v2_qlora_yarn")
    x = torch.randn(1, 5, 48)
    tables = ours.rotary_tables(x)
    torch.testing.assert_close(ours(x, rotary_pos_emb=tables), ours(x))


def test_bf16_forward_runs_close_to_hf():
    ours, hf_attn, hf_rotary = _build("v3_qlora_yarn")
    ours, hf_attn = ours.to(torch.bfloat16), hf_attn.to(torch.bfloat16)
    x = torch.randn(2, 9, 48).to(torch.bfloat16)
    y = ours(x)
    y_hf = _hf_forward(hf_attn, hf_rotary, x, torch.arange(9)[None].expand(2, -1))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y.float(), y_hf.float()) < 3e-2


# ---- core attention and its HPU branch ---------------------------------------------------------------
class RecordingFusedSDPA:
    """Stand-in for Intel's FusedSDPA: records the positional arguments, computes with torch."""

    def __init__(self):
        self.calls = []

    def apply(self, q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode, recompute):
        self.calls.append(dict(v_dim=v.shape[-1], mask=attn_mask, dropout=dropout_p, causal=is_causal,
                               scale=scale, softmax_mode=softmax_mode, recompute=recompute))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)


def _fake_hpu(kernel):
    return Device(kind="hpu", importer={"habana_frameworks.torch.hpex.kernels": SimpleNamespace(FusedSDPA=kernel)}.get)


def _qkv(d_qk=12, d_v=8):
    torch.manual_seed(2)
    return torch.randn(2, 3, 6, d_qk), torch.randn(2, 3, 6, d_qk), torch.randn(2, 3, 6, d_v)


def test_core_attention_eager_matches_sdpa_with_unequal_head_dims():
    q, k, v = _qkv()
    out = core_attention(q, k, v, 0.3, KernelConfig())
    assert out.shape == (2, 3, 6, 8)
    torch.testing.assert_close(core_attention(q, k, v, 0.3, KernelConfig(use_fused_sdpa=False)), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_attention(q, k, v, 0.3)[:, :, 0], v[:, :, 0])  # first token sees itself only


@pytest.mark.parametrize("fast, recompute", [(False, False), (True, True)])
def test_core_attention_hpu_branch_pads_value_and_passes_modes(fast, recompute):
    kernel = RecordingFusedSDPA()
    kernels = KernelConfig(use_fast_softmax=fast, use_fused_sdpa_with_recompute=recompute)
    q, k, v = _qkv()
    out = core_attention(q, k, v, 0.3, kernels, device=_fake_hpu(kernel))
    torch.testing.assert_close(out, core_attention(q, k, v, 0.3, KernelConfig()), rtol=1e-5, atol=1e-6)
    assert out.shape[-1] == 8
    assert kernel.calls == [dict(v_dim=12, mask=None, dropout=0.0, causal=True, scale=0.3,
                                 softmax_mode="fast" if fast else "None", recompute=recompute)]


def test_core_attention_hpu_kernel_skipped_when_disabled_or_missing():
    kernel = RecordingFusedSDPA()
    q, k, v = _qkv(8, 8)
    core_attention(q, k, v, 0.3, KernelConfig(use_fused_sdpa=False), device=_fake_hpu(kernel))
    assert kernel.calls == []
    missing = Device(kind="hpu", importer=lambda name: None)
    torch.testing.assert_close(core_attention(q, k, v, 0.3, KernelConfig(), device=missing),
                               core_attention(q, k, v, 0.3, KernelConfig()))


def test_mla_uses_injected_hpu_device_and_gradients_flow():
    kernel = RecordingFusedSDPA()
    ours, hf_attn, hf_rotary = _build("v3_qlora_yarn", device=_fake_hpu(kernel))
    x = torch.randn(2, 9, 48, requires_grad=True)
    y = ours(x)
    y_hf = _hf_forward(hf_attn, hf_rotary, x.detach(), torch.arange(9)[None].expand(2, -1))
    assert _rel(y, y_hf) <= 1e-5
    y.sum().backward()
    assert x.grad is not None and ours.kv_b_proj.weight.grad is not None
    assert len(kernel.calls) == 1 and kernel.calls[0]["v_dim"] == 20  # v (10) padded to qk_head_dim (12 + 8)


def test_core_attention_rejects_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        core_attention(q, k[:, :, :5], v, 0.3, KernelConfig())
