"""RoPE / YaRN tables and rotations against HF's DeepSeek V3 and V2 rotary code."""

import math

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from megatron.core.config import MLAConfig, RopeConfig
from megatron.core.transformer.rope import (
    RotaryEmbedding,
    apply_rotary,
    rope_attention_factor,
    rope_inv_freq,
    softmax_scale,
    yarn_mscale,
)

ROPE_DIM = 16
MAX_POS = 256

# name -> (our RopeConfig fields, HF rope_parameters)
CASES = {
    "plain": ({}, {"rope_type": "default", "rope_theta": 10000.0}),
    "plain_theta": ({"theta": 500.0}, {"rope_type": "default", "rope_theta": 500.0}),
    "yarn_v3": (
        dict(scaling_type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
    # unequal mscales: the cos/sin tables carry m(f, mscale) / m(f, mscale_all_dim) != 1
    "yarn_ratio": (
        dict(scaling_type="yarn", factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=1.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0),
    ),
    # no mscale_all_dim: HF multiplies the tables by m(factor, 1)
    "yarn_no_all_dim": (
        dict(scaling_type="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64,
             beta_fast=16.0, beta_slow=2.0),
    ),
}


def _hf_config(cls, rope_parameters, **extra):
    kwargs = dict(
        vocab_size=32, hidden_size=32, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=ROPE_DIM,
        v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=MAX_POS,
        rope_parameters=dict(rope_parameters),
    )
    kwargs.update(extra)
    return cls(**kwargs)


def _ours(fields, **layout):
    return RopeConfig(**{**fields, **layout})


@pytest.mark.parametrize("case", sorted(CASES))
def test_inv_freq_and_tables_match_hf_v3(case):
    fields, hf_params = CASES[case]
    rope = _ours(fields)
    hf = hf_v3.DeepseekV3RotaryEmbedding(_hf_config(DeepseekV3Config, hf_params))
    torch.testing.assert_close(rope_inv_freq(ROPE_DIM, rope), hf.inv_freq, rtol=0, atol=0)
    assert rope_attention_factor(rope) == pytest.approx(hf.attention_scaling, rel=1e-12)

    positions = torch.tensor([[0, 1, 2, 7, 100, 255], [3, 3, 9, 10, 11, 200]])
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = hf(x, positions)  # [b, s, d] = cat(freqs, freqs)
    ours = RotaryEmbedding(ROPE_DIM, rope)
    cos, sin = ours(6, device=torch.device("cpu"), dtype=torch.float32, position_ids=positions)
    assert cos.shape == (2, 1, 6, ROPE_DIM // 2)
    torch.testing.assert_close(cos[:, 0], hf_cos[..., : ROPE_DIM // 2], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin[..., : ROPE_DIM // 2], rtol=0, atol=0)

    # The cached 0..L-1 table equals the explicit-position one.
    cached_cos, cached_sin = ours(20, device=torch.device("cpu"), dtype=torch.float32)
    ref_cos, ref_sin = hf(x, torch.arange(20)[None])
    assert cached_cos.shape == (1, 1, 20, ROPE_DIM // 2)
    torch.testing.assert_close(cached_cos[0, 0], ref_cos[0, :, : ROPE_DIM // 2], rtol=0, atol=0)
    torch.testing.assert_close(cached_sin[0, 0], ref_sin[0, :, : ROPE_DIM // 2], rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tables_match_hf_v2(case):
    fields, hf_params = CASES[case]
    rope = _ours(fields, interleave_output_permuted=False)
    hf = hf_v2.DeepseekV2RotaryEmbedding(_hf_config(DeepseekV2Config, hf_params))
    positions = torch.arange(12)[None] * 3
    freqs_cis = hf(torch.zeros(1), positions)  # complex [b, s, d/2]
    cos, sin = RotaryEmbedding(ROPE_DIM, rope)(12, device=torch.device("cpu"), dtype=torch.bfloat16, position_ids=positions)
    assert cos.dtype == torch.float32  # V2's complex rotation keeps fp32 tables even for bf16 activations
    torch.testing.assert_close(cos[:, 0], freqs_cis.real, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sin[:, 0], freqs_cis.imag, rtol=1e-6, atol=1e-7)


def _qk(dtype=torch.float32):
    torch.manual_seed(1)
    q = torch.randn(2, 3, 10, ROPE_DIM).to(dtype)
    k = torch.randn(2, 1, 10, ROPE_DIM).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_apply_matches_hf_v3(interleave, dtype):
    fields, hf_params = CASES["yarn_ratio"]
    rope = _ours(fields, interleave=interleave)
    hf = hf_v3.DeepseekV3RotaryEmbedding(_hf_config(DeepseekV3Config, hf_params, rope_interleave=interleave))
    q, k = _qk(dtype)
    positions = torch.arange(10)[None].expand(2, -1) + torch.tensor([[0], [5]])
    hf_cos, hf_sin = hf(q, positions)
    apply = hf_v3.apply_rotary_pos_emb_interleave if interleave else hf_v3.apply_rotary_pos_emb
    hf_q, hf_k = apply(q, k, hf_cos, hf_sin)
    cos, sin = RotaryEmbedding(ROPE_DIM, rope)(10, device=q.device, dtype=dtype, position_ids=positions)
    assert cos.dtype == dtype  # cast to the activation dtype, as HF V3 does
    out_q, out_k = apply_rotary(q, cos, sin, rope), apply_rotary(k, cos, sin, rope)
    assert out_q.dtype == dtype
    torch.testing.assert_close(out_q, hf_q, rtol=0, atol=0)
    torch.testing.assert_close(out_k, hf_k, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_hf_v2_complex(dtype):
    fields, hf_params = CASES["yarn_v3"]
    rope = _ours(fields, interleave_output_permuted=False)
    hf = hf_v2.DeepseekV2RotaryEmbedding(_hf_config(DeepseekV2Config, hf_params))
    q, k = _qk(dtype)
    freqs_cis = hf(q, torch.arange(10)[None].expand(2, -1))
    hf_q, hf_k = hf_v2.apply_rotary_emb(q, k, freqs_cis)
    cos, sin = RotaryEmbedding(ROPE_DIM, rope)(10, device=q.device, dtype=dtype)
    out_q, out_k = apply_rotary(q, cos, sin, rope), apply_rotary(k, cos, sin, rope)
    assert out_q.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out_q, hf_q, **tol)
    torch.testing.assert_close(out_k, hf_k, **tol)


def test_v2_and_v3_interleaved_layouts_give_the_same_scores():
    q, k = _qk()
    v3, v2 = RopeConfig(interleave=True), RopeConfig(interleave=True, interleave_output_permuted=False)
    cos, sin = RotaryEmbedding(ROPE_DIM, v3)(10, device=q.device, dtype=q.dtype)
    s3 = apply_rotary(q, cos, sin, v3) @ apply_rotary(k, cos, sin, v3).transpose(-1, -2)
    s2 = apply_rotary(q, cos, sin, v2) @ apply_rotary(k, cos, sin, v2).transpose(-1, -2)
    torch.testing.assert_close(s3, s2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", [hf_v3.DeepseekV3Attention, hf_v2.DeepseekV2Attention])
def test_softmax_scale_matches_hf(case, cls):
    fields, hf_params = CASES[case]
    config_cls = DeepseekV3Config if cls is hf_v3.DeepseekV3Attention else DeepseekV2Config
    hf_attn = cls(_hf_config(config_cls, hf_params), layer_idx=0)
    mla = MLAConfig(num_heads=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=ROPE_DIM, v_head_dim=8)
    assert softmax_scale(mla, _ours(fields)) == pytest.approx(hf_attn.scaling, rel=1e-12)


def test_full_size_softmax_scale_and_mscale():
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40.0) + 1.0)
    assert yarn_mscale(1.0, 1.0) == 1.0
    rope = RopeConfig(scaling_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    assert softmax_scale(MLAConfig(), rope) == pytest.approx(0.1352338, abs=1e-7)
    assert softmax_scale(MLAConfig(), RopeConfig()) == pytest.approx(192 ** -0.5)
    assert rope_attention_factor(rope) == 1.0


def test_cache_grows_and_is_keyed_by_dtype():
    emb = RotaryEmbedding(ROPE_DIM, RopeConfig())
    cpu = torch.device("cpu")
    c8, _ = emb(8, device=cpu, dtype=torch.float32)
    c16, _ = emb(16, device=cpu, dtype=torch.float32)
    torch.testing.assert_close(c16[..., :8, :], c8)
    cb, _ = emb(4, device=cpu, dtype=torch.bfloat16)
    assert cb.dtype == torch.bfloat16 and cb.shape == (1, 1, 4, ROPE_DIM // 2)
    with torch.inference_mode():
        emb2 = RotaryEmbedding(ROPE_DIM, RopeConfig())
        emb2(4, device=cpu, dtype=torch.float32)
    x = torch.randn(1, 1, 4, ROPE_DIM, requires_grad=True)
    cos, sin = emb2(4, device=cpu, dtype=torch.float32)
    apply_rotary(x, cos, sin, RopeConfig()).sum().backward()  # table built in inference mode is still usable


def test_bad_rotary_dim():
    with pytest.raises(ValueError):
        rope_inv_freq(15, RopeConfig())
