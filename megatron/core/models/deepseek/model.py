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

Parallelism is applied here and nowhere else in the model math, from one `ParallelContext`: its
TP group splits MLA heads, dense MLPs and the vocabulary of the embedding and output head
(vocab-parallel cross entropy); sequence parallelism keeps [b, s/tp, H] between blocks; its EP
group splits the routed experts; a pipeline stage holds `layer_range` and the embedding
(`pre_process`) and/or the output head and MTP (`post_process`).

Vocabulary: the embedding and output head have `config.padded_vocab_size(tp)` rows; logits of the
padding rows are excluded from the softmax and from the loss, and returned logits hold the
`config.vocab_size` real columns only. Weights are initialised by
`megatron.core.models.deepseek.init.initialize_parameters` from `seed` (layout-independent).

Labels follow Megatron's convention: `labels[b, t]` is the token that position t must predict
(already shifted by the data pipeline), so `model(tokens, labels=labels)` returns per-token losses
aligned with the input positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import communication as comm
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.core.config import DeepSeekConfig, RecomputeConfig
from megatron.core.models.deepseek.init import initialize_parameters
from megatron.core.timers import Timers
from megatron.core.tensor_parallel import Linear, VocabParallelEmbedding, gather_from_region, vocab_parallel_cross_entropy
from megatron.core.transformer.parallel_context import SEQUENCE_DIM, SINGLE_DEVICE, ParallelContext
from megatron.core.transformer.mla import MultiLatentAttention
from megatron.core.transformer.mlp import SwiGLUMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.rmsnorm import RMSNorm
from megatron.core.transformer.rope import RotaryEmbedding

RotaryTables = Tuple[torch.Tensor, torch.Tensor]  # (cos, sin), computed once per forward


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). [b, s, H] -> [b, s, H]
    ([b, s/tp, H] under sequence parallelism)."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int, parallel: ParallelContext = SINGLE_DEVICE) -> None:
        super().__init__()
        tp = parallel.tp
        self.layer_idx = layer_idx
        use_fused = config.kernels.use_fused_rmsnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, use_fused=use_fused)
        self.self_attn = MultiLatentAttention(config, tp=tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, use_fused=use_fused)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(config, layer_idx, parallel)
            # The router and shared experts are replicated and see only this rank's tokens under SP.
            tp.mark_sequence_parallel(self.mlp.router.parameters())
            if self.mlp.shared_experts is not None:
                tp.mark_sequence_parallel(self.mlp.shared_experts.parameters())
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.ffn_hidden_size, tp=tp,
                                 use_onednn=config.kernels.use_onednn_linear)
        tp.mark_sequence_parallel([self.input_layernorm.weight, self.post_attention_layernorm.weight])
        self.recompute_mlp = False  # selective recompute of the MoE MLP (set by the model)

    def forward(self, hidden: torch.Tensor, rotary_pos_emb: RotaryTables) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary_pos_emb=rotary_pos_emb)
        normed = self.post_attention_layernorm(hidden)
        if self.recompute_mlp and torch.is_grad_enabled():
            return hidden + checkpoint(self.mlp, normed, use_reentrant=False)
        return hidden + self.mlp(normed)


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2).

    h_k = Layer(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})])), concatenated in the order of the
    released checkpoints (embedding half first). Its logits come from the shared output head
    after this depth's own final norm (`shared_head.norm` in DeepSeek's checkpoints).
    """

    def __init__(self, config: DeepSeekConfig, depth: int, parallel: ParallelContext = SINGLE_DEVICE) -> None:
        super().__init__()
        tp = parallel.tp
        h, eps = config.hidden_size, config.norm_eps
        use_fused = config.kernels.use_fused_rmsnorm
        self.enorm = RMSNorm(h, eps, use_fused=use_fused)
        self.hnorm = RMSNorm(h, eps, use_fused=use_fused)
        # Replicated: it mixes two H-wide halves of this rank's tokens.
        self.eh_proj = Linear(2 * h, h, bias=False, use_onednn=config.kernels.use_onednn_linear)
        # Layer index after the main stack: MoE whenever the main stack's MoE rule says so.
        self.layer = DecoderLayer(config, config.num_layers + depth, parallel)
        self.final_layernorm = RMSNorm(h, eps, use_fused=use_fused)
        tp.mark_sequence_parallel(
            [self.enorm.weight, self.hnorm.weight, self.eh_proj.weight, self.final_layernorm.weight]
        )

    def forward(self, prev_hidden: torch.Tensor, shifted_embeds: torch.Tensor, rotary_pos_emb: RotaryTables) -> torch.Tensor:
        mixed = self.eh_proj(torch.cat([self.enorm(shifted_embeds), self.hnorm(prev_hidden)], dim=-1))
        return self.layer(mixed, rotary_pos_emb)


@dataclass
class ModelOutput:
    """logits [b, s, V] (when no labels) or per-token fp32 losses [b, s] (with labels).

    mtp_losses: per depth k = 1..D, per-token fp32 losses [b, s] of predicting labels[:, t + k]
    at position t (the last k positions have no target and are masked by `loss()`).
    moe_aux_losses: detached sums over this stage's MoE layers of each auxiliary loss, for
    logging (their gradients are already attached inside the MoE layers).
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


def _run_chunk(layers: List[DecoderLayer], hidden: torch.Tensor, rotary: RotaryTables) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden, rotary)
    return hidden


class LayerDict(nn.ModuleDict):
    """Decoder layers keyed by their GLOBAL index ("layers.{i}" in every pipeline layout);
    `layers[i]` accepts the int index too."""

    def __getitem__(self, key):  # type: ignore[override]
        return super().__getitem__(str(key))


class DeepSeekModel(nn.Module):
    """The whole model, or one pipeline stage of it.

    Args:
        parallel: tensor / sequence / expert-parallel split (default: one device).
        layer_range: (start, end) decoder layers held by this stage (default: all).
        pre_process: this stage embeds the input ids (first stage).
        post_process: this stage holds the final norm, output head and MTP (last stage); it also
            holds its own copy of the embedding for MTP. Under pipeline parallelism both copies are
            marked `shared_embedding` so their gradients are summed.
        recompute: activation recomputation.
        seed: the initialisation seed (values depend on it and the parameter names only).
    On a stage without `pre_process`, `set_input_tensor` provides the hidden input.
    """

    def __init__(
        self,
        config: DeepSeekConfig,
        *,
        parallel: ParallelContext = SINGLE_DEVICE,
        layer_range: Optional[Tuple[int, int]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        recompute: RecomputeConfig = RecomputeConfig(),
        seed: int = 0,
    ) -> None:
        super().__init__()
        tp = parallel.tp
        self.config, self.parallel, self.tp, self.recompute = config, parallel, tp, recompute
        self.padded_vocab_size = config.padded_vocab_size(tp.size)
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= start <= end <= config.num_layers:
            raise ValueError(f"layer range {layer_range} outside the model's {config.num_layers} layers")
        if tp.enabled and config.tie_word_embeddings:
            raise ValueError("tied embeddings are not supported with tensor parallelism")
        self.layer_offset = start
        h = config.hidden_size
        needs_embedding = pre_process or (post_process and config.mtp.num_layers > 0)
        if needs_embedding:
            self.embedding = self._build_embedding()
            if pre_process != post_process and config.mtp.num_layers > 0:
                # First and last pipeline stages both hold the embedding (the last one for MTP):
                # their gradients are summed over the "embedding" group.
                self.embedding.weight.shared_embedding = True  # type: ignore[attr-defined]
        # One parameter-free rotary table generator shared by all layers (tables built once per forward).
        self.rotary = RotaryEmbedding(config.mla.qk_rope_head_dim, config.rope)
        # Layers keep their global index in the name (layers.{i}) so checkpoints are layout-free.
        self.layers = LayerDict({str(i): DecoderLayer(config, i, parallel) for i in range(start, end)})
        if post_process:
            self.final_layernorm = RMSNorm(h, config.norm_eps, use_fused=config.kernels.use_fused_rmsnorm)
            tp.mark_sequence_parallel([self.final_layernorm.weight])
            # Column-parallel over the vocabulary; gathers the sequence under SP.
            self.output_layer = tp.column_linear(h, self.padded_vocab_size, False, gather_sequence=True,
                                                 use_onednn=config.kernels.use_onednn_linear)
            self._mark_vocab_rows(self.output_layer.weight)
            if config.tie_word_embeddings:
                self.output_layer.weight = self.embedding.weight
            self.mtp = nn.ModuleList(MTPDepth(config, d, parallel) for d in range(config.mtp.num_layers))
        self.input_tensor: Optional[torch.Tensor] = None
        # Called after each decoder layer when set (HPU lazy mode's mark_step, --mark-step-per-layer).
        self.layer_boundary: Optional[Callable[[], None]] = None
        for layer in self._all_decoder_layers():
            layer.recompute_mlp = recompute.moe and layer.is_moe
            layer.self_attn.recompute_core_attention = recompute.core_attention
        initialize_parameters(self, seed, config.init_method_std, parallel)

    def _all_decoder_layers(self) -> List[DecoderLayer]:
        return [m for m in self.modules() if isinstance(m, DecoderLayer)]

    def _build_embedding(self) -> nn.Module:
        if not self.tp.enabled:
            embedding = nn.Embedding(self.padded_vocab_size, self.config.hidden_size)
        else:
            embedding = VocabParallelEmbedding(
                self.padded_vocab_size,
                self.config.hidden_size,
                group=self.tp.group,
                sequence_parallel=self.tp.sequence_split,
                sequence_dim=SEQUENCE_DIM,
                init_method=None,
            )
        self._mark_vocab_rows(embedding.weight)
        return embedding

    def _mark_vocab_rows(self, weight: nn.Parameter) -> None:
        """Rows >= vocab_size of this [padded vocab, H] weight are padding (init and checkpoints skip them)."""
        if self.padded_vocab_size > self.config.vocab_size:
            weight.logical_rows = self.config.vocab_size  # type: ignore[attr-defined]

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Hidden states received from the previous pipeline stage ([b, s(/tp), H])."""
        self.input_tensor = tensor

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def moe_aux_loss_values(self) -> Dict[str, torch.Tensor]:
        """Detached sums over this stage's MoE layers of each auxiliary loss of the last forward
        (coefficients included; 0-dim fp32 tensors on the device)."""
        out: Dict[str, torch.Tensor] = {}
        for moe in self.moe_layers():
            if moe.last_stats is not None:
                for name, value in moe.last_stats.aux_losses.items():
                    out[name] = out[name] + value if name in out else value
        return out

    def set_timers(self, timers: Timers) -> None:
        """Time the MoE layers' token dispatch and combine ("moe-dispatch", "moe-combine")."""
        for moe in self.moe_layers():
            moe.timers = timers

    def set_moe_aux_loss_scale(self, scale: float) -> None:
        """Gradient factor of every MoE auxiliary loss (1 / micro-batches per step, like the LM loss)."""
        for moe in self.moe_layers():
            moe.router.set_aux_loss_scale(scale)

    def _count_expert_loads(self) -> None:
        """Training forwards add their routing counts to each MoE layer's logging window (once per
        forward: a recompute in backward does not pass here)."""
        if self.training and torch.is_grad_enabled():
            for moe in self.moe_layers():
                moe.count_window_load()

    def take_expert_load_window(self) -> Dict[int, torch.Tensor]:
        """{global layer index (MTP depth d: num_layers + d - 1): [E + 1] fp32} of this stage's MoE
        layers: this rank's routing choices per expert since the last call, then the dropped ones
        (`MoELayer.take_window_load`); every window restarts. Summing over ranks is the caller's."""
        out: Dict[int, torch.Tensor] = {}
        for moe in self.moe_layers():
            load = moe.take_window_load()
            if load is not None:
                out[moe.layer_idx] = load
        return out

    @torch.no_grad()
    def update_expert_bias(self) -> int:
        """Aux-loss-free balancing, once per optimizer step: every router's expert bias moves by the
        routing load of the step, summed over the ranks that routed distinct tokens through the same
        routers (`parallel.router_load_groups`: this stage's TP x DP ranks), in one all-reduce per
        group for all layers. Returns the number of routers updated."""
        routers = [m.router for m in self.moe_layers() if m.router.expert_bias is not None]
        if not routers:
            return 0
        loads = torch.stack([r.local_tokens_per_expert for r in routers])  # [routers, E] fp32
        for group in self.parallel.router_load_groups:
            comm.all_reduce(loads, group=group)
        for router, load in zip(routers, loads):
            router.update_expert_bias(load)
        return len(routers)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)  # [b, s, H] ([b, s/tp, H] under SP)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ):
        """input_ids [b, s] -> ModelOutput on the last stage, else this stage's hidden output.

        MTP runs only when labels are given (training).
        """
        if self.pre_process:
            hidden = self._embed(input_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a pipeline stage without the embedding needs set_input_tensor() before forward")
            hidden = self.input_tensor
        rotary = self.rotary(input_ids.shape[1], device=hidden.device, dtype=hidden.dtype, position_ids=position_ids)
        hidden = self._run_layers(hidden, rotary)
        if not self.post_process:
            self._count_expert_loads()
            return hidden
        out = ModelOutput()
        main_logits = self.output_layer(self.final_layernorm(hidden))  # [b, s, V(/tp)]
        if labels is None:
            logits = gather_from_region(main_logits, self.tp.group) if self.tp.enabled else main_logits
            out.logits = logits[..., : self.config.vocab_size]
        else:
            out.losses = self.token_losses(main_logits, labels)
            prev = hidden
            for depth, module in enumerate(self.mtp, start=1):
                # Depth k combines h_{k-1} at position i with the embedding of token i + k and
                # predicts labels[i + k] (= token i + k + 1).
                prev = module(prev, self._embed(roll_left(input_ids, depth)), rotary)
                mtp_logits = self.output_layer(module.final_layernorm(prev))
                out.mtp_losses.append(self.token_losses(mtp_logits, roll_left(labels, depth)))
        self._count_expert_loads()
        for moe in self.moe_layers():
            stats = moe.last_stats
            if stats is not None:
                for name, value in stats.aux_losses.items():
                    out.moe_aux_losses[name] = out.moe_aux_losses.get(name, 0.0) + value
        return out

    def _run_layers(self, hidden: torch.Tensor, rotary: RotaryTables) -> torch.Tensor:
        """The stage's decoder layers, with full recompute when configured (only while training)."""
        layers = list(self.layers.values())
        rc = self.recompute
        if rc.granularity != "full" or not torch.is_grad_enabled():
            for layer in layers:
                hidden = layer(hidden, rotary)
                if self.layer_boundary is not None:
                    self.layer_boundary()
            return hidden
        if rc.method == "uniform":
            # Chunks of num_layers layers; only each chunk's input is kept for backward.
            for start in range(0, len(layers), rc.num_layers):
                chunk = layers[start : start + rc.num_layers]
                hidden = checkpoint(_run_chunk, chunk, hidden, rotary, use_reentrant=False)
            return hidden
        for i, layer in enumerate(layers):  # block: the first num_layers layers, one by one
            hidden = checkpoint(layer, hidden, rotary, use_reentrant=False) if i < rc.num_layers else layer(hidden, rotary)
        return hidden

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy in fp32 over the real vocabulary (padding columns excluded).
        logits [b, s, padded V(/tp)], labels [b, s] -> [b, s]."""
        vocab = self.config.vocab_size
        if self.tp.enabled:
            return vocab_parallel_cross_entropy(logits.float(), labels, self.tp.group, vocab_size=vocab)
        b, s, _ = logits.shape
        logits = logits.float()[..., :vocab]
        return F.cross_entropy(logits.reshape(b * s, vocab), labels.reshape(b * s), reduction="none").view(b, s)

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
