"""Resharding through the real entry point (torchrun pretrain_gpt.py, 2 CPU ranks, gloo).

A straight 6-iteration run with TP2 + sequence parallelism + the distributed optimizer saves at
iterations 3 and 6. Its iteration-3 checkpoint is loaded by
  - 2 ranks with PP2 and an uneven first stage (1 + 2 layers) and the distributed optimizer,
  - 2 ranks with DP2 x EP2 and the distributed optimizer (optimizer state resharded over DP),
  - 1 process,
each of which runs iterations 4..6: their losses must continue the straight run's within 1e-5
(relative), and the final weights they save (in their own layouts) must equal the straight run's
within 1e-5 (relative norm per tensor). The vocabulary (127 ids + eod) pads to 128 rows at TP1
and 256 at TP2, so the checkpoints also cross different padding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[3]
FLAGS = ("--model-preset tiny --hidden-size 64 --ffn-hidden-size 128 --num-layers 3 --moe-ffn-hidden-size 32 "
         "--num-attention-heads 4 --seq-length 16 --micro-batch-size 2 --global-batch-size 8 "
         "--tokenizer-type NullTokenizer --vocab-size 127 --device cpu --log-interval 1 --num-workers 0 --seed 3 "
         "--mock-data --lr 1e-2 --lr-warmup-iters 1 --lr-decay-style cosine --min-lr 1e-4 --eval-interval 1000 "
         "--eval-iters 0 --train-iters 6 --save-interval 3").split()
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


def _close(got: Dict[int, tuple], want: Dict[int, tuple], what: str) -> None:
    assert sorted(got) == [4, 5, 6], (what, got)
    for it in got:
        for g, w in zip(got[it], want[it]):
            assert abs(g - w) <= 1e-5 * abs(w), (what, it, got[it], want[it])


@pytest.mark.slow
def test_tp2_checkpoint_loads_into_pp2_dp2_ep2_and_one_process(tmp_path):
    from megatron.training.checkpoint_export import export_full_state_dict
    from megatron.training.checkpoint_verify import verify_checkpoint

    straight = _run(2, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
                    "--save", str(tmp_path / "tp2"))
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and len({v[0] for v in straight.values()}) == 6
    start = str(tmp_path / "tp2" / "iter_0000003")
    assert verify_checkpoint(start)["world_size"] == 2
    runs = {
        "pp2_uneven": (2, "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                       "--use-distributed-optimizer"),
        "dp2_ep2": (2, "--expert-model-parallel-size", "2", "--use-distributed-optimizer"),
        "one_process": (1,),
    }
    final = export_full_state_dict(str(tmp_path / "tp2"))
    for name, (ranks, *flags) in runs.items():
        resumed = _run(ranks, *flags, "--load", start, "--save", str(tmp_path / name))
        _close(resumed, straight, name)
        assert verify_checkpoint(str(tmp_path / name))["iteration"] == 6
        weights = export_full_state_dict(str(tmp_path / name))
        assert weights.keys() == final.keys() and weights["embedding.weight"].shape[0] == 128
        for key, want in final.items():
            got = weights[key]
            rel = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
            assert rel < 1e-5, (name, key, rel)
