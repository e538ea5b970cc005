"""Resharding through the real entry point (torchrun pretrain_gpt.py, 2 CPU ranks, gloo).

A straight 6-iteration run with TP2 + sequence parallelism + the distributed optimizer saves at
iterations 3 and 6. Its iteration-3 checkpoint is loaded by 2 ranks with PP2 and an uneven first
stage (1 + 2 layers), and by 2 ranks with DP2 x EP2 (optimizer state resharded over DP), both
with the distributed optimizer, which run iterations 4..5 and save; those checkpoints are loaded
back the other way, by one process (from PP2) and by TP2 + SP (from DP2 x EP2), for iteration 6. Every resumed run's losses must continue the straight run's within 1e-5
(relative), and the weights it saves (in its own layout) must equal the straight run's at the
same iteration within 1e-5 (relative norm per tensor). The vocabulary (127 ids + eod) pads to 128
rows at TP1 and 256 at TP2, so the checkpoints also cross different padding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import torch  # noqa: F401  (annotations)

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[3]
FLAGS = ("--model-preset tiny --hidden-size 64 --ffn-hidden-size 128 --num-layers 3 --moe-ffn-hidden-size 32 "
         "--num-attention-heads 4 --seq-length 16 --micro-batch-size 2 --global-batch-size 8 "
         "--tokenizer-type NullTokenizer --vocab-size 127 --device cpu --log-interval 1 --num-workers 0 --seed 3 "
         "--mock-data --lr 1e-2 --lr-warmup-iters 1 --lr-decay-style cosine --min-lr 1e-4 --eval-interval 1000 "
         "--eval-iters 0 --save-interval 3").split()
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|.*?mtp_1 loss: (\S+) \|")


def _run(ranks: int, *extra: str) -> Dict[int, tuple]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if ranks == 1:
        cmd = [sys.executable, "pretrain_gpt.py", *FLAGS, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "pretrain_gpt.py", *FLAGS, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = {int(i): (float(lm), float(mtp)) for i, lm, mtp in LOSS.findall(out)}
    assert losses, out[-3000:]
    return losses


def _close(got: Dict[int, tuple], want: Dict[int, tuple], iterations: list, what: str) -> None:
    assert sorted(got) == iterations, (what, got)
    for it in got:
        for g, w in zip(got[it], want[it]):
            assert abs(g - w) <= 1e-5 * abs(w), (what, it, got[it], want[it])


def _same_weights(directory: str, want: Dict[str, "torch.Tensor"], what: str) -> None:
    from megatron.training.checkpoint_export import export_full_state_dict

    weights = export_full_state_dict(directory)
    assert weights.keys() == want.keys() and weights["embedding.weight"].shape[0] == 128
    for key, value in want.items():
        rel = ((weights[key].double() - value.double()).norm() / value.double().norm().clamp(min=1e-30)).item()
        assert rel < 1e-5, (what, key, rel)


@pytest.mark.slow
def test_checkpoints_continue_the_straight_run_across_layouts(tmp_path):
    from megatron.training.checkpoint_export import export_full_state_dict
    from megatron.training.checkpoint_verify import verify_checkpoint

    tp2 = ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer")
    straight = _run(2, *tp2, "--train-iters", "6", "--save", str(tmp_path / "straight"))
    assert sorted(straight) == list(range(1, 7)) and len({v[0] for v in straight.values()}) == 6
    final = export_full_state_dict(str(tmp_path / "straight"))
    start = str(tmp_path / "straight" / "iter_0000003")
    assert verify_checkpoint(start)["world_size"] == 2
    # (name, ranks, flags, load from, iterations run)
    runs = [
        ("pp2_uneven", 2, ("--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                           "--use-distributed-optimizer"), start, [4, 5]),
        ("dp2_ep2", 2, ("--expert-model-parallel-size", "2", "--use-distributed-optimizer"), start, [4, 5]),
        ("one_process", 1, (), str(tmp_path / "pp2_uneven"), [6]),
        ("tp2_again", 2, tp2, str(tmp_path / "dp2_ep2"), [6]),
    ]
    for name, ranks, flags, source, iterations in runs:
        # The same schedule as the straight run (6 iterations); the first legs stop (and save) at 5.
        stop = ("--exit-interval", "5") if iterations[-1] == 5 else ()
        resumed = _run(ranks, *flags, "--train-iters", "6", *stop, "--load", source, "--save", str(tmp_path / name))
        _close(resumed, straight, iterations, name)
        assert verify_checkpoint(str(tmp_path / name))["iteration"] == iterations[-1]
        if iterations[-1] == 6:
            _same_weights(str(tmp_path / name), final, name)
