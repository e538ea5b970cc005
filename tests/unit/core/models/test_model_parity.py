"""THE acceptance tests: our DeepSeekModel, converted from an HF checkpoint, reproduces HF's logits
and the gradients of every parameter in fp32.

Each tiny random HF model (hf_tiny.py: V3 with q LoRA, YaRN, a nonzero expert bias and 4 groups;
V2-Lite style; V2 group-limited greedy) is saved with save_pretrained and loaded with
load_hf_checkpoint. Losses are made the same scalar: HF's own cross entropy with `shift_labels`
= our Megatron labels (labels[t] = token t+1), ours = model.loss with a full mask. HF gradients
(v5 fused expert layout) are mapped to our names through the converter and compared piece by
piece in HF's on-disk layout (each expert's gate / up / down separately, so a lightly routed
expert's small gradient is held to the same relative bound as a busy one's).
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from tests.unit.core.models.hf_tiny import build_hf

from megatron.core.models.deepseek import hf_to_ours, load_hf_checkpoint
from megatron.core.models.deepseek.hf_conversion import hf_layout

LOGITS_REL_TOL = 1e-5
KL_TOL = 1e-8
GRAD_REL_TOL = 1e-4
BATCH, SEQ = 2, 24


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are exactly zero)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return 0.0 if diff == 0.0 else diff / max(scale, 1e-30)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || ours) per token, averaged, in float64. [b, s, V] each."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    ours = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - ours)).sum(-1).mean().item()


def parity(name: str, tmp_path) -> Dict[str, float]:
    hf = build_hf(name, seed=0, attn="eager")
    hf.save_pretrained(str(tmp_path))
    ours, config = load_hf_checkpoint(str(tmp_path))
    assert config.mtp.num_layers == 0
    torch.manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:].contiguous()

    with torch.no_grad():
        hf_logits = hf.eval()(inputs).logits
        our_logits = ours.eval()(inputs).logits
    figures = {"logits_rel_err": rel_err(our_logits, hf_logits), "kl": mean_kl(hf_logits, our_logits)}
    figures["top1_agree"] = (hf_logits.argmax(-1) == our_logits.argmax(-1)).float().mean().item()

    hf.train()
    ours.train()
    hf_loss = hf(inputs, labels=inputs, shift_labels=labels).loss
    hf_loss.backward()
    out = ours(inputs, labels=labels)
    our_loss = ours.loss(out, torch.ones_like(labels, dtype=torch.float32))
    our_loss.backward()
    figures["loss_rel_err"] = abs(our_loss.item() - hf_loss.item()) / abs(hf_loss.item())

    # HF gradients -> our names (fused expert keys accepted); buffers get zero "gradients".
    hf_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in hf.named_parameters()}
    hf_grads.update({n: torch.zeros_like(b) for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")})
    mapped = hf_to_ours(hf_grads, config)
    params = dict(ours.named_parameters())
    assert set(params) == set(mapped) - {n for n in mapped if n.endswith("expert_bias")}
    layout, _ = hf_layout({n: tuple(p.shape) for n, p in params.items()}, config)
    worst, worst_key = 0.0, ""
    for pname, pieces in layout.items():
        grad = params[pname].grad
        assert grad is not None, f"{pname} got no gradient"
        for piece in pieces:
            err = rel_err(grad[piece.index], mapped[pname][piece.index])
            if err > worst:
                worst, worst_key = err, piece.hf_key
    figures["worst_grad_rel_err"] = worst
    figures["worst_grad_key"] = worst_key
    return figures


@pytest.mark.parametrize("name", ["v3", "v2_lite", "v2_group"])
def test_logits_and_gradients_match_hf(name, tmp_path):
    figures = parity(name, tmp_path)
    print(f"\nparity {name}: {figures}")
    assert figures["logits_rel_err"] <= LOGITS_REL_TOL, figures
    assert figures["kl"] <= KL_TOL, figures
    assert figures["loss_rel_err"] <= 1e-6, figures
    assert figures["worst_grad_rel_err"] <= GRAD_REL_TOL, figures


@pytest.mark.parametrize(
    "name, overrides, zero_bias",
    [("v3", {}, True), ("v3", {"n_group": 1, "topk_group": 1}, False), ("v2_group", {"topk_method": "greedy"}, False)],
)
def test_parity_models_exercise_their_routing(name, overrides, zero_bias):
    """Guard against vacuous parity tests: the expert bias and group limiting must change HF's logits."""
    hf = build_hf(name)
    other = build_hf(name, **overrides)
    other.load_state_dict(hf.state_dict())
    if zero_bias:
        for n, b in other.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
    torch.manual_seed(2)
    tokens = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ))
    with torch.no_grad():
        assert (hf(tokens).logits - other(tokens).logits).abs().max() > 1e-3
