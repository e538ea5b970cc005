"""Run the production training entry point (`megatron.training.training.pretrain`) from a fresh
start on spawned gloo ranks in some parallel layout, and on one process, and compare.

Nothing here builds a model or runs a step: every rank calls `pretrain(argv)` with the same model
and data flags plus its layout flags, exactly what `pretrain_gpt.py` runs under torchrun. Each rank
reports how many times `model_builder.build_model_stage` ran (the test asserts the production
builder made the model), the per-iteration losses and grad norms its logger printed, and the
checkpoint it saved at the end, whose weights are compared through the checkpoint export.

The model: tiny DeepSeek-V3 (MLA with q LoRA, 1 dense + 3 MoE layers, 8 experts in 4 groups,
top-2 of the best 2 groups, a shared expert, sequence aux loss, expert-bias updates, MTP 1), fp32.
The vocabulary (129 ids: --vocab-size 128 plus eod) pads to 136 rows with TP1 and 144 with TP2
(--make-vocab-size-divisible-by 8 x TP), so layouts differ in their padding as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from tests.dist_utils import spawn

VOCAB_IDS = 129  # NullTokenizer: --vocab-size 128 ids + eod

MODEL_FLAGS = (
    "--model-preset tiny --num-layers 4 --hidden-size 32 --ffn-hidden-size 48 --num-attention-heads 4 "
    "--q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 "
    "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 16 "
    "--moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-topk-scaling-factor 2.0 "
    "--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-2 --moe-router-load-balancing-type seq_aux_loss "
    "--moe-aux-loss-coeff 0.01 --moe-layer-freq ([0]*1+[1]*3) --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 "
    "--untie-embeddings-and-output-weights --max-position-embeddings 64"
).split()
DENSE_FLAGS = ["--moe-layer-freq", "([0]*4)", "--mtp-num-layers", "0"]
DROP_FLAGS = ["--moe-expert-capacity-factor", "1.0", "--moe-token-dispatcher-type", "alltoall"]
# Adam normalises each element's update, so elements with tiny gradients turn fp32 summation-order
# noise into weight differences proportional to lr; lr 5e-4 keeps that noise a decade below the
# 1e-5 tolerance while 3 steps still move every weight visibly.
TRAIN_FLAGS = (
    "--seq-length 8 --micro-batch-size 1 --global-batch-size 4 --lr 5e-4 --lr-decay-style constant "
    "--weight-decay 0.01 --clip-grad 0.5 --seed 1234 --mock-data --tokenizer-type NullTokenizer --vocab-size 128 "
    "--make-vocab-size-divisible-by 8 --num-workers 0 --eval-iters 0 --log-interval 1"
).split()


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    flags: Tuple[str, ...] = ()
    model: str = "moe"  # "moe" | "dense" | "drop"


@dataclass
class RunResult:
    """What the ranks of one run reported."""

    losses: List[Dict[str, float]] = field(default_factory=list)  # per iteration, from the logging rank
    grad_norms: List[float] = field(default_factory=list)
    builds: List[int] = field(default_factory=list)  # build_model_stage calls per rank
    save_dir: str = ""


def model_flags(kind: str) -> List[str]:
    return MODEL_FLAGS + {"moe": [], "dense": DENSE_FLAGS, "drop": DROP_FLAGS}[kind]


def _rank_main(rank: int, world: int, argv: List[str]) -> Dict[str, object]:
    """One rank: the production entry point, with a counter on the production model builder."""
    torch.set_num_threads(1)
    from megatron.training import model_builder, training

    calls = []
    real = model_builder.build_model_stage

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model_builder.build_model_stage = counting
    try:
        summary = training.pretrain(argv)
    finally:
        model_builder.build_model_stage = real
    return {"builds": len(calls), "losses": summary["losses"], "history": summary["history"]}


def run_layout(layout: Layout, workdir: str, iters: int = 3, extra: Tuple[str, ...] = (), save: bool = True) -> RunResult:
    """`pretrain` on `layout.world` spawned ranks; saves a checkpoint at the end into workdir/layout.name."""
    save_dir = os.path.join(workdir, layout.name)
    argv = model_flags(layout.model) + TRAIN_FLAGS + list(layout.flags) + list(extra) + ["--train-iters", str(iters)]
    if save:
        argv += ["--save", save_dir, "--save-interval", str(iters)]
    reports = spawn(layout.world, _rank_main, argv)
    result = RunResult(save_dir=save_dir, builds=[r["builds"] for r in reports])
    for report in reports:
        if report["history"]:  # the logging rank (last stage, TP rank 0, DP rank 0)
            result.losses = [{k: v for k, v in e.items() if k not in ("iteration", "skipped")} for e in report["losses"]]
            result.grad_norms = [h["grad_norm"] for h in report["history"]]
    return result


def final_weights(save_dir: str) -> Dict[str, torch.Tensor]:
    """Every model tensor of the last checkpoint in `save_dir`, full (unsharded), by our names;
    embedding / output rows cut to the real vocabulary (padding differs between layouts)."""
    from megatron.training.checkpointing import export_full_state_dict

    out = {}
    for name, tensor in export_full_state_dict(save_dir).items():
        if name in ("embedding.weight", "output_layer.weight"):
            tensor = tensor[:VOCAB_IDS]
        out[name] = tensor
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def compare(reference: RunResult, result: RunResult) -> Dict[str, object]:
    """Worst relative differences of per-iteration losses, grad norms and final weights."""
    assert result.losses and len(result.losses) == len(reference.losses), (result.losses, reference.losses)
    worst: Dict[str, object] = {"loss": 0.0, "grad_norm": 0.0, "weights": 0.0, "worst_tensor": None}
    for got, want in zip(result.losses, reference.losses):
        assert got.keys() == want.keys(), (got.keys(), want.keys())
        for key in want:
            worst["loss"] = max(worst["loss"], abs(got[key] - want[key]) / abs(want[key]))
    for got, want in zip(result.grad_norms, reference.grad_norms):
        worst["grad_norm"] = max(worst["grad_norm"], abs(got - want) / abs(want))
    mine, theirs = final_weights(result.save_dir), final_weights(reference.save_dir)
    assert mine.keys() == theirs.keys(), sorted(set(mine) ^ set(theirs))[:5]
    for name, tensor in mine.items():
        err = _relative(tensor, theirs[name])
        if err > worst["weights"]:
            worst["weights"], worst["worst_tensor"] = err, name
    return worst
