"""Gaudi fused paths through the device layer against stand-ins with Intel's documented signatures,
and the value-head-size choice of MLA attention."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import List

import pytest
import torch

from megatron.core.config import KernelConfig, RopeConfig
from megatron.core.device import Device
from megatron.core.optimizer.fused import fused_adamw_class, fused_clip_applicable, fused_clip_grads
from megatron.core.optimizer.clip_grads import clip_grads_
from megatron.core.parallel_state import ParallelConfig, ParallelState, RankGrid
from megatron.core.transformer.attention import core_attention, mla_value
from megatron.core.transformer.rope import apply_rotary, fused_rope_fits


class StandInRoPE:
    """habana_frameworks.torch.hpex.kernels.RotaryPosEmbeddingHelperV1: an autograd Function whose
    apply(p, cos, sin, offset) computes Intel's BLOCKWISE (rotate-half) formula with full-width tables."""

    calls: List[tuple] = []

    @classmethod
    def apply(cls, p: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int) -> torch.Tensor:
        cls.calls.append((tuple(p.shape), tuple(cos.shape), offset))
        assert cos.shape[-1] == p.shape[-1] == sin.shape[-1] and cos.dtype == p.dtype
        first, second = p.chunk(2, dim=-1)
        return p * cos + torch.cat((-second, first), dim=-1) * sin


def _tables(seq: int, half: int):
    angles = torch.rand(seq, half) * 6.0
    return angles.cos()[None, None], angles.sin()[None, None]


@pytest.mark.parametrize(
    "rope", [RopeConfig(interleave=False), RopeConfig(interleave=True, interleave_output_permuted=True)],
    ids=["rotate_half", "v3_interleaved"],
)
def test_fused_rope_reproduces_torch_formula(rope: RopeConfig) -> None:
    assert fused_rope_fits(rope)
    StandInRoPE.calls.clear()
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    cos, sin = _tables(5, 4)
    fused = apply_rotary(x, cos, sin, rope, StandInRoPE)
    plain = apply_rotary(x, cos, sin, rope)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    assert StandInRoPE.calls == [((2, 3, 5, 8), (1, 1, 5, 8), 0)]
    g = torch.randn_like(fused)
    (gf,) = torch.autograd.grad(fused, x, g)
    (gp,) = torch.autograd.grad(plain, x, g)
    torch.testing.assert_close(gf, gp, atol=1e-6, rtol=1e-6)


def test_fused_rope_not_used_for_v2_complex_layout() -> None:
    rope = RopeConfig(interleave=True, interleave_output_permuted=False)
    assert not fused_rope_fits(rope)
    StandInRoPE.calls.clear()
    x = torch.randn(1, 2, 4, 8)
    cos, sin = _tables(4, 4)
    torch.testing.assert_close(apply_rotary(x, cos, sin, rope, StandInRoPE), apply_rotary(x, cos, sin, rope))
    assert StandInRoPE.calls == []


def test_device_accessors_are_hpu_only_and_lazy() -> None:
    modules = {
        "habana_frameworks.torch.hpex.kernels": SimpleNamespace(RotaryPosEmbeddingHelperV1=StandInRoPE),
        "habana_frameworks.torch.hpex.normalization": SimpleNamespace(FusedClipNorm="clip"),
        "habana_frameworks.torch.hpex.optimizers": SimpleNamespace(FusedAdamW="adamw"),
        "habana_frameworks.torch.core": SimpleNamespace(),
    }
    hpu = Device(kind="hpu", importer=modules.get)
    assert hpu.fused_rope() is StandInRoPE
    assert hpu.fused_clip_norm() == "clip"
    assert hpu.fused_adamw() == "adamw" and fused_adamw_class(hpu) == "adamw"
    assert hpu.compile_backend() == "hpu_backend"
    missing = Device(kind="hpu", importer=lambda name: None)
    assert missing.fused_rope() is None and missing.fused_clip_norm() is None and missing.fused_adamw() is None
    cpu = Device(kind="cpu", importer=modules.get)
    assert cpu.fused_rope() is None and cpu.fused_clip_norm() is None and cpu.fused_adamw() is None
    assert cpu.compile_backend() == "inductor"


class StandInFusedClipNorm:
    """habana_frameworks.torch.hpex.normalization.FusedClipNorm(parameters, max_norm):
    clip_norm(parameters) reads each `.grad`, scales them by max_norm / (norm + 1e-6) when below 1
    and returns the total L2 norm as a tensor."""

    def __init__(self, parameters, max_norm: float) -> None:
        self.max_norm = max_norm
        self.dtype = list(parameters)[0].dtype

    def clip_norm(self, parameters) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coeff = self.max_norm / (norm + 1e-6)
        if coeff < 1:
            for g in grads:
                g.mul_(coeff)
        return norm


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_fused_clip_grads_matches_plain_clipping(max_norm: float) -> None:
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.randn(7)]
    plain = [g.clone() for g in grads]
    hpu = Device(kind="hpu", importer={"habana_frameworks.torch.hpex.normalization":
                                       SimpleNamespace(FusedClipNorm=StandInFusedClipNorm)}.get)
    norm = fused_clip_grads(grads, max_norm, hpu)
    plain_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in plain])).item()
    clip_grads_(plain, max_norm, plain_norm)
    assert norm == pytest.approx(plain_norm, rel=1e-6)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_clip_grads_declines_without_kernel_or_when_off() -> None:
    grads = [torch.ones(3)]
    assert fused_clip_grads(grads, 1.0, Device(kind="cpu")) is None
    hpu = Device(kind="hpu", importer={"habana_frameworks.torch.hpex.normalization":
                                       SimpleNamespace(FusedClipNorm=StandInFusedClipNorm)}.get)
    assert fused_clip_grads(grads, 0.0, hpu) is None
    assert torch.equal(grads[0], torch.ones(3))


def test_fused_clip_applicable_only_for_full_local_gradients() -> None:
    def state(**sizes) -> ParallelState:
        return ParallelState(grid=RankGrid.from_config(ParallelConfig(**sizes), 4), rank=0)

    assert fused_clip_applicable(state(), sharded_over_dp=False)
    assert not fused_clip_applicable(state(), sharded_over_dp=True)
    assert not fused_clip_applicable(state(tensor_model_parallel_size=2), sharded_over_dp=False)
    assert not fused_clip_applicable(state(expert_model_parallel_size=2), sharded_over_dp=False)


# ---- value head size ---------------------------------------------------------------------------
def _kv(nope: int = 8, v: int = 6):
    torch.manual_seed(4)
    return torch.randn(2, 3, 5, nope + v)


def test_mla_value_cpu_takes_the_wide_view_without_copy() -> None:
    kv = _kv()
    value, lead = mla_value(kv, 8, 12, KernelConfig(), Device(kind="cpu"))
    assert lead == 12 - 6 and value.shape[-1] == 12
    assert value.data_ptr() == kv[..., 2:].data_ptr()  # a view of kv, not a padded copy


def test_mla_value_narrow_for_eager_and_when_view_impossible() -> None:
    kv = _kv(nope=2, v=6)
    value, lead = mla_value(kv, 2, 12, KernelConfig(), Device(kind="cpu"))  # lead 6 > nope 2: no view
    assert lead == 0 and value.shape[-1] == 6
    value, lead = mla_value(_kv(), 8, 12, KernelConfig(use_fused_sdpa=False), Device(kind="cpu"))
    assert lead == 0 and value.shape[-1] == 6


def test_mla_value_narrow_where_the_kernel_takes_it() -> None:
    class Hopper(Device):
        def sdpa_takes_value_head_dim(self, query, value) -> bool:  # what the CUDA check reports on SM90
            return True

    value, lead = mla_value(_kv(), 8, 12, KernelConfig(), Hopper(kind="cpu"))
    assert lead == 0 and value.shape[-1] == 6


@pytest.mark.parametrize("nope, v", [(8, 6), (2, 6)])
def test_wide_view_and_narrow_value_give_the_same_attention(nope: int, v: int) -> None:
    torch.manual_seed(5)
    qk = 12
    q, k = torch.randn(2, 3, 5, qk), torch.randn(2, 3, 5, qk)
    kv = torch.randn(2, 3, 5, nope + v, requires_grad=True)
    value, lead = mla_value(kv, nope, qk, KernelConfig(), Device(kind="cpu"))
    out = core_attention(q, k, value, 0.3, KernelConfig())[..., lead:]
    ref = core_attention(q, k, kv[..., nope:], 0.3, KernelConfig(use_fused_sdpa=False))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), kv)
    (g_ref,) = torch.autograd.grad(ref.sum(), kv)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(g[..., :nope], torch.zeros_like(g[..., :nope]))  # k_nope columns get nothing from v's path


@pytest.mark.parametrize("interleave", [True, False], ids=["v3_layout", "rotate_half"])
def test_mla_takes_fused_rope_from_its_device(interleave: bool) -> None:
    """An MLA block on a (stand-in) Gaudi with the fused RoPE gives the CPU block's output and
    gradients; the kernel sees the query rope slice and the shared rope key."""
    from megatron.core.models.deepseek.init import initialize_parameters
    from megatron.core.transformer.mla import MultiLatentAttention
    from tests.unit.core.models.tiny_model import tiny_config

    cfg = tiny_config(moe=False)
    cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, interleave=interleave))
    hpu = Device(kind="hpu", importer={"habana_frameworks.torch.hpex.kernels":
                                       SimpleNamespace(RotaryPosEmbeddingHelperV1=StandInRoPE)}.get)
    blocks = []
    for device in (hpu, Device(kind="cpu")):
        block = MultiLatentAttention(cfg, device=device)
        initialize_parameters(block, 3, 0.1)
        blocks.append(block)
    StandInRoPE.calls.clear()
    x = torch.randn(2, 5, cfg.hidden_size)
    outs = [block(x) for block in blocks]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    heads, rope = cfg.mla.num_heads, cfg.mla.qk_rope_head_dim
    assert [c[0] for c in StandInRoPE.calls] == [(2, heads, 5, rope), (2, 1, 5, rope)]
    grads = [torch.autograd.grad(out.sum(), block.kv_a_proj_with_mqa.weight)[0] for out, block in zip(outs, blocks)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
