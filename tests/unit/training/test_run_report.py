"""What a training run tells its user: start-up report, console and TensorBoard in the same units,
per-expert token histograms, checkpoint verification after each save, exit reasons and the
end-of-run summary. One single-process run (module fixture) is read by most tests; a pipeline-
parallel run on two spawned ranks checks that every stage's MoE layers reach TensorBoard."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest

from megatron.training.run_summary import exit_reason, human, print_rank_0
from megatron.training.training import pretrain
from tests.dist_utils import spawn
from tests.unit.parallel.layout_harness import MODEL_FLAGS, TRAIN_FLAGS

ITERS, GBS, SEQ, TOPK = 4, 4, 8, 2  # TRAIN_FLAGS: global batch 4, sequence 8; MODEL_FLAGS: top-2
MOE_LAYERS = ("layer1", "layer2", "layer3", "mtp1")  # 1 dense + 3 MoE decoder layers, MTP depth 1 (MoE)


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    argv = MODEL_FLAGS + TRAIN_FLAGS + [
        "--train-iters", str(ITERS), "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--tensorboard-dir", str(root / "tb"), "--log-timers-to-tensorboard", "--timing-log-level", "1",
        "--moe-token-distribution-logging", "--moe-token-distribution-logging-interval", "2",
        "--moe-token-distribution-logging-to-console",
        "--save", str(root / "ckpt"), "--save-interval", "2", "--verify-checkpoint",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = pretrain(argv)
    return SimpleNamespace(root=root, text=out.getvalue(), summary=summary, events=_events(root / "tb"), argv=argv)


def _console_lines(text: str) -> Dict[int, Dict[str, str]]:
    rows = {}
    for m in re.finditer(r" iteration\s+(\d+)/\s*\d+ \|(.*)", text):
        rows[int(m.group(1))] = dict(p.strip().split(": ", 1) for p in m.group(2).split("|") if ": " in p)
    return rows


def _scalars(events, tag: str) -> Dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


# ---- units ------------------------------------------------------------------------------------------
def test_console_and_tensorboard_agree_on_units(run):
    console = _console_lines(run.text)
    assert sorted(console) == [2, 4]
    pairs = [("elapsed time per iteration (ms)", "iteration-time-ms", 0.05),
             ("tokens/s", "throughput/tokens-per-sec", 0.05),
             ("TFLOP/s/device", "throughput/tflops-per-device", 0.0005),
             ("MFU", "throughput/mfu-percent", 0.005)]
    for field, tag, rounding in pairs:
        board = _scalars(run.events, tag)
        for it, row in console.items():
            printed = float(row[field].rstrip("%"))
            assert abs(board[it] - printed) <= rounding + 1e-6 * abs(printed), (tag, it, board[it], printed)
    assert "throughput/mfu" not in run.events.Tags()["scalars"] and "iteration-time" not in run.events.Tags()["scalars"]
    # timers: "(ms per iteration) name: value | ..." on the console, timers/<name> in ms on TensorBoard
    timer_lines = re.findall(r"\(ms per iteration\) (.*)", run.text)
    assert len(timer_lines) == 2
    printed = dict(p.split(": ") for p in timer_lines[-1].split(" | "))
    assert {"forward", "backward", "optimizer", "train-step"} <= set(printed)
    for name, value in printed.items():
        assert abs(_scalars(run.events, f"timers/{name}")[ITERS] - float(value)) <= 0.05 + 1e-6 * float(value), name
    # the train step takes more than a microsecond and less than a minute: milliseconds, not seconds
    assert 1e-3 < _scalars(run.events, "timers/train-step")[ITERS] < 6e4


# ---- MoE routing statistics ---------------------------------------------------------------------------
def _histogram_counts(events, tag: str) -> Dict[int, List[float]]:
    return {e.step: list(e.histogram_value.bucket) for e in events.Histograms(tag)}


def test_token_distribution_histograms_hold_every_routed_token(run):
    tags = run.events.Tags()
    assert sorted(tags["histograms"]) == sorted(f"moe/{n}/tokens-per-expert" for n in MOE_LAYERS)
    window = 2 * GBS * SEQ * TOPK  # two iterations per window, every token routed to top-k experts
    console = re.findall(r"moe tokens per expert \| (\w+) \| iterations (\d+)-(\d+) \| ([\d ]+)", run.text)
    assert [(n, int(a), int(b)) for n, a, b, _ in console] == [(n, s, s + 1) for s in (1, 3) for n in MOE_LAYERS]
    printed = {(n, int(b)): [float(c) for c in counts.split()] for n, _, b, counts in console}
    for name in MOE_LAYERS:
        hist = _histogram_counts(run.events, f"moe/{name}/tokens-per-expert")
        assert sorted(hist) == [2, 4]
        for step, counts in hist.items():
            assert len(counts) == 8 and sum(counts) == window, (name, step, counts)
            assert counts == printed[(name, step)]
            # the log window is the distribution window here: the load scalars are its min / max
            assert _scalars(run.events, f"moe/{name}/load-min")[step] == min(counts)
            assert _scalars(run.events, f"moe/{name}/load-max")[step] == max(counts)
            assert _scalars(run.events, f"moe/{name}/dropped-fraction")[step] == 0.0  # dropless
        assert f"moe/{name}/expert-bias-absmax" in tags["scalars"]
    assert not [t for t in tags["scalars"] if t.startswith("moe/layer4")]  # the MTP layer is mtp1


# ---- checkpoints ------------------------------------------------------------------------------------
def test_verify_checkpoint_prints_what_it_checked(run):
    lines = re.findall(r"verified checkpoint iteration (\d+) in (\S+) \((.*)\): (.*): OK", run.text)
    assert [int(it) for it, *_ in lines] == [2, 4]
    for it, path, kind, checks in lines:
        assert Path(path) == run.root / "ckpt" / f"iter_{int(it):07d}" and kind.startswith("training checkpoint")
        assert re.search(r"\d+ model and \d+ optimizer tensors tiled exactly", checks)
        assert "sha256" in checks and "checksums" in checks


def test_verification_failure_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from megatron.training import checkpointing
    from megatron.training.checkpoint_io import CheckpointError

    real_save = checkpointing.save_checkpoint
    damaged = []

    def save_then_damage(save_dir, iteration, *args, **kwargs):
        out = real_save(save_dir, iteration, *args, **kwargs)
        data = sorted((Path(save_dir) / f"iter_{iteration:07d}").glob("*.bin"))[0]
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        damaged.append(data)
        return out

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_damage)
    with pytest.raises(CheckpointError) as err:
        pretrain(MODEL_FLAGS + TRAIN_FLAGS + ["--train-iters", "1", "--save", str(tmp_path), "--save-interval", "1",
                                              "--verify-checkpoint"])
    assert damaged and str(damaged[0]) in str(err.value)


# ---- start-up report and end-of-run summary --------------------------------------------------------------
def test_startup_report_gives_model_size_and_this_ranks_share(run):
    from megatron.training.arguments import parse_args
    from megatron.training.planning.params import model_counts

    config = parse_args(run.argv, world_size=1).with_tokenizer_vocab(129).model  # NullTokenizer: 128 ids + eod
    counts = model_counts(config)
    assert f"> model: {human(counts.total)} parameters ({counts.total:,};" in run.text
    assert f"activated per token {human(counts.activated_per_token)} ({counts.activated_per_token:,};" in run.text
    share = re.search(r"> parameters on rank 0: \S+ \(([\d,]+), ([\d.]+)% of the model\)", run.text)
    assert share and int(share.group(1).replace(",", "")) == counts.total and share.group(2) == "100.0"
    assert "> layout: 1 rank = DP 1 x TP 1 x PP 1; EP 1 (8 of 8 experts per rank)" in run.text
    assert run.text.count("> model:") == 1


def test_end_summary(run):
    block = run.text[run.text.index("end of run"):]
    validations = [float(v) for v in re.findall(r"validation[^|]* loss at iteration \d+ \| lm loss value: (\S+)", run.text)]
    assert len(validations) == 2
    assert "stopped: --train-iters 4 reached" in block
    assert f"iterations: 4 (4 in this run, from iteration 0); tokens: {ITERS * GBS * SEQ:,} in this run" in block
    m = re.search(r"mean ([\d.]+) tokens/s, ([\d.]+) TFLOP/s/device, MFU ([\d.]+)%", block)
    assert m and float(m.group(1)) > 0
    best = re.search(r"validation lm loss: best (\S+) at iteration (\d+), final (\S+) at iteration 4", block)
    assert best and float(best.group(1)) == pytest.approx(min(validations), rel=1e-6)
    assert float(best.group(3)) == pytest.approx(validations[-1], rel=1e-6)
    assert f"checkpoints: {run.root / 'ckpt'} (last saved: iteration 4; 2 verified)" in block
    assert f"tensorboard: {run.root / 'tb'}" in block


# ---- exit reasons and rank-0 printing (no process group) ---------------------------------------------------
def _training(**kw):
    base = dict(exit_interval=None, exit_signal_handler=False, kill_switch_file=None, exit_duration_in_mins=None)
    return SimpleNamespace(**{**base, **kw})


def test_exit_reason_says_which(tmp_path):
    import time

    import torch

    cpu = torch.device("cpu")
    now = time.time()
    assert exit_reason(_training(), 3, False, now, cpu) is None
    assert exit_reason(_training(exit_interval=3), 3, False, now, cpu).startswith("exit interval 3")
    switch = tmp_path / "stop"
    assert exit_reason(_training(kill_switch_file=str(switch)), 1, False, now, cpu) is None
    switch.write_text("")
    assert exit_reason(_training(kill_switch_file=str(switch)), 1, False, now, cpu) == \
        f"kill switch file {switch} found (--kill-switch-file)"
    signal_reason = exit_reason(_training(exit_signal_handler=True), 1, True, now, cpu)
    assert signal_reason == "signal SIGTERM received (--exit-signal-handler)"
    assert exit_reason(_training(exit_signal_handler=True), 1, False, now, cpu) is None
    late = exit_reason(_training(exit_duration_in_mins=1.0), 1, False, now - 120, cpu)
    assert late == "run time passed --exit-duration-in-mins 1"


@pytest.mark.parametrize("env, printed", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                          ({"OMPI_COMM_WORLD_RANK": "3"}, False), ({"PMI_RANK": "0"}, True)])
def test_print_rank_0_before_the_process_group(monkeypatch, capsys, env, printed):
    from megatron.core import communication as comm

    monkeypatch.setattr(comm, "initialized", lambda: False)  # before the process group exists
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    print_rank_0("hello")
    assert (capsys.readouterr().out == "hello\n") is printed


# ---- pipeline parallel: every stage's layers reach the logging rank ------------------------------------------
def _pp_rank(rank: int, world: int, argv: List[str]) -> bool:
    import torch

    torch.set_num_threads(1)
    pretrain(argv)
    return True


@pytest.mark.slow
def test_pipeline_stages_all_reach_tensorboard(tmp_path, capfd):
    tb = tmp_path / "tb"
    argv = MODEL_FLAGS + TRAIN_FLAGS + ["--pipeline-model-parallel-size", "2", "--train-iters", "2", "--log-interval", "2",
                                        "--tensorboard-dir", str(tb), "--moe-token-distribution-logging",
                                        "--moe-token-distribution-logging-interval", "1"]
    assert spawn(2, _pp_rank, argv) == [True, True]
    out = capfd.readouterr().out
    assert out.count("> model:") == 1 and out.count("end of run") == 1
    events = _events(tb)
    for name in MOE_LAYERS:  # layer1 lives on stage 0, the others on stage 1 (the logging rank's)
        hist = _histogram_counts(events, f"moe/{name}/tokens-per-expert")
        assert sorted(hist) == [1, 2] and all(sum(c) == GBS * SEQ * TOPK for c in hist.values()), (name, hist)
        both = [a + b for a, b in zip(hist[1], hist[2])]  # the log window (2 iterations) holds both
        assert _scalars(events, f"moe/{name}/load-max")[2] == max(both)
        assert _scalars(events, f"moe/{name}/load-min")[2] == min(both)
        assert f"moe/{name}/expert-bias-absmax" in events.Tags()["scalars"]


# ---- documentation ---------------------------------------------------------------------------------------
def _documented_tag_patterns() -> List["re.Pattern"]:
    readme = (Path(__file__).resolve().parents[3] / "examples" / "deepseek" / "README.md").read_text()
    table = readme[readme.index("### TensorBoard"):].split("\n\n")[2]
    patterns = []
    for row in table.splitlines()[2:]:
        for tag in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            text = re.escape(tag)
            for token, rx in (("<layer>", r"(layer\d+|mtp\d+)"), ("<name>", r"[\w-]+"), ("<d>", r"\d+"),
                              ("<loss>", r"(lm|mtp_\d+) loss")):
                text = text.replace(re.escape(token), rx)
            patterns.append(re.compile(text + r"( ppl)?"))
    return patterns


def test_every_tensorboard_tag_is_documented(run):
    patterns = _documented_tag_patterns()
    tags = run.events.Tags()["scalars"] + run.events.Tags()["histograms"]
    assert len(tags) > 40
    undocumented = [t for t in tags if not any(p.fullmatch(t) for p in patterns)]
    assert not undocumented, undocumented
