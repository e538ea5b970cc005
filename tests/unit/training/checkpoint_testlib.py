"""Shared pieces of the checkpoint tests: a tiny DeepSeek model built directly (one process), a
reference training loop, and comparisons. Also run as the child of the SIGKILL test."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from megatron.core.config import DeepSeekConfig, MLAConfig, MoEConfig, MTPConfig
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import OptimizerConfig, build_optimizer
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.training import checkpointing as ckpt

VOCAB, SEQ, BATCH = 61, 8, 2


def tiny_config(**overrides) -> DeepSeekConfig:
    """3 layers (1 dense, 2 MoE: 4 experts, top 2, a shared expert, expert bias) + 1 MTP depth.
    Vocabulary 61 padded to 64 rows (the embedding / output carry logical_rows 61)."""
    config = DeepSeekConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_layers=3, first_k_dense=1, max_position_embeddings=64,
        mla=MLAConfig(num_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        moe=MoEConfig(num_experts=4, topk=2, ffn_hidden_size=16, num_shared_experts=1, enable_expert_bias=True,
                      bias_update_rate=1e-2, load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01),
        mtp=MTPConfig(num_layers=1, loss_scaling_factor=0.3),
        make_vocab_size_divisible_by=8,
    )
    return dataclasses.replace(config, **overrides)


def build(seed: int = 1234, bf16: bool = False, config: DeepSeekConfig = None):
    torch.manual_seed(seed)
    config = config or tiny_config()
    model = DeepSeekModel(config)
    if bf16:
        model.to(torch.bfloat16)  # the routers keep their fp32 state
    state = ParallelState.build(ParallelConfig())
    opt = build_optimizer([model], OptimizerConfig(lr=3e-3, weight_decay=0.01, clip_grad=1.0, bf16=bf16), state)
    return model, opt, state


def batch(step: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, SEQ)}


def train_steps(model, opt, steps) -> List[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        model.set_moe_aux_loss_scale(1.0)
        mb = batch(step)
        loss = model.loss(model(mb["tokens"], labels=mb["labels"]), mb["loss_mask"])
        loss.backward()
        ok, _, _ = opt.step()
        assert ok
        model.update_expert_bias()
        losses.append(loss.item())
    return losses


def snapshot(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def opt_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["param_groups"] == b["param_groups"]
    for ca, cb in zip(a["params"], b["params"]):
        assert ca.keys() == cb.keys()
        for name in ca:
            assert ca[name].keys() == cb[name].keys(), name
            for key in ca[name]:
                assert torch.equal(ca[name][key], cb[name][key]), (name, key)


def save(root, it, model, opt, state, rng=True, **kwargs):
    return ckpt.save_checkpoint(str(root), it, [model], opt, {"lr_step": it}, None, state, {"train": it * 4}, rng=rng, **kwargs)
