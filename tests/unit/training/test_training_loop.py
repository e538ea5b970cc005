"""Single-process training loop on mock data: loss finite and logged, NaN skipping, exits."""

import math
import re

import pytest

from megatron.training.training import gpt_forward_step, pretrain


def argv(*extra: str) -> list:
    return [
        "--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
        "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--device", "cpu", "--log-interval", "1", "--num-workers", "0",
        "--eval-interval", "1000", "--eval-iters", "1", "--seed", "3", *extra,
    ]


LINE = re.compile(
    r"iteration\s+(\d+)/\s+(\d+) \| consumed samples:\s+(\d+) \| elapsed time per iteration \(ms\): [\d.]+ \| "
    r"learning rate: [\d.E+-]+ \| global batch size:\s+4 \| lm loss: (\S+) \| .*loss scale: 1.0 \| grad norm: [\d.]+ \| "
    r"number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+) \| tokens/s: [\d.]+ \| "
    r"TFLOP/s/device: [\d.]+ \| MFU: [\d.]+% \|"
)


def test_loop_logs_megatron_lines(capsys):
    out = pretrain(argv("--train-iters", "6"))
    lines = [m for m in map(LINE.search, capsys.readouterr().out.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(int(m.group(2)) == 6 for m in lines)
    assert [int(m.group(3)) for m in lines] == [4, 8, 12, 16, 20, 24]
    losses = [float(m.group(4)) for m in lines]
    assert all(math.isfinite(x) and 3.0 < x < 7.0 for x in losses)  # ~ln(128) at init
    assert out["iteration"] == 6 and out["exit_reason"] == "train iters" and out["skipped"] == 0
    assert out["consumed"]["train"] == 24


def _nan_on_calls(calls):
    """A forward step whose loss is NaN on the given (1-based) micro-batch calls."""
    count = [0]

    def forward_step(it, model):
        count[0] += 1
        poison = count[0] in calls
        out, loss_func = gpt_forward_step(it, model)

        def wrapped(o):
            loss, rep = loss_func(o)
            if poison:
                loss = loss * float("nan")
                rep = {**rep, "lm loss": rep["lm loss"] * float("nan")}
            return loss, rep

        return out, wrapped

    return forward_step


def test_nan_iteration_is_skipped_and_counted(capsys):
    # 2 micro-batches per iteration: calls 5 and 6 are iteration 3.
    out = pretrain(argv("--train-iters", "4", "--skip-nan-loss"), forward_step_func=_nan_on_calls({5, 6}))
    assert out["iteration"] == 4 and out["skipped"] == 1 and out["nan"] == 1
    text = capsys.readouterr().out
    counts = re.findall(r"number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+)", text)
    assert [(int(a), int(b)) for a, b in counts] == [(0, 0), (0, 0), (1, 1), (0, 0)]
    lines = [m for m in map(LINE.search, text.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 4]  # the skipped window has no losses to print
    assert math.isfinite(float(lines[-1].group(4)))


def test_nan_without_skip_raises():
    with pytest.raises(RuntimeError, match="skip-nan-loss"):
        pretrain(argv("--train-iters", "3"), forward_step_func=_nan_on_calls({3}))


def test_exit_interval():
    out = pretrain(argv("--train-iters", "6", "--exit-interval", "2"))
    assert out["iteration"] == 2 and out["exit_reason"].startswith("exit interval")


def test_kill_switch(tmp_path):
    switch = tmp_path / "stop"
    switch.write_text("")
    out = pretrain(argv("--train-iters", "6", "--kill-switch-file", str(switch)))
    assert out["iteration"] == 1 and "kill switch" in out["exit_reason"]


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(argv("--train-iters", "2", "--tensorboard-dir", str(tmp_path), "--eval-interval", "2",
                  "--log-validation-ppl-to-tensorboard", "--log-timers-to-tensorboard"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec", "lm loss validation",
                "lm loss validation ppl", "mtp_1 loss", "moe/layer1/load-cv", "moe/layer1/expert-bias-absmax"):
        assert tag in tags, (tag, sorted(tags))
