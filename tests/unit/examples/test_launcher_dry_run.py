"""examples/deepseek/pretrain_deepseek.sh in dry-run mode: HL_* settings -> the launch command.

Every test runs the script with HL_DRY_RUN=1 in a controlled environment (no inherited HL_*
variables) and checks the printed command's tokens, or that a bad setting fails before launch
with one line naming the variable. Nothing is trained.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.unit.examples.launch_utils import launcher_text

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "deepseek" / "pretrain_deepseek.sh"
QUICKSTART = ROOT / "scripts" / "quickstart.sh"


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.tokens: List[str] = []
        lines = self.out.splitlines()
        if "# command" in lines:
            self.tokens = shlex.split(lines[lines.index("# command") + 1])

    # -- helpers over the command tokens
    def after(self, flag: str, n: int = 1, start: int = 0):
        """The n values following the first occurrence of `flag` (at or after index start)."""
        i = self.tokens.index(flag, start)
        vals = self.tokens[i + 1 : i + 1 + n]
        return vals[0] if n == 1 else vals

    def x_vars(self) -> List[str]:
        return [self.tokens[i + 1] for i, t in enumerate(self.tokens) if t == "-x"]

    @property
    def train_args(self) -> List[str]:
        i = next(i for i, t in enumerate(self.tokens) if t.endswith("pretrain_gpt.py"))
        return self.tokens[i + 1 :]

    def has(self, *tokens: str) -> bool:
        n = len(tokens)
        return any(self.tokens[i : i + n] == list(tokens) for i in range(len(self.tokens) - n + 1))


@pytest.fixture
def launch(tmp_path):
    tok = tmp_path / "tokenizer"
    tok.mkdir()

    def run(env: Optional[Dict[str, str]] = None, script: Path = SCRIPT) -> Result:
        full = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "HL_DRY_RUN": "1",
            "HL_DEVICE": "hpu",
            "HL_MOCK_DATA": "1",
            "HL_NUM_LAYERS": "4",
            "HL_TOKENIZER_MODEL": str(tok),
            "HL_RESULTS_DIR_PREFIX": str(tmp_path / "res"),
        }
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        proc = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=60)
        return Result(proc)

    return run


def ok(r: Result) -> Result:
    assert r.rc == 0, r.err
    assert r.tokens, r.out
    return r


def fails(r: Result, *needles: str) -> str:
    assert r.rc != 0, r.out
    assert r.tokens == []
    lines = [line for line in r.err.splitlines() if "error" in line]
    assert len(lines) == 1, r.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- mpirun


def test_mpirun_defaults_hpu(launch, tmp_path):
    r = ok(launch())
    t = r.tokens
    assert t[:2] == ["mpirun", "--allow-run-as-root"]
    assert r.has("--mca", "plm_rsh_args", "-p22")
    assert r.after("-np") == "8"
    assert r.has("--bind-to", "none") and "--map-by" not in t
    assert "--hostfile" not in t
    xs = r.x_vars()
    assert "PT_HPU_LAZY_MODE=0" in xs and "MASTER_ADDR=localhost" in xs and "MASTER_PORT=12345" in xs
    a = r.train_args
    assert t[t.index(a[0]) - 1].endswith("pretrain_gpt.py")
    assert r.after("--device") == "hpu" and r.after("--distributed-backend") == "hccl"
    assert r.after("--optimizer") == "fusedadamw"
    for flag in ("--use-fused-sdpa", "--use-fused-sdpa-with-recompute", "--use-fast-softmax", "--use-fused-rmsnorm"):
        assert r.after(flag) == "1"
    assert r.after("--use-lazy-mode") == "0"
    # the original script's parallel / model / schedule values
    assert r.after("--tensor-model-parallel-size") == "2" and r.after("--pipeline-model-parallel-size") == "2"
    assert r.after("--expert-model-parallel-size") == "2" and "--sequence-parallel" in t
    assert r.after("--hidden-size") == "7168" and r.after("--num-experts") == "256" and r.after("--moe-router-topk") == "8"
    assert r.after("--moe-layer-freq") == "([0]*3+[1]*1)"
    assert r.after("--moe-token-dispatcher-type") == "allgather" and "--moe-expert-capacity-factor" not in t
    assert "--moe-grouped-gemm" in t and "--bf16" in t and "--model-preset" not in t
    assert r.after("--global-batch-size") == "3072" and r.after("--micro-batch-size") == "1"
    assert r.after("--seq-length") == "4096" and r.after("--train-iters") == "500000"
    assert r.after("--lr-decay-iters") == "320000" and r.after("--lr") == "2.2e-4"
    assert "--use-distributed-optimizer" in t and r.after("--save-distrib-optimizer-method") == "parallel_multi_node"
    assert "--mock-data" in t and "--data-path" not in t
    assert "--mtp-num-layers" not in t  # the original has no MTP


def test_lazy_mode_forwarded(launch):
    r = ok(launch({"HL_USE_LAZY_MODE": "1"}))
    assert "PT_HPU_LAZY_MODE=1" in r.x_vars() and r.after("--use-lazy-mode") == "1"


def test_env_flags_forwarded_with_x(launch):
    r = ok(launch({"HL_ENV_FLAGS": "PT_HPU_RECIPE_CACHE_CONFIG=/tmp/cache,false,1024,FOO=a b"}))
    # commas split NAME=value entries; a piece without NAME= belongs to the previous value
    xs = r.x_vars()
    assert "PT_HPU_RECIPE_CACHE_CONFIG=/tmp/cache,false,1024" in xs and "FOO=a b" in xs


def test_env_flags_rejects_garbage(launch):
    fails(launch({"HL_ENV_FLAGS": "not a var,GOOD=1"}), "HL_ENV_FLAGS")


@pytest.mark.parametrize(
    "env, map_by",
    [({"HL_PE": "4"}, "socket:PE=4"), ({"HL_PE": "4", "HL_PPR": "2"}, "ppr:2:socket:PE=4")],
)
def test_map_by(launch, env, map_by):
    r = ok(launch(env))
    assert r.after("--map-by") == map_by and r.has("--bind-to", "core") and not r.has("--bind-to", "none")


def test_ppr_without_pe(launch):
    fails(launch({"HL_PPR": "2"}), "HL_PPR", "HL_PE")


def test_multinode_hostsfile(launch, tmp_path):
    hf = tmp_path / "my hosts"
    hf.write_text("# cluster\n10.1.2.3 slots=8\n\n10.1.2.4 slots=8\n")
    r = ok(launch({"HL_NUM_NODES": "2", "HL_DP": "4", "HL_HOSTSFILE": str(hf), "HL_SSH_PORT": "3022"}))
    assert r.after("--hostfile") == str(hf) and r.after("-np") == "16"
    assert "MASTER_ADDR=10.1.2.3" in r.x_vars()
    assert r.has("--mca", "plm_rsh_args", "-p3022")


def test_multinode_needs_hostsfile(launch, tmp_path):
    env = {"HL_NUM_NODES": "2", "HL_DP": "4", "HL_DEFAULT_HOSTSFILE": str(tmp_path / "absent")}
    fails(launch(env), "HL_HOSTSFILE")
    fails(launch({**env, "HL_HOSTSFILE": str(tmp_path / "nope")}), "HL_HOSTSFILE", "not found")


def test_multinode_default_hostsfile_generated(launch, tmp_path):
    etc = tmp_path / "etc_hostfile"
    etc.write_text("nodeA\nnodeB\n")
    res = tmp_path / "results dir"
    r = ok(launch({"HL_NUM_NODES": "2", "HL_DP": "4", "HL_DEFAULT_HOSTSFILE": str(etc), "HL_RESULTS_DIR": str(res)}))
    assert r.after("--hostfile") == str(res / "hostsfile")
    assert "MASTER_ADDR=nodeA" in r.x_vars()
    assert not res.exists()  # a dry run writes nothing


def test_multinode_too_few_hosts(launch, tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("10.0.0.1 slots=8\n")
    fails(launch({"HL_NUM_NODES": "2", "HL_DP": "4", "HL_HOSTSFILE": str(hf)}), "HL_HOSTSFILE", "HL_NUM_NODES")


def test_hnic(launch, tmp_path):
    fails(launch({"HL_HNIC": "1"}), "HL_HNIC")
    hf = tmp_path / "hosts"
    hf.write_text("a slots=8\nb slots=8\n")
    r = ok(launch({"HL_HNIC": "1", "HL_NUM_NODES": "2", "HL_DP": "4", "HL_HOSTSFILE": str(hf)}))
    xs = r.x_vars()
    assert {"HCCL_OVER_OFI=1", "HCCL_GAUDI_DIRECT=1", "FI_PROVIDER=verbs", "LD_LIBRARY_PATH"} <= set(xs)


# ---------------------------------------------------------------- torchrun


def test_torchrun_single_node(launch):
    r = ok(launch({"HL_LAUNCHER_TYPE": "torchrun", "HL_ENV_FLAGS": "A=1"}))
    t = r.tokens
    assert t[0] == "env" and {"A=1", "PT_HPU_LAZY_MODE=0"} <= set(t[: t.index("torchrun")])
    i = t.index("torchrun")
    assert r.after("--nproc_per_node") == "8" and r.after("--nnodes") == "1" and r.after("--node_rank") == "0"
    assert r.after("--master_addr") == "localhost" and r.after("--master_port") == "12345"
    assert "--no-python" in t and "mpirun" not in t and "-x" not in t
    assert t[t.index("--no-python", i) :].count("--master_port") == 1


def test_torchrun_multinode(launch, tmp_path):
    env = {"HL_LAUNCHER_TYPE": "torchrun", "HL_NUM_NODES": "2", "HL_DP": "4"}
    fails(launch(env), "HL_TORCHRUN_MULTINODE")
    # every node runs the script: the results folder must be named, not derived from the start time
    fails(launch({**env, "HL_TORCHRUN_MULTINODE": "1"}), "HL_TORCHRUN_MULTINODE", "HL_RESULTS_DIR")
    env["HL_RESULTS_DIR"] = str(tmp_path / "shared results")
    r = ok(launch({**env, "HL_TORCHRUN_MULTINODE": "1", "HL_TORCHRUN_NODE_RANK": "1",
                   "HL_TORCHRUN_MASTER_ADDR": "10.9.9.9", "HL_MASTER_PORT": "29500"}))
    assert r.after("--nnodes") == "2" and r.after("--node_rank") == "1"
    assert r.after("--master_addr") == "10.9.9.9" and r.after("--master_port") == "29500"
    fails(launch({**env, "HL_TORCHRUN_MULTINODE": "1", "HL_TORCHRUN_NODE_RANK": "2"}), "HL_TORCHRUN_NODE_RANK")


# ---------------------------------------------------------------- devices


def test_cpu_has_no_hpu_flags(launch):
    r = ok(launch({"HL_DEVICE": "cpu", "HL_LAUNCHER_TYPE": "torchrun"}))
    t = r.tokens
    assert r.after("--device") == "cpu" and r.after("--distributed-backend") == "gloo"
    assert not any(x.startswith("--use-fused") or x in ("--use-fast-softmax", "--use-lazy-mode") for x in t)
    assert not any("PT_HPU" in x for x in t) and t[0] != "env"
    assert r.after("--optimizer") == "adam"


def test_cuda_backend_and_mpirun(launch):
    r = ok(launch({"HL_DEVICE": "cuda"}))
    assert r.after("--distributed-backend") == "nccl" and "PT_HPU_LAZY_MODE=0" not in r.x_vars()
    assert "--use-fused-sdpa" not in r.tokens


@pytest.mark.parametrize("tool", [None, "nvidia-smi", "hl-smi"])
def test_auto_device_is_decided_by_the_ranks(launch, tmp_path, tool):
    """Whatever the launching node has (nothing, nvidia-smi, hl-smi), auto stays auto: the ranks
    detect their device at start-up, and the HPU settings travel with the command."""
    fake = tmp_path / "bin"
    fake.mkdir()
    if tool:
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
        (fake / tool).chmod(0o755)
    for env in ({"HL_DEVICE": "auto"}, {"HL_DEVICE": None}):
        r = ok(launch({**env, "PATH": f"{fake}:/usr/bin:/bin"}))
        assert r.after("--device") == "auto" and "--distributed-backend" not in r.tokens
        assert "PT_HPU_LAZY_MODE=0" in r.x_vars() and r.after("--use-lazy-mode") == "0"
        assert r.after("--use-fused-sdpa") == "1" and r.after("--use-fused-rmsnorm") == "1"
        assert r.after("--optimizer") == "fusedadamw"  # the original's default (AdamW off HPU too)


def test_lazy_mode_means_hpu(launch):
    """HL_USE_LAZY_MODE=1 (Intel's README examples) is an HPU run, also on a launching node
    without a card, and also when HL_DEVICE is unset."""
    for env in ({"HL_DEVICE": None}, {"HL_DEVICE": "auto"}, {"HL_DEVICE": "hpu"}):
        r = ok(launch({**env, "HL_USE_LAZY_MODE": "1", "PATH": "/usr/bin:/bin"}))
        assert r.after("--device") == "hpu" and r.after("--distributed-backend") == "hccl"
        assert "PT_HPU_LAZY_MODE=1" in r.x_vars() and r.after("--use-lazy-mode") == "1"


def test_lazy_mode_only_on_hpu(launch):
    fails(launch({"HL_DEVICE": "cpu", "HL_USE_LAZY_MODE": "1"}), "HL_USE_LAZY_MODE")


def test_explicit_optimizer_and_fp32(launch):
    r = ok(launch({"HL_DEVICE": "cpu", "HL_OPTIMIZER": "fusedadamw", "HL_DTYPE": "fp32"}))
    assert r.after("--optimizer") == "fusedadamw" and "--bf16" not in r.tokens


# ---------------------------------------------------------------- model presets, MTP, MoE


def test_preset_tiny_passes_only_overrides(launch):
    r = ok(launch({"HL_MODEL": "tiny", "HL_NUM_LAYERS": None, "HL_DP": "8", "HL_TP": "1", "HL_PP": "1", "HL_EP": "8"}))
    a = r.train_args
    assert r.after("--model-preset") == "tiny"
    for flag in ("--num-layers", "--hidden-size", "--num-experts", "--moe-router-topk", "--q-lora-rank",
                 "--moe-layer-freq", "--moe-router-score-function", "--moe-aux-loss-coeff"):
        assert flag not in a, flag
    assert "/tiny/" in r.out  # results folder named after the preset


def test_preset_overrides_win(launch):
    r = ok(launch({"HL_MODEL": "v2-lite", "HL_HIDDEN_SIZE": "1024", "HL_NUM_EXPERTS": "16", "HL_MOE_TOPK": "4",
                   "HL_Q_LORA_RANK": "256", "HL_KV_LORA_RANK": "128", "HL_MOE_FFN_HIDDEN_SIZE": "256",
                   "HL_FFN_HIDDEN_SIZE": "2048", "HL_NUM_HEADS": "8", "HL_NUM_LAYERS": "6"}))
    assert r.after("--model-preset") == "v2-lite"
    assert r.after("--hidden-size") == "1024" and r.after("--num-experts") == "16" and r.after("--moe-router-topk") == "4"
    assert r.after("--q-lora-rank") == "256" and r.after("--kv-lora-rank") == "128"
    assert r.after("--moe-ffn-hidden-size") == "256" and r.after("--ffn-hidden-size") == "2048"
    assert r.after("--num-attention-heads") == "8" and r.after("--num-layers") == "6"
    assert r.after("--moe-layer-freq") == "([0]*1+[1]*5)"  # v2-lite: first layer dense


def test_q_lora_rank_zero_means_none(launch):
    r = ok(launch({"HL_Q_LORA_RANK": "0"}))
    assert "--q-lora-rank" not in r.tokens


def test_preset_alias_and_unknown(launch):
    r = ok(launch({"HL_MODEL": "v3-671b", "HL_NUM_LAYERS": None, "HL_PP": "1", "HL_DP": "4"}))
    assert r.after("--model-preset") == "v3-671b" and "/deepseek_v3/" in r.out
    fails(launch({"HL_MODEL": "gpt5"}), "HL_MODEL")


def test_preset_table_matches_presets_module():
    from megatron.core.models.deepseek.presets import PRESETS

    text = launcher_text()
    for name, cfg in PRESETS.items():
        m = re.search(rf"^\s*{re.escape(name)} ?(\|[^)]*)?\) echo \"(\S+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)\"",
                      text, re.M)
        assert m, name
        layers, dense, experts, topk, heads, mtp = map(int, m.groups()[2:])
        assert (layers, dense, experts, topk, heads, mtp) == (
            cfg.num_layers, cfg.first_k_dense, cfg.moe.num_experts, cfg.moe.topk, cfg.mla.num_heads,
            cfg.mtp.num_layers), name


def test_mtp_flags(launch):
    r = ok(launch({"HL_MTP_NUM_LAYERS": "1", "HL_MTP_LOSS_SCALING": "0.3"}))
    assert r.after("--mtp-num-layers") == "1" and r.after("--mtp-loss-scaling-factor") == "0.3"
    r = ok(launch({"HL_MODEL": "tiny", "HL_MTP_NUM_LAYERS": "0"}))
    assert r.after("--mtp-num-layers") == "0"
    fails(launch({"HL_MTP_NUM_LAYERS": "x"}), "HL_MTP_NUM_LAYERS")


def test_token_drop_defaults_to_alltoall(launch):
    r = ok(launch({"HL_TOKEN_DROP": "1"}))
    assert r.after("--moe-token-dispatcher-type") == "alltoall"
    assert r.after("--moe-expert-capacity-factor") == "1.0"
    assert "--moe-pad-expert-input-to-capacity" in r.tokens and r.after("--moe-token-drop-policy") == "probs"


def test_token_drop_with_allgather_fails(launch):
    fails(launch({"HL_TOKEN_DROP": "1", "HL_TOKEN_DISPATCHER_TYPE": "allgather"}), "HL_TOKEN_DISPATCHER_TYPE", "HL_TOKEN_DROP")


def test_token_drop_2_not_implemented(launch):
    fails(launch({"HL_TOKEN_DROP": "2"}), "HL_TOKEN_DROP=2", "not implemented")
    fails(launch({"HL_TOKEN_DROP": "3"}), "HL_TOKEN_DROP")


def test_shared_expert_overlap_only_with_alltoall(launch):
    r = ok(launch({"HL_ENABLE_SHARED_EXPERT_OVERLAP": "1", "HL_TOKEN_DISPATCHER_TYPE": "alltoall"}))
    assert "--moe-shared-expert-overlap" in r.tokens
    r = ok(launch({"HL_ENABLE_SHARED_EXPERT_OVERLAP": "1"}))
    assert "--moe-shared-expert-overlap" not in r.tokens and "HL_ENABLE_SHARED_EXPERT_OVERLAP" in r.err


def test_recompute_and_misc_flags(launch, tmp_path):
    r = ok(launch({"HL_CKP_ACT": "1", "HL_RECOMPUTE_NUM_LAYERS": "2", "HL_DETERMINISTIC_MODE": "1",
                   "HL_ENABLE_GRAD_REDUCE_OVERLAP": "1", "HL_ENABLE_PARAM_GATHER_OVERLAP": "1",
                   "HL_KILL_SWITCH": str(tmp_path / "stop"), "HL_PROFILE_TYPE": "pt", "HL_PROFILE_RANKS": "0 3",
                   "HL_VERIFY_CKPT": "1", "HL_MOE_GROUPED_GEMM": "0", "HL_SEQ_PARALLEL": "0",
                   "HL_FISRT_PP_STAGE_LAYERS": "1", "HL_LAST_PP_STAGE_LAYERS": "3"}))
    assert r.has("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2")
    for flag in ("--deterministic-mode", "--overlap-grad-reduce", "--overlap-param-gather", "--verify-checkpoint"):
        assert flag in r.tokens
    assert "--moe-grouped-gemm" not in r.tokens and "--sequence-parallel" not in r.tokens
    assert r.after("--kill-switch-file") == str(tmp_path / "stop")
    assert r.after("--profile-ranks", 2) == ["0", "3"] and r.after("--profile-step-start") == "3"
    assert r.after("--decoder-first-pipeline-num-layers") == "1" and r.after("--decoder-last-pipeline-num-layers") == "3"
    r = ok(launch({"HL_MOE_LAYER_RECOMPUTE": "1", "HL_SAVE": "0"}))
    assert r.has("--recompute-granularity", "selective", "--recompute-modules", "moe") and "--save" not in r.tokens


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "env, names",
    [
        ({"HL_LAUNCHER_TYPE": "srun"}, ["HL_LAUNCHER_TYPE"]),
        ({"HL_DEVICE": "tpu"}, ["HL_DEVICE"]),
        ({"HL_DP": "4"}, ["HL_NUM_NODES", "HL_DEVICES_PER_NODE", "HL_DP"]),
        ({"HL_EP": "8"}, ["HL_EP", "HL_DP", "HL_TP"]),
        ({"HL_EP": "4", "HL_NUM_EXPERTS": "6", "HL_DP": "4", "HL_PP": "1"}, ["HL_EP", "HL_NUM_EXPERTS"]),
        ({"HL_NUM_LAYERS": "5"}, ["HL_NUM_LAYERS", "HL_PP"]),
        ({"HL_NUM_LAYERS": "61"}, ["HL_NUM_LAYERS", "HL_PP"]),
        ({"HL_NUM_LAYERS": "8", "HL_PP": "4", "HL_DP": "1", "HL_FISRT_PP_STAGE_LAYERS": "3"}, ["HL_FISRT_PP_STAGE_LAYERS"]),
        ({"HL_NUM_LAYERS": "6", "HL_FISRT_PP_STAGE_LAYERS": "1", "HL_LAST_PP_STAGE_LAYERS": "2"}, ["HL_NUM_LAYERS"]),
        ({"HL_GBS": "7"}, ["HL_GBS", "HL_MICRO_BATCH", "HL_DP"]),
        ({"HL_TP": "two"}, ["HL_TP"]),
        ({"HL_TP": "0"}, ["HL_TP"]),
        ({"HL_CKP_ACT": "3"}, ["HL_CKP_ACT"]),
        ({"HL_TOKEN_DISPATCHER_TYPE": "flex"}, ["HL_TOKEN_DISPATCHER_TYPE"]),
        ({"HL_SEQ_PARALLEL": "yes"}, ["HL_SEQ_PARALLEL"]),
        ({"HL_TOKENIZER_TYPE": "Foo"}, ["HL_TOKENIZER_TYPE"]),
        ({"HL_TOKENIZER_TYPE": "NullTokenizer"}, ["HL_VOCAB_SIZE"]),
        ({"HL_VOCAB_SIZE": "1000"}, ["HL_VOCAB_SIZE"]),
        ({"HL_MOE_TOPK": "300"}, ["HL_MOE_TOPK"]),
        ({"HL_NUM_HEADS": "3"}, ["HL_TP", "HL_NUM_HEADS"]),
        ({"HL_MOE_SKIP_FIRST_LAYERS": "4"}, ["HL_MOE_SKIP_FIRST_LAYERS"]),
        ({"HL_DROPOUT": "0.1"}, ["HL_DROPOUT"]),
        ({"HL_CKPT_FORMAT": "torch"}, ["HL_CKPT_FORMAT"]),
        ({"HL_PROFILE_TYPE": "nsys"}, ["HL_PROFILE_TYPE"]),
        ({"HL_SAVE_DISTRIB_OPTIMIZER_METHOD": "x"}, ["HL_SAVE_DISTRIB_OPTIMIZER_METHOD"]),
        ({"HL_DTYPE": "fp16"}, ["HL_DTYPE"]),
    ],
)
def test_invalid_settings_fail_before_launch(launch, env, names):
    fails(launch(env), *names)


def test_data_files_checked(launch, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = {"HL_MOCK_DATA": None, "HL_DATA_DIR_ROOT": str(data), "HL_DATA_FILE_PREFIX": "corpus"}
    fails(launch(env), "HL_DATA_DIR_ROOT", "corpus.bin")
    (data / "corpus.bin").write_bytes(b"")
    fails(launch(env), "corpus.idx")
    (data / "corpus.idx").write_bytes(b"")
    r = ok(launch(env))
    assert r.after("--data-path") == str(data / "corpus") and "--mock-data" not in r.tokens
    assert ok(launch({**env, "HL_DATA_FILE_PREFIX": "missing", "HL_CHECK_PATHS": "0"}))


def test_data_path_blend(launch, tmp_path):
    for name in ("a", "b"):
        for ext in ("bin", "idx"):
            (tmp_path / f"{name}.{ext}").write_bytes(b"")
    blend = f"0.3 {tmp_path}/a 0.7 {tmp_path}/b"
    r = ok(launch({"HL_MOCK_DATA": None, "HL_DATA_PATH": blend, "HL_SPLIT": "98,2,0"}))
    assert r.after("--data-path", 4) == ["0.3", f"{tmp_path}/a", "0.7", f"{tmp_path}/b"]
    assert r.after("--split") == "98,2,0"
    fails(launch({"HL_MOCK_DATA": None, "HL_DATA_PATH": f"1 {tmp_path}/c"}), "HL_DATA_PATH", "c.bin")


def test_tokenizer_checked(launch, tmp_path):
    fails(launch({"HL_TOKENIZER_MODEL": str(tmp_path / "nothing")}), "HL_TOKENIZER_MODEL")
    r = ok(launch({"HL_TOKENIZER_TYPE": "DeepSeekV2Tokenizer"}))
    assert r.after("--extra-vocab-size") == "467"
    fails(launch({"HL_TOKENIZER_TYPE": "GPT2BPETokenizer", "HL_DATA_DIR_ROOT": str(tmp_path)}), "gpt2-vocab.json")
    (tmp_path / "gpt2-vocab.json").write_text("{}")
    (tmp_path / "gpt2-merges.txt").write_text("")
    r = ok(launch({"HL_TOKENIZER_TYPE": "GPT2BPETokenizer", "HL_DATA_DIR_ROOT": str(tmp_path)}))
    assert r.after("--vocab-file") == str(tmp_path / "gpt2-vocab.json")
    r = ok(launch({"HL_TOKENIZER_TYPE": "NullTokenizer", "HL_VOCAB_SIZE": "1000"}))
    assert r.after("--vocab-size") == "1000"


# ---------------------------------------------------------------- paths, results layout


def test_paths_with_spaces_and_quotes_survive(launch, tmp_path):
    data = tmp_path / "my data" / "it's \"here\""
    data.mkdir(parents=True)
    for ext in ("bin", "idx"):
        (data / f"my corpus.{ext}").write_bytes(b"")
    tok = tmp_path / "tok dir"
    tok.mkdir()
    res = tmp_path / "results $HOME dir"
    r = ok(launch({"HL_MOCK_DATA": None, "HL_DATA_DIR_ROOT": str(data), "HL_DATA_FILE_PREFIX": "my corpus",
                   "HL_TOKENIZER_MODEL": str(tok), "HL_RESULTS_DIR": str(res), "HL_DATA_CACHE_DIR": str(tmp_path / "c c")}))
    assert r.after("--data-path") == str(data / "my corpus")
    assert r.after("--tokenizer-model") == str(tok)
    assert r.after("--save") == str(res / "checkpoints") and r.after("--load") == str(res / "checkpoints")
    assert r.after("--tensorboard-dir") == str(res / "tensorboard")
    assert r.after("--data-cache-path") == str(tmp_path / "c c")


def test_results_layout(launch, tmp_path):
    r = ok(launch({"HL_REDIRECT_LOGS": "1", "HL_EXP_NAME": "exp1"}))
    save = r.after("--save")
    m = re.fullmatch(
        re.escape(str(tmp_path / "res")) + r"/out/deepseek_v3/(bf16_transformer_engine_exp1_nl4_gb3072_mb1_sp1_D2_T2_P2_E2_devices8_\d{8}_\d{4}\.\d+\.\d+)/checkpoints",
        save,
    )
    assert m, save
    results = Path(save).parent
    assert r.after("--tensorboard-dir") == str(results / "tensorboard")
    assert f"log: {results}/log_exp1_" in r.out
    assert not (tmp_path / "res").exists()
    r = ok(launch({"HL_CHECKPOINTS_DIR": str(tmp_path / "ck"), "HL_LOAD_DIR": str(tmp_path / "ld"),
                   "HL_TENSORBOARD_DIR": str(tmp_path / "tb")}))
    assert r.after("--save") == str(tmp_path / "ck") and r.after("--load") == str(tmp_path / "ld")
    assert r.after("--tensorboard-dir") == str(tmp_path / "tb")


# ---------------------------------------------------------------- the training code accepts the command


@pytest.mark.parametrize(
    "env, world",
    [
        ({}, 8),
        ({"HL_TOKEN_DROP": "1", "HL_MTP_NUM_LAYERS": "1", "HL_CKP_ACT": "2", "HL_MOE_LAYER_RECOMPUTE": "1"}, 8),
        ({"HL_MODEL": "tiny", "HL_DEVICE": "cpu", "HL_LAUNCHER_TYPE": "torchrun", "HL_DEVICES_PER_NODE": "2",
          "HL_DP": "2", "HL_TP": "1", "HL_PP": "1", "HL_GBS": "16", "HL_MICRO_BATCH": "4", "HL_SEQ_LEN": "256"}, 2),
        ({"HL_MODEL": "v2-lite", "HL_NUM_LAYERS": "4", "HL_Q_LORA_RANK": "0", "HL_EP": "4"}, 8),
    ],
)
def test_command_passes_training_argument_validation(launch, env, world):
    from megatron.training.arguments import parse_args

    r = ok(launch(env))
    parse_args(r.train_args, world_size=world, check_paths=False)


@pytest.mark.slow
def test_precheck_runs_parse_args(launch):
    """HL_PRECHECK=1 runs the training code's own validation before launching."""
    # the launcher itself does not check expert widths; parse_args does
    r = launch({"HL_PRECHECK": "1", "HL_PYTHON": sys.executable, "HL_MOE_FFN_HIDDEN_SIZE": "100"})
    fails(r, "HL_PRECHECK", "--moe-shared-expert-intermediate-size")


def test_quickstart_dry_run_command(tmp_path):
    """The quickstart's launcher settings (steps 1-4 are exercised separately; here only the env)."""
    text = QUICKSTART.read_text()
    for needle in ("HL_LAUNCHER_TYPE:-torchrun", "HL_DEVICE:-cpu", "HL_MODEL:-tiny", "HL_EP:-2",
                   "HL_DEVICES_PER_NODE:-2", "HL_MTP_NUM_LAYERS:-1", "quickstart_out"):
        assert needle in text, needle


# ---------------------------------------------------------------- quickstart data helpers


@pytest.mark.slow
def test_quickstart_corpus_and_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_quickstart_corpus.py"), "--output", str(corpus),
                    "--max-mb", "0.05"], check=True, capture_output=True, timeout=300)
    import json

    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 10 and all(len(d) >= 80 for d in docs) and len(set(docs)) == len(docs)
    tok_dir = tmp_path / "tok"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_quickstart_tokenizer.py"), "--input", str(corpus),
                    "--output", str(tok_dir), "--vocab-size", "400"], check=True, capture_output=True, timeout=300)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>"
    from megatron.training.tokenizer.huggingface import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(tok_dir))
    assert tok.vocab_size == 400 and tok.eod == 0
    text = "Return the sum of two numbers."
    assert tok.detokenize(tok.tokenize(text)) == text
