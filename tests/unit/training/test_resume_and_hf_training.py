"""Acceptance tests of whole training runs (single process, CPU, fp32):

1. resume exactness: 6 iterations straight == 3 iterations, save, load, 3 more (losses and final
   weights bitwise), with and without the distributed optimizer, on mock and on indexed data;
2. the kill switch and SIGTERM (--exit-signal-handler) save a verified checkpoint and exit 0;
3. an HF checkpoint converted by `tools/convert_hf_checkpoint.py import` trains under pretrain
   (--load DIR --finetune --use-checkpoint-args);
4. 20 steps of pretrain on that converted model match a plain transformers + torch.optim.AdamW loop.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.training.checkpointing import export_full_state_dict, verify_checkpoint
from megatron.training.training import gpt_forward_step, pretrain

REPO = Path(__file__).resolve().parents[3]

TINY = ["--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
        "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--device", "cpu", "--log-interval", "1",
        "--num-workers", "0", "--seed", "3"]


def _argv(data, *extra):
    return [*TINY, *data, "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "1e-4",
            "--eval-interval", "1000", "--eval-iters", "0", "--save-interval", "1000", *extra]


def _lm_losses(summary):
    return [(e["iteration"], e["lm loss"]) for e in summary["losses"]]


def _indexed_data(tmp_path: Path) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix, dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document([rng.integers(0, 127, size=int(rng.integers(5, 40))).tolist() + [127]])
    builder.finalize()
    return ["--data-path", prefix, "--split", "100,0,0"]


# Both optimizers and both data paths, in two runs (each case is 3 pretrain calls: keep it cheap).
@pytest.mark.parametrize("data,dist_opt", [("mock", False), ("indexed", True)])
def test_resume_is_bitwise_exact(tmp_path, data, dist_opt):
    data_flags = ["--mock-data"] if data == "mock" else _indexed_data(tmp_path)
    extra = ["--use-distributed-optimizer"] if dist_opt else []
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    full = pretrain(_argv(data_flags, "--train-iters", "6", "--save", straight, *extra))
    first = pretrain(_argv(data_flags, "--train-iters", "6", "--exit-interval", "3", "--save", split, *extra))
    assert first["iteration"] == 3 and verify_checkpoint(split)["iteration"] == 3
    second = pretrain(_argv(data_flags, "--train-iters", "6", "--save", split, "--load", split, *extra))
    assert second["iteration"] == 6 and second["consumed"]["train"] == 24
    assert [i for i, _ in _lm_losses(second)] == [4, 5, 6]
    assert _lm_losses(first) + _lm_losses(second) == _lm_losses(full)  # bitwise: float equality
    # The data position matters: iterations 4..6 do not repeat 1..3's samples.
    assert [x for _, x in _lm_losses(full)[3:]] != [x for _, x in _lm_losses(full)[:3]]
    a, b = export_full_state_dict(straight), export_full_state_dict(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_switch_saves_and_exits(tmp_path):
    """The switch file appears during iteration 2: the run saves iteration 2 and returns normally."""
    switch, save = tmp_path / "stop", str(tmp_path / "ckpt")
    calls = [0]

    def forward_step(it, model):
        calls[0] += 1
        if calls[0] == 3:  # first micro-batch of iteration 2 (2 micro-batches per iteration)
            switch.write_text("")
        return gpt_forward_step(it, model)

    out = pretrain(_argv(["--mock-data"], "--train-iters", "6", "--kill-switch-file", str(switch), "--save", save),
                   forward_step_func=forward_step)
    assert out["iteration"] == 2 and "kill switch" in out["exit_reason"]
    assert verify_checkpoint(save)["iteration"] == 2


def test_sigterm_saves_and_exits_zero(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, str(REPO / "pretrain_gpt.py"),
           *_argv(["--mock-data"], "--train-iters", "100000", "--exit-signal-handler", "--save", save)]
    # initialize_distributed of earlier in-process runs left MASTER_PORT in os.environ (its store may
    # still listen): the child must pick its own port.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " iteration " in line and "lm loss" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + (rest or "")
    assert proc.returncode == 0, text[-3000:]
    assert "exiting at iteration" in text, text[-3000:]
    summary = verify_checkpoint(save)
    assert 1 <= summary["iteration"] < 100000 and summary["optimizer_tensors"] > 0


# ---- HF-converted checkpoints -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_import(tmp_path_factory):
    """A tiny random HF DeepseekV3 model, save_pretrained, and `convert_hf_checkpoint.py import`."""
    from tests.unit.core.models.hf_tiny import build_hf

    root = tmp_path_factory.mktemp("hf")
    hf = build_hf("v3", seed=0, attn="eager")
    hf.save_pretrained(str(root / "hf"))
    subprocess.run([sys.executable, str(REPO / "tools/convert_hf_checkpoint.py"), "import", "--hf-path",
                    str(root / "hf"), "--output", str(root / "ours")], check=True, cwd=REPO, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return root


# HF vocab 96 = NullTokenizer's 95 ids + eod, padded to a multiple of 32 (no extra rows).
HF_RUN = ["--model-preset", "tiny", "--use-checkpoint-args", "--finetune", "--tokenizer-type", "NullTokenizer",
          "--vocab-size", "95", "--make-vocab-size-divisible-by", "32", "--seq-length", "16", "--device", "cpu",
          "--log-interval", "1", "--num-workers", "0", "--seed", "5", "--eval-interval", "1000", "--eval-iters", "0",
          "--mock-data"]


def test_hf_converted_checkpoint_trains(hf_import, capsys):
    out = pretrain([*HF_RUN, "--load", str(hf_import / "ours"), "--micro-batch-size", "4", "--global-batch-size", "4",
                    "--train-iters", "8", "--lr", "1e-2", "--lr-decay-style", "constant", "--weight-decay", "0.0"],
                   forward_step_func=_fixed_batches(_batches(1, 4, 96, seed=11)))
    text = capsys.readouterr().out
    assert "from the checkpoint" in text  # the model came from the converted config
    losses = [x for _, x in _lm_losses(out)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses  # one fixed batch: memorised quickly
    assert all(b < a for a, b in zip(losses[:4], losses[1:5])), losses


def _batches(n, batch, vocab, seed, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]


def _fixed_batches(batches):
    """A forward step that ignores the data iterator and feeds `batches` in turn (cycling).

    The micro-batch is the whole global batch (micro = global batch size), so one call per step."""
    step = [0]

    def forward_step(data_iterator, model):
        next(data_iterator)  # keep the loader in step; its samples are not used
        tokens = batches[step[0] % len(batches)]
        step[0] += 1
        fixed = iter([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:].contiguous(),
                       "loss_mask": torch.ones(tokens.shape[0], tokens.shape[1] - 1)}])
        return gpt_forward_step(fixed, model)

    return forward_step


def test_pretrain_matches_transformers_adamw(hf_import):
    """20 fp32 steps of pretrain vs transformers DeepseekV3ForCausalLM + torch.optim.AdamW, same batches.

    Made comparable: HF's DeepseekV3 has no load-balancing loss and never updates its
    e_score_correction_bias, so our side runs --moe-router-load-balancing-type none and
    --moe-router-bias-update-rate 0 (the converted expert bias is kept and used for routing on
    both sides); the converted checkpoint has no MTP layers (num_nextn_predict_layers=0), so
    --use-checkpoint-args gives 0 MTP layers. Constant lr, no warmup, clipping off (--clip-grad 0).
    Weight decay: our optimizer (Megatron's rule) exempts biases and every 1-D parameter (norm
    weights); torch AdamW would decay everything, so it gets two param groups built the same way:
    ndim >= 2 decayed, 1-D (RMSNorm weights; the model has no linear biases) with weight_decay 0.
    Losses: both are the mean token cross entropy of labels[t] = tokens[t+1]."""
    from transformers import DeepseekV3ForCausalLM

    steps, lr, wd, betas, eps = 20, 3e-3, 0.1, (0.9, 0.95), 1e-8
    batches = _batches(steps, 2, 96, seed=21)
    out = pretrain([*HF_RUN, "--load", str(hf_import / "ours"), "--micro-batch-size", "2", "--global-batch-size", "2",
                    "--train-iters", str(steps), "--lr", str(lr), "--lr-decay-style", "constant",
                    "--weight-decay", str(wd), "--adam-beta1", str(betas[0]), "--adam-beta2", str(betas[1]),
                    "--adam-eps", str(eps), "--clip-grad", "0", "--moe-router-load-balancing-type", "none",
                    "--moe-aux-loss-coeff", "0", "--moe-router-bias-update-rate", "0"],
                   forward_step_func=_fixed_batches(batches))
    ours = [x for _, x in _lm_losses(out)]

    hf = DeepseekV3ForCausalLM.from_pretrained(str(hf_import / "hf"), torch_dtype=torch.float32,
                                               attn_implementation="eager").train()
    decay = [p for p in hf.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps, foreach=False)
    ref = []
    for tokens in batches:
        logits = hf(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())

    assert len(ours) == steps
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    print("pretrain vs transformers+AdamW losses:", [(round(a, 6), round(b, 6), f"{r:.1e}") for a, b, r in zip(ours, ref, rel)])
    assert max(rel) < 1e-4, list(zip(ours, ref, rel))
    assert ref[-1] < ref[0]  # it did train
