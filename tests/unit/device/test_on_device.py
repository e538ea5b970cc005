"""Tests that run on the device under check: MEGATRON_TEST_DEVICE=cuda|hpu|cpu (default cpu).

`benchmarks/device_check.py` runs them (`pytest -m device`) on a GPU or a Gaudi card; in CI they
run on the CPU like every other test. Each compares the device against an fp32 CPU reference.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron.core.device import get_device
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.transformer.moe import GroupedExperts, MoELayer
from tests.unit.core.models.tiny_model import tiny_config
from tests.unit.core.transformer.moe.moe_test_utils import initialized
from tests.unit.core.transformer.moe.moe_test_utils import tiny_config as moe_config

pytestmark = pytest.mark.device

DEVICE = get_device(os.environ.get("MEGATRON_TEST_DEVICE", "cpu"))
TORCH_DEVICE = DEVICE.torch_device(0)
LOW = torch.float32 if DEVICE.kind == "cpu" else torch.bfloat16


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_model_forward_backward_on_device_matches_fp32_cpu():
    config = tiny_config()
    reference = DeepSeekModel(config, seed=2)
    model = DeepSeekModel(config, seed=2).to(device=TORCH_DEVICE, dtype=LOW)
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (reference, model):
        d = next(m.parameters()).device
        loss = m.loss(m(tokens[:, :-1].to(d), labels=tokens[:, 1:].to(d)), torch.ones(2, 8, device=d))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) / abs(losses[0]) < (1e-6 if LOW == torch.float32 else 2e-2)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad.norm() > 0:
            assert _cosine(p.grad.cpu(), grads[name].grad) > (0.99999 if LOW == torch.float32 else 0.99), name


def test_grouped_experts_on_device_match_the_cpu():
    experts = initialized(GroupedExperts(4, 64, 32), std=0.2)
    device_experts = initialized(GroupedExperts(4, 64, 32), std=0.2).to(device=TORCH_DEVICE, dtype=LOW)
    counts = torch.tensor([5, 0, 7, 4])
    tokens = torch.randn(16, 64)
    want = experts(tokens, counts, all_rows_valid=True)
    got = device_experts(tokens.to(TORCH_DEVICE, LOW), counts.to(TORCH_DEVICE), all_rows_valid=True)
    assert _cosine(got.cpu(), want) > (0.99999 if LOW == torch.float32 else 0.999)


def test_padded_moe_layer_on_device_matches_the_cpu():
    cfg = moe_config(capacity_factor=1.0, pad_to_capacity=True)
    layer = initialized(MoELayer(cfg, 0), seed=1)
    device_layer = initialized(MoELayer(cfg, 0), seed=1).to(device=TORCH_DEVICE, dtype=LOW)
    x = torch.randn(2, 6, 32)
    want = layer(x)
    got = device_layer(x.to(TORCH_DEVICE, LOW))
    assert got.shape == want.shape
    assert _cosine(got.cpu(), want) > (0.99999 if LOW == torch.float32 else 0.99)


def test_vocab_padding_never_reaches_the_loss_on_device():
    config = dataclasses.replace(tiny_config(), vocab_size=61, make_vocab_size_divisible_by=16)
    model = DeepSeekModel(config, seed=4).to(device=TORCH_DEVICE, dtype=LOW)
    assert model.output_layer.weight.shape[0] == 64
    tokens = torch.randint(0, 61, (1, 9), device=TORCH_DEVICE)
    mask = torch.ones(1, 8, device=TORCH_DEVICE)
    losses = []
    for fill in (0.0, 50.0):  # padding rows that would dominate a softmax they took part in
        with torch.no_grad():
            model.output_layer.weight[61:].fill_(fill)
        losses.append(model.loss(model(tokens[:, :-1], labels=tokens[:, 1:]), mask).item())
        assert model(tokens[:, :-1]).logits.shape[-1] == 61
    assert losses[0] == losses[1]
