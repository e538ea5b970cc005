"""DeepSeek-V3 / V2 language model on one device: embedding, decoder layers (dense first-k, then
MoE), final norm, untied output head, and multi-token prediction (MTP) depths.

Parameter names (what checkpoints and the HF converter use):
    embedding.weight                                   [V, H]
    layers.{i}.input_layernorm.weight                  [H]
    layers.{i}.self_attn.*                             MLA (see transformer/mla.py)
    layers.{i}.post_attention_layernorm.weight         [H]
    layers.{i}.mlp.*                                   SwiGLUMLP (dense) or MoELayer
    final_layernorm.weight                             [H]
    output_layer.weight                                [V, H]
    mtp.{d}.enorm / hnorm / eh_proj [H, 2H] / layer.* / final_layernorm   (depth d = 0..D-1)

Labels follow Megatron's convention: `labels[b, t]` is the token that position t must predict
(already shifted by the data pipeline), so `model(tokens, labels=labels)` returns per-token losses
aligned with the input positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import DeepSeekConfig
from megatron.core.transformer.mla import MultiLatentAttention
from megatron.core.transformer.mlp import SwiGLUMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.rmsnorm import RMSNorm
from megatron.core.transformer.rope import RotaryEmbedding

RotaryTables = Tuple[torch.Tensor, torch.Tensor]  # (cos, sin), computed once per forward


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). [b, s, H] -> [b, s, H]."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        use_fused = config.kernels.use_fused_rmsnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, use_fused=use_fused)
        self.self_attn = MultiLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, use_fused=use_fused)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(config, layer_idx)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.ffn_hidden_size)

    def forward(self, hidden: torch.Tensor, rotary_pos_emb: RotaryTables) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary_pos_emb=rotary_pos_emb)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2).

    h_k = Layer(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})])), concatenated in the order of the
    released checkpoints (embedding half first). Its logits come from the shared output head
    after this depth's own final norm (`shared_head.norm` in DeepSeek's checkpoints).
    """

    def __init__(self, config: DeepSeekConfig, depth: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        use_fused = config.kernels.use_fused_rmsnorm
        self.enorm = RMSNorm(h, eps, use_fused=use_fused)
        self.hnorm = RMSNorm(h, eps, use_fused=use_fused)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        # Layer index after the main stack: MoE whenever the main stack's MoE rule says so.
        self.layer = DecoderLayer(config, config.num_layers + depth)
        self.final_layernorm = RMSNorm(h, eps, use_fused=use_fused)

    def forward(self, prev_hidden: torch.Tensor, shifted_embeds: torch.Tensor, rotary_pos_emb: RotaryTables) -> torch.Tensor:
        mixed = self.eh_proj(torch.cat([self.enorm(shifted_embeds), self.hnorm(prev_hidden)], dim=-1))
        return self.layer(mixed, rotary_pos_emb)


@dataclass
class ModelOutput:
    """logits [b, s, V] (when no labels) or per-token fp32 losses [b, s] (with labels).

    mtp_losses: per depth k = 1..D, per-token fp32 losses [b, s] of predicting labels[:, t + k]
    at position t (the last k positions have no target and are masked by `loss()`).
    moe_aux_losses: detached sums over MoE layers of each auxiliary loss, for logging (their
    gradients are already attached inside the MoE layers).
    """

    logits: Optional[torch.Tensor] = None
    losses: Optional[torch.Tensor] = None
    mtp_losses: List[torch.Tensor] = field(default_factory=list)
    moe_aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


def roll_left(tensor: torch.Tensor, shift: int, fill: int | float = 0) -> torch.Tensor:
    """tensor[:, t] <- tensor[:, t + shift]; the last `shift` positions get `fill`. [b, s] -> [b, s]."""
    rolled = torch.roll(tensor, shifts=-shift, dims=1)
    rolled[:, -shift:] = fill
    return rolled


class DeepSeekModel(nn.Module):
    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, h)
        # One parameter-free rotary table generator shared by all layers (tables built once per forward).
        self.rotary = RotaryEmbedding(config.mla.qk_rope_head_dim, config.rope)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(h, config.norm_eps, use_fused=config.kernels.use_fused_rmsnorm)
        self.output_layer = nn.Linear(h, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output_layer.weight = self.embedding.weight
        self.mtp = nn.ModuleList(MTPDepth(config, d) for d in range(config.mtp.num_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_method_std) for every matrix, norms 1, biases 0 (HF's init)."""
        std = self.config.init_method_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for name, param in self.named_parameters():
            # Stacked expert weights and the router are plain Parameters, not nn.Linear.
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "router.weight")):
                param.normal_(0.0, std)

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """input_ids [b, s] -> ModelOutput; MTP runs only when labels are given (training)."""
        embeds = self.embedding(input_ids)  # [b, s, H]
        rotary = self.rotary(input_ids.shape[1], device=embeds.device, dtype=embeds.dtype, position_ids=position_ids)
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, rotary)
        out = ModelOutput()
        main_logits = self.output_layer(self.final_layernorm(hidden))  # [b, s, V]
        if labels is None:
            out.logits = main_logits
        else:
            out.losses = self.token_losses(main_logits, labels)
            prev = hidden
            for depth, module in enumerate(self.mtp, start=1):
                # Depth k combines h_{k-1} at position i with the embedding of token i + k and
                # predicts labels[i + k] (= token i + k + 1).
                shifted_embeds = self.embedding(roll_left(input_ids, depth))
                prev = module(prev, shifted_embeds, rotary)
                mtp_logits = self.output_layer(module.final_layernorm(prev))
                out.mtp_losses.append(self.token_losses(mtp_logits, roll_left(labels, depth)))
        for moe in self.moe_layers():
            stats = moe.last_stats
            if stats is not None:
                for name, value in stats.aux_losses.items():
                    out.moe_aux_losses[name] = out.moe_aux_losses.get(name, 0.0) + value
        return out

    @staticmethod
    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy in fp32. logits [b, s, V], labels [b, s] -> [b, s]."""
        b, s, v = logits.shape
        return F.cross_entropy(logits.float().reshape(b * s, v), labels.reshape(b * s), reduction="none").view(b, s)

    def loss(self, out: ModelOutput, loss_mask: torch.Tensor) -> torch.Tensor:
        """Scalar training loss: masked mean LM loss + mtp_scale / D * sum of masked mean MTP losses.

        loss_mask [b, s] (float), aligned with labels. Depth k uses the mask of its target
        position, loss_mask[:, t + k], and nothing for the last k positions.
        """
        assert out.losses is not None, "loss() needs the output of forward(..., labels=...)"
        mask = loss_mask.float()
        total = (out.losses * mask).sum() / mask.sum().clamp(min=1.0)
        if out.mtp_losses:
            scale = self.config.mtp.loss_scaling_factor / len(out.mtp_losses)
            for depth, losses in enumerate(out.mtp_losses, start=1):
                m = roll_left(mask, depth)
                total = total + scale * (losses * m).sum() / m.sum().clamp(min=1.0)
        return total
