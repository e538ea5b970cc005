"""Multi-token prediction against its definition (DeepSeek-V3 section 2.2), written out here.

Depth k at position i combines the depth-(k-1) hidden state h_i with the embedding of token
i + k, runs one transformer layer and predicts token i + k + 1 (= labels[i + k] with Megatron's
shifted labels) through the shared output head. Positions without a target (the last k) are
masked, and the training loss adds lambda / D times the mean of each depth's loss.
"""

import dataclasses

import torch
import torch.nn.functional as F

from megatron.core.config import MTPConfig
from megatron.core.models.deepseek.model import DeepSeekModel, roll_left

from tests.unit.core.models import tiny_model as H


def _model(depths: int, scale: float = 0.3, aux_loss: bool = True) -> DeepSeekModel:
    config = dataclasses.replace(H.tiny_config(), mtp=MTPConfig(num_layers=depths, loss_scaling_factor=scale))
    if not aux_loss:  # the MTP depth's own MoE balance loss is not scaled by lambda
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, load_balancing_type="none", aux_loss_coeff=0.0))
    return DeepSeekModel(config, seed=7).eval()


def test_roll_left_shifts_and_fills():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert roll_left(x, 1).tolist() == [[2, 3, 4, 0], [6, 7, 8, 0]]
    assert roll_left(x, 2, fill=-1).tolist() == [[3, 4, -1, -1], [7, 8, -1, -1]]
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # input untouched


def test_mtp_losses_follow_the_definition():
    model = _model(depths=2)
    tokens = H.batch(0)[:, :-1]  # [b, s]
    labels = H.batch(0)[:, 1:]
    b, s = tokens.shape
    with torch.no_grad():
        out = model(tokens, labels=labels)
        # Main stack by hand, then each depth by hand.
        rotary = model.rotary(s, device=tokens.device, dtype=torch.float32)
        h = model.embedding(tokens)
        for layer in model.layers.values():
            h = layer(h, rotary)
        for k, depth in enumerate(model.mtp, start=1):
            emb = torch.zeros_like(h)
            emb[:, : s - k] = model.embedding(tokens[:, k:])  # token i + k at position i
            mixed = depth.eh_proj(torch.cat([depth.enorm(emb), depth.hnorm(h)], dim=-1))
            h = depth.layer(mixed, rotary)
            logits = model.output_layer(depth.final_layernorm(h))
            # Only positions i < s - k have a target: token i + k + 1 = labels[i + k].
            want = F.cross_entropy(logits[:, : s - k].reshape(-1, logits.shape[-1]), labels[:, k:].reshape(-1), reduction="none")
            got = out.mtp_losses[k - 1][:, : s - k].reshape(-1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The positions beyond s - k are ignored by the loss whatever they hold.
    mask = torch.ones(b, s)
    total = model.loss(out, mask)
    main = out.losses.mean()
    depth_means = [out.mtp_losses[k - 1][:, : s - k].mean() for k in (1, 2)]
    torch.testing.assert_close(total, main + 0.3 / 2 * sum(depth_means))


def test_mtp_uses_the_target_positions_loss_mask():
    model = _model(depths=1, scale=1.0)
    tokens, labels = H.batch(1)[:, :-1], H.batch(1)[:, 1:]
    out = model(tokens, labels=labels)
    mask = torch.ones(tokens.shape)
    mask[:, 3] = 0.0  # label position 3 is padding: main loss skips t=3, depth 1 skips t=2
    total = model.loss(out, mask)
    main = (out.losses * mask).sum() / mask.sum()
    m1 = torch.ones(tokens.shape)
    m1[:, 2] = 0.0
    m1[:, -1] = 0.0
    mtp = (out.mtp_losses[0] * m1).sum() / m1.sum()
    torch.testing.assert_close(total, main + mtp)


def test_mtp_gradients_reach_embedding_and_head_and_are_scaled():
    model = _model(depths=1, scale=0.5, aux_loss=False).train()
    tokens, labels = H.batch(2)[:, :-1], H.batch(2)[:, 1:]
    mask = torch.ones(tokens.shape)
    out = model(tokens, labels=labels)
    model.loss(out, mask).backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    grad_total = model.mtp[0].eh_proj.weight.grad.clone()
    model.zero_grad()
    out = model(tokens, labels=labels)
    m1 = roll_left(mask, 1)
    ((out.mtp_losses[0] * m1).sum() / m1.sum()).backward()
    # The MTP-only parameters see exactly lambda / D times the depth loss gradient.
    torch.testing.assert_close(grad_total, 0.5 * model.mtp[0].eh_proj.weight.grad, rtol=1e-5, atol=1e-9)
