"""Load balancing: aux-loss-free bias update, V3 sequence-wise and V2 expert-level aux losses, z-loss,
and the autograd attachment that adds their gradients without changing the output."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.unit.core.transformer.moe.moe_test_utils import tiny_config, initialized

from megatron.core.transformer.moe import MoELayer, TopKRouter, attach_aux_loss
from megatron.core.transformer.moe import load_balancing as lb

E, K = 8, 2


# ---- aux-loss-free bias --------------------------------------------------------------------------
def test_bias_update_rule_hand_example() -> None:
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0])
    lb.apply_bias_update(bias, torch.tensor([3.0, 1.0, 2.0, 2.0]), rate=0.1)  # mean load 2
    assert torch.allclose(bias, torch.tensor([0.4, 0.1, -0.25, 0.0]))


def _hand_counts(indices: torch.Tensor, mask=None) -> torch.Tensor:
    counts = torch.zeros(E)
    for t in range(indices.shape[0]):
        if mask is not None and not bool(mask[t]):
            continue
        for e in indices[t].tolist():
            counts[e] += 1
    return counts


def test_bias_accumulates_over_micro_batches_and_resets() -> None:
    torch.manual_seed(0)
    router = initialized(TopKRouter(tiny_config(enable_expert_bias=True, bias_update_rate=0.01)))
    router.train()
    x1, x2 = torch.randn(2, 5, 32), torch.randn(1, 7, 32)
    mask2 = torch.tensor([[True] * 5 + [False] * 2])  # padding tokens are not load
    expected = _hand_counts(router(x1).indices) + _hand_counts(router(x2, mask2).indices, mask2.view(-1))
    assert torch.equal(router.local_tokens_per_expert, expected)
    assert expected.sum() == (10 + 5) * K
    with torch.no_grad():  # eval-style passes (and reentrant checkpointing's first pass) do not count
        router(torch.randn(3, 4, 32))
    router.eval()
    router(torch.randn(3, 4, 32))
    assert torch.equal(router.local_tokens_per_expert, expected)

    router.update_expert_bias()
    assert torch.allclose(router.expert_bias, 0.01 * torch.sign(expected.mean() - expected))
    assert torch.equal(router.local_tokens_per_expert, torch.zeros(E))


def test_update_expert_bias_over_model_uses_one_all_reduce(monkeypatch) -> None:
    """DeepSeekModel.update_expert_bias: one all-reduce of the stacked [routers, E] loads per load group."""
    import dataclasses

    from megatron.core import communication as comm
    from megatron.core.models.deepseek.model import DeepSeekModel
    from megatron.core.transformer.parallel_context import ParallelContext

    cfg = dataclasses.replace(tiny_config(enable_expert_bias=True, bias_update_rate=0.1), num_layers=3, first_k_dense=1)
    fake_group = object()
    model = DeepSeekModel(cfg, parallel=ParallelContext(router_load_groups=(fake_group,)), seed=1)
    model.train()
    model(torch.randint(0, 64, (2, 6)), labels=torch.randint(0, 64, (2, 6)))
    loads = [layer.router.local_tokens_per_expert.clone() for layer in model.moe_layers()]
    calls = []

    class TwoIdenticalRanks:  # the communication backend of two DP ranks that routed the same tokens
        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def get_world_size(self, group=None):
            return 2

        def all_reduce(self, t, op=None, group=None, async_op=False):
            calls.append((tuple(t.shape), group))
            t.mul_(2)

    monkeypatch.setattr(comm, "_backend", TwoIdenticalRanks())
    assert model.update_expert_bias() == 2
    assert calls == [((2, E), fake_group)]
    for layer, load in zip(model.moe_layers(), loads):
        total = 2 * load
        assert total.sum() > 0
        assert torch.allclose(layer.router.expert_bias, 0.1 * torch.sign(total.mean() - total))
        assert not layer.router.local_tokens_per_expert.any()


# ---- aux losses vs hand computations ---------------------------------------------------------
def _router_with_loss(**moe_kwargs) -> TopKRouter:
    torch.manual_seed(2)
    router = initialized(TopKRouter(tiny_config(**moe_kwargs)))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    return router


def _hand_balance_loss(scores, indices, coeff, mask=None) -> float:
    """Paper formula with loops: per sequence, sum_i f_i P_i; f_i = E/(kT) count_i, P_i = mean_t s_ti / sum_j s_tj."""
    losses = []
    for b in range(scores.shape[0]):
        tokens = [t for t in range(scores.shape[1]) if mask is None or bool(mask[b, t])]
        if not tokens:
            continue
        n = len(tokens)
        total = 0.0
        for i in range(E):
            count = sum(int(i in indices[b, t].tolist()) for t in tokens)
            p = sum(float(scores[b, t, i]) / float(scores[b, t].sum()) for t in tokens) / n
            total += E / (K * n) * count * p
        losses.append(coeff * total)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("with_mask", [False, True])
def test_v3_sequence_aux_loss_matches_paper(with_mask: bool) -> None:
    router = _router_with_loss(load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01, enable_expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))  # the bias must not enter the loss
    x = torch.randn(3, 6, 32)
    mask = torch.ones(3, 6, dtype=torch.bool)
    if with_mask:
        mask[0, 4:] = False
        mask[2, :] = False  # a sequence of padding only is left out of the mean
    out = router(x, mask if with_mask else None)
    scores = torch.sigmoid(torch.nn.functional.linear(x, router.weight)).detach()  # sigmoid, as the router (row 1)
    hand = _hand_balance_loss(scores, out.indices.view(3, 6, K), 0.01, mask if with_mask else None)
    assert math.isclose(float(out.aux_losses["seq_aux_loss"]), hand, rel_tol=1e-5)


def test_v2_expert_aux_loss_matches_hand() -> None:
    router = _router_with_loss(score_function="softmax", load_balancing_type="aux_loss", aux_loss_coeff=0.003)
    x = torch.randn(2, 5, 32)
    out = router(x)
    scores = torch.softmax(torch.nn.functional.linear(x, router.weight), dim=-1).view(1, 10, E).detach()
    hand = _hand_balance_loss(scores, out.indices.view(1, 10, K), 0.003)  # one "sequence" of all tokens
    assert math.isclose(float(out.aux_losses["aux_loss"]), hand, rel_tol=1e-5)
    assert "seq_aux_loss" not in out.aux_losses


def test_z_loss_matches_hand() -> None:
    router = _router_with_loss(z_loss_coeff=1e-3)
    x = torch.randn(2, 4, 32)
    out = router(x)
    logits = torch.nn.functional.linear(x.view(-1, 32), router.weight).detach()
    hand = 1e-3 * sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 8
    assert math.isclose(float(out.aux_losses["z_loss"]), hand, rel_tol=1e-5)


# ---- gradients of the attached losses --------------------------------------------------------------
def test_attach_aux_loss_is_identity_with_extra_gradient() -> None:
    w = torch.randn(3, requires_grad=True)
    act = torch.randn(4, requires_grad=True)
    out = attach_aux_loss(act * 2, (w ** 2).sum(), scale=0.25)
    assert torch.equal(out, act * 2)
    out.sum().backward()
    assert torch.allclose(w.grad, 0.25 * 2 * w) and torch.allclose(act.grad, torch.full((4,), 2.0))


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["seq_aux_loss", "aux_loss"])
def test_aux_loss_gradients_reach_parameters(kind: str, scale: float) -> None:
    """Grads of layer(x).sum() with attached losses == autograd of out.sum() + scale * (aux + z)."""
    score = "sigmoid" if kind == "seq_aux_loss" else "softmax"
    kw = dict(score_function=score, num_groups=4, group_topk=2, routed_scaling_factor=2.0)
    torch.manual_seed(3)
    layer = initialized(MoELayer(tiny_config(load_balancing_type=kind, aux_loss_coeff=0.05, z_loss_coeff=0.01, **kw), 0))
    plain = initialized(MoELayer(tiny_config(**kw), 0))
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
        plain.router.weight.copy_(layer.router.weight)
    layer.router.set_aux_loss_scale(scale)
    x = torch.randn(2, 6, 32)

    x1 = x.clone().requires_grad_()
    out = layer(x1)
    out.sum().backward()

    x2 = x.clone().requires_grad_()
    out_ref = plain(x2)
    assert torch.equal(out, out_ref)  # the losses do not change the output
    routing = plain.router(x2)
    scores = routing.scores
    if kind == "seq_aux_loss":
        aux = lb.sequence_aux_loss(scores.view(2, 6, E), routing.indices.view(2, 6, K), K, 0.05)
    else:
        aux = lb.expert_aux_loss(scores, routing.indices, K, 0.05)
    aux = aux + lb.z_loss(routing.logits, 0.01)
    assert torch.allclose(aux, sum(layer.last_stats.aux_losses.values()))
    (out_ref.sum() + scale * aux).backward()

    for (name, p), (_, q) in zip(layer.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5, msg=name)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-7, rtol=1e-5)
    # ... and the aux term really contributed to the router's gradient.
    no_aux = copy.deepcopy(plain)
    no_aux.zero_grad()
    no_aux(x.clone()).sum().backward()
    assert not torch.allclose(no_aux.router.weight.grad, layer.router.weight.grad)


