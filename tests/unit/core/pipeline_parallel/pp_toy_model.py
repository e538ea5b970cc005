"""A toy model split into pipeline stages, and its single-process reference, for the PP tests.

Full model: Embedding(VOCAB, HIDDEN) -> num_layers x (Linear(HIDDEN, HIDDEN) + tanh) -> Linear(HIDDEN,
VOCAB) -> mean cross entropy. Optionally every block attaches an auxiliary loss
``aux_coeff * mean(h ** 2)`` through `attach_aux_loss` (like the MoE router's), whose gradient factor
is the stage's ``aux_scale``. Stage-boundary activations are [MICRO_BATCH, SEQ, HIDDEN].
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.moe.load_balancing import attach_aux_loss

VOCAB, HIDDEN, SEQ, MICRO_BATCH = 11, 8, 3, 2
TENSOR_SHAPE = (MICRO_BATCH, SEQ, HIDDEN)


class ToyStage(nn.Module):
    def __init__(self, num_layers: int, first: bool, last: bool, aux_coeff: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN) if first else None
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(num_layers))
        self.head = nn.Linear(HIDDEN, VOCAB) if last else None
        self.aux_coeff = aux_coeff
        self.aux_scale = 1.0
        self.input_tensor: Optional[torch.Tensor] = None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        self.input_tensor = tensor

    def set_aux_scale(self, scale: float) -> None:
        self.aux_scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) if self.embed is not None else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
            if self.aux_coeff:
                h = attach_aux_loss(h, self.aux_coeff * h.pow(2).mean(), self.aux_scale)
        return self.head(h) if self.head is not None else h


def build_full(num_layers: int, aux_coeff: float = 0.0, seed: int = 0) -> ToyStage:
    torch.manual_seed(seed)
    return ToyStage(num_layers, True, True, aux_coeff)


def split_stage(full: ToyStage, ranges: List[Tuple[int, int]], stage: int) -> ToyStage:
    """Stage `stage` of `full` with copied weights (layers ranges[stage])."""
    start, end = ranges[stage]
    part = ToyStage(0, stage == 0, stage == len(ranges) - 1, full.aux_coeff)
    if part.embed is not None:
        part.embed = copy.deepcopy(full.embed)
    if part.head is not None:
        part.head = copy.deepcopy(full.head)
    part.layers = nn.ModuleList(copy.deepcopy(full.layers[i]) for i in range(start, end))
    return part


def full_name(stage_param_name: str, start: int) -> str:
    """Stage-local parameter name -> the full model's name (layer indices shifted by `start`)."""
    if stage_param_name.startswith("layers."):
        _, idx, rest = stage_param_name.split(".", 2)
        return f"layers.{int(idx) + start}.{rest}"
    return stage_param_name


def make_data(num_microbatches: int, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num_microbatches * MICRO_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (num_microbatches * MICRO_BATCH, SEQ), generator=g)
    return tokens, labels


def micro_batches(tokens: torch.Tensor, labels: torch.Tensor) -> Iterator[Dict[str, torch.Tensor]]:
    for t, l in zip(tokens.split(MICRO_BATCH), labels.split(MICRO_BATCH)):
        yield {"tokens": t, "labels": l}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model: ToyStage):
    batch = next(data_iterator)
    output = model(batch["tokens"])

    def loss_func(logits: torch.Tensor):
        loss = cross_entropy(logits, batch["labels"])
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def reference(full: ToyStage, tokens: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss and gradients of one big batch on the whole model (aux scale 1)."""
    model = copy.deepcopy(full)
    loss = cross_entropy(model(tokens), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
