"""Activation recompute: same loss and gradients as storing everything, fewer saved activations."""


import pytest
import torch

from megatron.core.config import RecomputeConfig
from megatron.core.models.deepseek.model import DeepSeekModel

from tests.unit.core.models import tiny_model as H


def _run(config, init, recompute):
    model = DeepSeekModel(config, recompute=recompute)
    model.load_state_dict(init)
    tokens = H.batch(0)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss = model.loss(out, torch.ones(tokens.shape[0], tokens.shape[1] - 1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize(
    "recompute",
    [
        RecomputeConfig("full", "uniform", 2),
        RecomputeConfig("full", "block", 1),
        RecomputeConfig("selective", modules=("moe",)),
        RecomputeConfig("selective", modules=("core_attn",)),
        RecomputeConfig("selective", modules=("core_attn", "moe")),
    ],
    ids=["full_uniform2", "full_block1", "selective_moe", "selective_attn", "selective_attn_moe"],
)
def test_recompute_matches_and_saves_memory(recompute):
    config = H.tiny_config()
    init = H.initial_state(config)
    base_loss, base_grads, base_saved = _run(config, init, RecomputeConfig())
    loss, grads, saved = _run(config, init, recompute)
    assert torch.equal(loss, base_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    assert saved < base_saved, (saved, base_saved)


def test_recompute_flags_validated():
    with pytest.raises(ValueError, match="--recompute-method"):
        RecomputeConfig("full")
    with pytest.raises(ValueError, match="--recompute-num-layers"):
        RecomputeConfig("full", "uniform")
    with pytest.raises(ValueError, match="--recompute-modules"):
        RecomputeConfig("selective")
    with pytest.raises(ValueError, match="--recompute-modules mlp_fc1: not supported"):
        RecomputeConfig("selective", modules=("mlp_fc1",))
