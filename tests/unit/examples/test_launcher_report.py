"""What a launcher run shows: the log file starts with the resolved settings and the exact command
and ends with the run's summary; profiling leaves a trace; --verify-checkpoint prints its checks;
per-expert token histograms sum over the data-parallel ranks; only rank 0 speaks. Dry runs: the
model of a checkpoint in HL_LOAD_DIR, the real MTP depth, the presets' own init std, token
distribution levels, and the quickstart's schedule scaled to HL_TRAIN_ITERS."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.unit.examples.launch_utils import REPO, SCRIPT, launch, tiny_env

QUICKSTART = REPO / "scripts" / "quickstart.sh"


# ---- a real launch --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_launcher_run_log_trace_verification_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tmp_path / "results"
    env = tiny_env(results, "torchrun", HL_REDIRECT_LOGS="1", HL_PROFILE_TYPE="pt", HL_PROFILE_STEP_START="2",
                   HL_PROFILE_STEP_END="3", HL_VERIFY_CKPT="1", HL_SAVE_INTERVAL="3",
                   HL_MOE_TOKEN_DISTRIBUTION_LOGGING="1", HL_MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL="1")
    rc, out = launch(env)
    assert rc == 0, out[-4000:]
    logs = list(results.glob("log_*.txt"))
    assert len(logs) == 1
    log = logs[0].read_text()
    lines = log.splitlines()
    # settings, then the exact command, before anything the ranks print
    assert lines[0] == "# pretrain_deepseek.sh resolved settings"
    command = lines[lines.index("# command") + 1]
    assert not any(line.startswith("[default") for line in lines[: lines.index("# command")])
    tokens = shlex.split(command)
    assert tokens[0] == "env" and any(t.endswith("pretrain_gpt.py") for t in tokens)
    assert tokens[tokens.index("--profile-type") + 1] == "pt" and "--verify-checkpoint" in tokens
    # profiling: a trace where the message says
    traces = list((results / "tensorboard" / "traces").glob("*.pt.trace.json"))
    assert traces and traces[0].stat().st_size > 0
    assert f"[rank 0] profiler trace of iterations 2-3 written to {results / 'tensorboard' / 'traces'}" in log
    # verification after the save
    assert re.search(rf"verified checkpoint iteration 3 in {re.escape(str(results / 'checkpoints'))}/iter_0000003 "
                     r"\(training checkpoint, saved by 2 ranks\): .*: OK", log)
    # the end-of-run summary, once
    assert log.count("end of run") == 1 and "stopped: --train-iters 3 reached" in log
    assert f"checkpoints: {results / 'checkpoints'} (last saved: iteration 3; 1 verified)" in log
    # rank 0 only: rank 1 has nothing of its own to say in this run
    assert not [line for line in lines if line.startswith("[default1]:")], log[-3000:]
    assert log.count("> model:") == 1 and log.count("checkpoint.save ") == 1
    # histograms: per iteration, every token of the global batch (2 DP ranks) routed to top-2 experts
    events = EventAccumulator(str(results / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    layers = ("layer1", "layer2", "layer3", "mtp1")
    assert sorted(events.Tags()["histograms"]) == [f"moe/{n}/tokens-per-expert" for n in layers]
    for tag in events.Tags()["histograms"]:
        steps = {e.step: sum(e.histogram_value.bucket) for e in events.Histograms(tag)}
        assert steps == {1: 4 * 32 * 2, 2: 4 * 32 * 2, 3: 4 * 32 * 2}, (tag, steps)


# ---- dry runs ----------------------------------------------------------------------------------------------
def _dry(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "HL_DRY_RUN": "1", "HL_MOCK_DATA": "1",
            "HL_CHECK_PATHS": "0", "HL_PYTHON": sys.executable, "HL_RESULTS_DIR_PREFIX": str(tmp_path / "res"),
            "HL_DP": "8", "HL_TP": "1", "HL_PP": "1", "HL_EP": "8", "HL_NUM_LAYERS": "4"}
    full.update(env)
    full = {k: v for k, v in full.items() if v != "<unset>"}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120)


def _args(proc: subprocess.CompletedProcess) -> List[str]:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return shlex.split(lines[lines.index("# command") + 1])


def _value(tokens: List[str], flag: str) -> Optional[str]:
    return tokens[tokens.index(flag) + 1] if flag in tokens else None


def _model_line(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith("model: "))


def _checkpoint(root: Path, args: Dict[str, object], iteration: int = 7) -> Path:
    """A save folder as the trainer leaves it, as far as the launcher reads it: tracker + common.json."""
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    common = {"iteration": iteration, "args": args}
    (root / f"iter_{iteration:07d}" / "common.json").write_text(json.dumps(common))
    return root


TINY_ARGS = {"model_preset": "tiny", "model.num_layers": 6, "model.first_k_dense": 2, "model.moe.num_experts": 8,
             "model.moe.topk": 2, "model.mla.num_heads": 8, "model.mtp.num_layers": 1, "model.hidden_size": 256,
             "model.moe.score_function": "sigmoid", "model.moe.num_groups": 2, "model.moe.group_topk": 1}


def test_checkpoint_in_load_dir_gives_the_model(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", TINY_ARGS)
    proc = _dry(tmp_path, HL_LOAD_DIR=str(ckpt), HL_NUM_LAYERS="<unset>")
    tokens = _args(proc)
    assert _model_line(proc) == (f"model: from the checkpoint in {ckpt}/iter_0000007 (iteration 7, --use-checkpoint-args) "
                                 "preset=tiny layers=6 dense_first=2 experts=8 topk=2 heads=8 hidden=256 mtp=1")
    assert "--use-checkpoint-args" in tokens and _value(tokens, "--load") == str(ckpt)
    assert _value(tokens, "--model-preset") == "tiny" and _value(tokens, "--num-layers") == "6"
    assert _value(tokens, "--hidden-size") == "256" and _value(tokens, "--moe-layer-freq") == "([0]*2+[1]*4)"
    assert _value(tokens, "--moe-router-num-groups") == "2" and _value(tokens, "--moe-router-group-topk") == "1"
    for flag in ("--max-position-embeddings", "--init-method-std", "--rotary-base", "--q-lora-rank", "--mtp-num-layers"):
        assert flag not in tokens, flag
    assert "/out/tiny/" in proc.stdout and "_nl6_" in proc.stdout
    # a model variable that contradicts the checkpoint is an error naming it
    bad = _dry(tmp_path, HL_LOAD_DIR=str(ckpt), HL_NUM_LAYERS="4")
    assert bad.returncode != 0 and "HL_NUM_LAYERS=4, but the checkpoint in HL_LOAD_DIR" in bad.stderr


@pytest.mark.parametrize("shape, folder, preset", [
    ({"model.moe.num_experts": 256, "model.moe.topk": 8, "model.mla.num_heads": 128}, "deepseek_v3", "deepseek-v3"),
    ({"model.moe.num_experts": 16, "model.moe.topk": 4, "model.mla.num_heads": 8}, "checkpoint_model", "deepseek-v3"),
    ({"model.moe.num_experts": 16, "model.moe.topk": 4, "model.mla.num_heads": 8, "model.moe.score_function": "softmax",
      "model.moe.num_groups": 1}, "checkpoint_model", "deepseek-v2"),
])
def test_checkpoint_without_a_preset_is_named_by_its_family(tmp_path, shape, folder, preset):
    args = {**{k: v for k, v in TINY_ARGS.items() if k != "model_preset"}, **shape}
    ckpt = _checkpoint(tmp_path / "ckpt", args)
    proc = _dry(tmp_path, HL_LOAD_DIR=str(ckpt), HL_NUM_LAYERS="<unset>", HL_TP="1", HL_DP="8", HL_EP="8")
    tokens = _args(proc)
    assert f"/out/{folder}/" in proc.stdout and _value(tokens, "--model-preset") == preset
    assert _value(tokens, "--num-experts") == str(shape["model.moe.num_experts"])


def test_use_checkpoint_args_only_with_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    tokens = _args(_dry(tmp_path, HL_LOAD_DIR=str(empty)))
    assert "--use-checkpoint-args" not in tokens and _value(tokens, "--load") == str(empty)
    tokens = _args(_dry(tmp_path))  # a new results folder: --load is its own checkpoints folder
    assert "--use-checkpoint-args" not in tokens and _value(tokens, "--load") == _value(tokens, "--save")
    tokens = _args(_dry(tmp_path, HL_SAVE="0"))  # nothing saved, nothing to load
    assert "--load" not in tokens


@pytest.mark.parametrize("env, mtp", [({}, "0"), ({"HL_MODEL": "tiny"}, "1"), ({"HL_MODEL": "v2-lite"}, "0"),
                                      ({"HL_MODEL": "v3-671b", "HL_PP": "1"}, "1"), ({"HL_MTP_NUM_LAYERS": "2"}, "2")])
def test_settings_show_the_mtp_depth_used(tmp_path, env, mtp):
    proc = _dry(tmp_path, **env)
    tokens = _args(proc)
    assert _model_line(proc).endswith(f" mtp={mtp}")
    if "HL_MTP_NUM_LAYERS" not in env:
        assert "--mtp-num-layers" not in tokens  # the value shown is the preset's (or none)


def test_presets_keep_their_own_init_std(tmp_path):
    assert _value(_args(_dry(tmp_path)), "--init-method-std") == "6e-3"  # the V3 values, no preset
    assert "--init-method-std" not in _args(_dry(tmp_path, HL_MODEL="tiny"))
    assert _value(_args(_dry(tmp_path, HL_MODEL="tiny", HL_INIT_STD="0.01")), "--init-method-std") == "0.01"
    from megatron.training.arguments import parse_args

    tokens = _args(_dry(tmp_path, HL_MODEL="tiny", HL_DEVICE="cpu", HL_TOKENIZER_TYPE="NullTokenizer",
                        HL_VOCAB_SIZE="100", HL_SEQ_LEN="64", HL_GBS="8"))
    run = parse_args(tokens[tokens.index(next(t for t in tokens if t.endswith("pretrain_gpt.py"))) + 1:],
                     world_size=8, check_paths=False)
    assert run.model.init_method_std == 0.02  # the tiny preset's


@pytest.mark.parametrize("level, flags", [("1", ["--moe-token-distribution-logging"]),
                                          ("2", ["--moe-token-distribution-logging",
                                                 "--moe-token-distribution-logging-to-console"])])
def test_token_distribution_levels(tmp_path, level, flags):
    tokens = _args(_dry(tmp_path, HL_MOE_TOKEN_DISTRIBUTION_LOGGING=level))
    assert [t for t in tokens if t.startswith("--moe-token-distribution-logging") and "interval" not in t] == flags
    bad = _dry(tmp_path, HL_MOE_TOKEN_DISTRIBUTION_LOGGING="3")
    assert bad.returncode != 0 and "HL_MOE_TOKEN_DISTRIBUTION_LOGGING" in bad.stderr


# ---- quickstart schedule --------------------------------------------------------------------------------------
def _quickstart(tmp_path: Path, **env: str) -> Dict[str, int]:
    venv = os.path.relpath(Path(sys.executable).parents[1], REPO)
    full = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
            "VENV": venv, "QUICKSTART_DRY_RUN": "1", "QUICKSTART_OUT": str(tmp_path / "qs"), **env}
    proc = subprocess.run(["bash", str(QUICKSTART)], env=full, capture_output=True, text=True, timeout=300)
    tokens = _args(proc)
    assert "dry run: skipped" in proc.stdout and not (tmp_path / "qs" / "corpus.jsonl").exists()
    flags = ("--train-iters", "--lr-decay-iters", "--lr-warmup-iters", "--log-interval", "--eval-interval",
             "--save-interval")
    return {f: int(_value(tokens, f)) for f in flags}


@pytest.mark.parametrize("iters", ["5", None])
def test_quickstart_schedule_follows_the_run_length(tmp_path, iters):
    s = _quickstart(tmp_path, **({"HL_TRAIN_ITERS": iters} if iters else {}))
    n = int(iters or 300)
    assert s["--train-iters"] == n and s["--lr-decay-iters"] == n  # the learning rate decays over the whole run
    assert s["--lr-warmup-iters"] == n // 15 < n
    for flag in ("--log-interval", "--eval-interval", "--save-interval"):
        assert 1 <= s[flag] <= n, (flag, s)  # something is logged, validated and saved
    assert n // s["--eval-interval"] >= 3 and n // s["--save-interval"] >= 2
    if iters is None:  # the default run is the documented one
        assert s == {"--train-iters": 300, "--lr-decay-iters": 300, "--lr-warmup-iters": 20, "--log-interval": 10,
                     "--eval-interval": 100, "--save-interval": 150}


def test_quickstart_explicit_values_win(tmp_path):
    s = _quickstart(tmp_path, HL_TRAIN_ITERS="5", HL_LR_DECAY_ITER="40", HL_SAVE_INTERVAL="5")
    assert s["--lr-decay-iters"] == 40 and s["--save-interval"] == 5 and s["--lr-warmup-iters"] == 0
