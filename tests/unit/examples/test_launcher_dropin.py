"""pretrain_deepseek.sh as a drop-in for Intel's script (HL_DRY_RUN=1, nothing is trained):
Intel's README command lines run verbatim, ENV_FLAGS is forwarded, MEGATRON_LM_ROOT cannot swap
the training code, host-NIC variables come from the environment, unknown HL_* names are reported,
and the command carries the per-rank logs and the signal settings."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.unit.examples.launch_utils import launcher_text

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "deepseek" / "pretrain_deepseek.sh"
README = ROOT / "examples" / "deepseek" / "README.md"


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr
        lines = self.out.splitlines()
        self.tokens: List[str] = shlex.split(lines[lines.index("# command") + 1]) if "# command" in lines else []

    def after(self, flag: str) -> str:
        return self.tokens[self.tokens.index(flag) + 1]

    def x_vars(self) -> List[str]:
        return [self.tokens[i + 1] for i, t in enumerate(self.tokens) if t == "-x"]

    def env_prefix(self) -> List[str]:
        """NAME=value words before the launcher in `env A=1 ... torchrun ...` (torchrun dry runs)."""
        if not self.tokens or self.tokens[0] != "env":
            return []
        return self.tokens[1:self.tokens.index(next(t for t in self.tokens[1:] if "=" not in t))]


def base_env(tmp_path: Path) -> Dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "HL_DRY_RUN": "1",
            "HL_RESULTS_DIR_PREFIX": str(tmp_path / "res")}


def dry_run(tmp_path: Path, env: Optional[Dict[str, Optional[str]]] = None, command: Optional[str] = None) -> Run:
    """The launcher (or a shell command line that calls it) in a clean environment."""
    full = base_env(tmp_path)
    full.update({"HL_DEVICE": "hpu", "HL_MOCK_DATA": "1", "HL_NUM_LAYERS": "4", "HL_TOKENIZER_MODEL": str(tmp_path)})
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    argv = ["bash", "-c", command] if command else ["bash", str(SCRIPT)]
    return Run(subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60, cwd=tmp_path))


def ok(r: Run) -> Run:
    assert r.rc == 0, r.err
    assert r.tokens, r.out
    return r


def one_error(r: Run, *needles: str) -> str:
    assert r.rc != 0 and r.tokens == [], r.out
    lines = [line for line in r.err.splitlines() if "error" in line]
    assert len(lines) == 1, r.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- Intel's README, verbatim
# The three command lines of examples/deepseek/README.md in HabanaAI/Megatron-LM, as users copy them.

INTEL_BASIC = r"""
  HL_USE_LAZY_MODE=1 \
  HL_TOKENIZER_TYPE=HuggingFaceTokenizer \
  HL_DATA_DIR_ROOT=/data/deepseek_preprocessed \
  HL_DATA_FILE_PREFIX=rp_wiki_24B_deepseek_tok_text_document \
  HL_TOKENIZER_MODEL=/data/deepseek_tokenizer \
  HL_NUM_NODES=1 \
  HL_DEVICES_PER_NODE=8 \
  HL_DP=8 \
  HL_TP=1 \
  HL_PP=1 \
  HL_EP=8 \
  HL_GBS=8 \
  HL_NUM_LAYERS=4 \
  HL_TOKEN_DROP=1 \
  HL_TOKEN_DISPATCHER_TYPE=alltoall \
  HL_MOE_SKIP_FIRST_LAYERS=3 \
  HL_SEQ_LEN=4096 \
  $MEGATRON_LM_ROOT/examples/deepseek/pretrain_deepseek.sh
"""

INTEL_MULTI_NODE = r"""
  HL_USE_LAZY_MODE=1 \
  HL_TOKENIZER_TYPE=HuggingFaceTokenizer \
  HL_DATA_DIR_ROOT=/data/deepseek_preprocessed \
  HL_DATA_FILE_PREFIX=rp_wiki_24B_deepseek_tok_text_document \
  HL_TOKENIZER_MODEL=/data/deepseek_tokenizer \
  HL_CKP_ACT=1 \
  HL_NUM_NODES=4 \
  HL_DEVICES_PER_NODE=8 \
  HL_DP=16 \
  HL_TP=1 \
  HL_PP=2 \
  HL_EP=16 \
  HL_GBS=1024 \
  HL_NUM_LAYERS=16 \
  HL_TOKEN_DROP=1 \
  HL_TOKEN_DISPATCHER_TYPE=alltoall \
  HL_MOE_SKIP_FIRST_LAYERS=3 \
  HL_SEQ_LEN=4096 \
  $MEGATRON_LM_ROOT/examples/deepseek/pretrain_deepseek.sh
"""

# The "MoE-Specific Configuration" block is a set of exports; the layout it needs (EP 8 must
# divide DP x TP) is the basic example's 8 devices, DP 8, with its 4 layers.
INTEL_MOE_BLOCK = r"""
# Expert Parallelism settings
export HL_EP=8                    # Expert parallelism degree
export HL_TOKEN_DROP=1            # Token dropping policy (0: dropless, 1: drop)
export HL_MOE_GROUPED_GEMM=1      # Use grouped GEMM for experts
export HL_MOE_SKIP_FIRST_LAYERS=3 # Number of dense layers before MoE layers

# Load balancing settings
export HL_AUX_LOSS_COEFF=1e-4     # Auxiliary loss coefficient for load balancing

# Token dispatcher settings
export HL_TOKEN_DISPATCHER_TYPE=alltoall  # allgather or alltoall
"""
MOE_BLOCK_RUN = "HL_DP=8 HL_TP=1 HL_PP=1 HL_NUM_LAYERS=4 $MEGATRON_LM_ROOT/examples/deepseek/pretrain_deepseek.sh\n"


def intel_env(tmp_path: Path) -> Dict[str, str]:
    """A CPU machine where a user followed Intel's README: MEGATRON_LM_ROOT and PYTHONPATH exported.
    The data and tokenizer live on the cluster (HL_CHECK_PATHS=0); /etc/mpi/hostfile lists 4 nodes."""
    hostfile = tmp_path / "etc_mpi_hostfile"
    hostfile.write_text("10.0.0.1\n10.0.0.2\n10.0.0.3\n10.0.0.4\n")
    env = base_env(tmp_path)
    env.update(MEGATRON_LM_ROOT=str(ROOT), PYTHONPATH=str(ROOT), HL_CHECK_PATHS="0",
               HL_DEFAULT_HOSTSFILE=str(hostfile))
    return env


def run_intel(tmp_path: Path, command: str) -> Run:
    proc = subprocess.run(["bash", "-c", command], env=intel_env(tmp_path), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    return Run(proc)


def assert_intel_common(r: Run, lazy: bool = True) -> None:
    assert r.rc == 0, r.err
    assert r.err == "", r.err  # no warning, no note: every variable is known, the root is ours
    assert r.tokens[0] == "mpirun"
    if lazy:  # HL_USE_LAZY_MODE=1: an HPU run, decided without looking at this (CPU) machine
        assert r.after("--device") == "hpu" and r.after("--distributed-backend") == "hccl"
        assert "PT_HPU_LAZY_MODE=1" in r.x_vars() and r.after("--use-lazy-mode") == "1"
    else:  # the ranks pick their device; the HPU settings travel with the command
        assert r.after("--device") == "auto" and "--distributed-backend" not in r.tokens
        assert "PT_HPU_LAZY_MODE=0" in r.x_vars() and r.after("--use-lazy-mode") == "0"
    assert r.after("--use-fused-sdpa") == "1" and r.after("--use-fused-rmsnorm") == "1"
    assert r.after("--optimizer") == "fusedadamw" and "--bf16" in r.tokens
    assert r.tokens[r.tokens.index("--device") - 1] == str(ROOT / "pretrain_gpt.py")
    assert f"PYTHONPATH={ROOT}" in r.x_vars()  # the exported PYTHONPATH=$MEGATRON_LM_ROOT, once
    assert r.after("--moe-token-dispatcher-type") == "alltoall" and r.after("--moe-expert-capacity-factor") == "1.0"
    if lazy:  # the two full command lines name Intel's data and tokenizer folders
        assert r.after("--tokenizer-model") == "/data/deepseek_tokenizer"
        assert r.after("--data-path") == "/data/deepseek_preprocessed/rp_wiki_24B_deepseek_tok_text_document"
    else:  # the original's defaults
        assert r.after("--tokenizer-model") == "/data/dataset_idx/red_pajama_deepseek"
        assert r.after("--data-path") == "/data/dataset_idx/red_pajama_deepseek/rp_wiki_24B_deepseek_tok_text_document"


def test_intel_readme_basic_command(tmp_path):
    r = run_intel(tmp_path, INTEL_BASIC)
    assert_intel_common(r)
    assert r.after("-np") == "8" and "--hostfile" not in r.tokens
    assert r.after("--expert-model-parallel-size") == "8" and r.after("--global-batch-size") == "8"
    assert r.after("--num-layers") == "4" and r.after("--moe-layer-freq") == "([0]*3+[1]*1)"


def test_intel_readme_multi_node_command(tmp_path):
    r = run_intel(tmp_path, INTEL_MULTI_NODE)
    assert_intel_common(r)
    assert r.after("-np") == "32"
    generated = r.after("--hostfile")
    assert generated.endswith("/hostsfile") and "MASTER_ADDR=10.0.0.1" in r.x_vars()
    assert r.after("--pipeline-model-parallel-size") == "2" and r.after("--expert-model-parallel-size") == "16"
    assert r.after("--recompute-granularity") == "full" and r.after("--recompute-method") == "uniform"
    assert r.after("--num-layers") == "16" and r.after("--moe-layer-freq") == "([0]*3+[1]*13)"


def test_intel_readme_moe_block(tmp_path):
    r = run_intel(tmp_path, INTEL_MOE_BLOCK + MOE_BLOCK_RUN)
    assert_intel_common(r, lazy=False)
    assert r.after("--expert-model-parallel-size") == "8" and "--moe-grouped-gemm" in r.tokens
    assert r.after("--moe-aux-loss-coeff") == "1e-4"


def test_intel_readme_commands_pass_the_training_parser(tmp_path):
    """The commands the compute nodes would run are accepted by the training code's parser."""
    from megatron.training.arguments import parse_args

    for command, world in ((INTEL_BASIC, 8), (INTEL_MULTI_NODE, 32), (INTEL_MOE_BLOCK + MOE_BLOCK_RUN, 8)):
        r = run_intel(tmp_path, command)
        i = next(i for i, t in enumerate(r.tokens) if t.endswith("pretrain_gpt.py"))
        parse_args(r.tokens[i + 1:], world_size=world, check_paths=False)


# ---------------------------------------------------------------- ENV_FLAGS


def test_env_flags_original_name_is_forwarded(tmp_path):
    r = ok(dry_run(tmp_path, {"ENV_FLAGS": "PT_HPU_RECIPE_CACHE_CONFIG=/tmp/c,false,1024,FOO=1"}))
    assert "PT_HPU_RECIPE_CACHE_CONFIG=/tmp/c,false,1024" in r.x_vars() and "FOO=1" in r.x_vars()
    r = ok(dry_run(tmp_path, {"ENV_FLAGS": "FOO=1", "HL_LAUNCHER_TYPE": "torchrun"}))
    assert "FOO=1" in r.env_prefix()


def test_env_flags_both_names_and_order(tmp_path):
    r = ok(dry_run(tmp_path, {"ENV_FLAGS": "A=1,B=2", "HL_ENV_FLAGS": "B=3,C=4"}))
    xs = [x for x in r.x_vars() if x[:2] in ("A=", "B=", "C=")]
    assert xs == ["A=1", "B=2", "B=3", "C=4"]  # ENV_FLAGS first: HL_ENV_FLAGS wins a repeated name


def test_env_flags_name_without_value_forwards_the_environment_value(tmp_path):
    r = ok(dry_run(tmp_path, {"ENV_FLAGS": "MY_SETTING, OTHER=x", "MY_SETTING": "a,b c"}))
    assert "MY_SETTING=a,b c" in r.x_vars() and "OTHER=x" in r.x_vars()
    r = ok(dry_run(tmp_path, {"HL_ENV_FLAGS": "MY_SETTING", "MY_SETTING": "v", "HL_LAUNCHER_TYPE": "torchrun"}))
    assert "MY_SETTING=v" in r.env_prefix()
    one_error(dry_run(tmp_path, {"ENV_FLAGS": "NOT_SET_ANYWHERE"}), "ENV_FLAGS", "NOT_SET_ANYWHERE")


# ---------------------------------------------------------------- MEGATRON_LM_ROOT


def test_megatron_lm_root_elsewhere_still_runs_this_checkout(tmp_path):
    other = tmp_path / "intel checkout"
    (other / "examples" / "deepseek").mkdir(parents=True)
    (other / "pretrain_gpt.py").write_text("raise SystemExit('the wrong entry point')\n")
    r = ok(dry_run(tmp_path, {"MEGATRON_LM_ROOT": str(other), "PYTHONPATH": str(other)}))
    i = next(i for i, t in enumerate(r.tokens) if t.endswith("pretrain_gpt.py"))
    assert r.tokens[i] == str(ROOT / "pretrain_gpt.py")
    assert f"PYTHONPATH={ROOT}:{other}" in r.x_vars()  # this checkout's megatron package comes first
    notes = [line for line in r.err.splitlines() if line]
    assert len(notes) == 1 and "note:" in notes[0] and "MEGATRON_LM_ROOT" in notes[0] and str(ROOT) in notes[0]


def test_megatron_lm_root_of_this_checkout_is_silent(tmp_path):
    for root in (str(ROOT), str(ROOT) + "/", str(ROOT / "examples" / ".."), None):
        r = ok(dry_run(tmp_path, {"MEGATRON_LM_ROOT": root}))
        assert r.err == "", r.err


# ---------------------------------------------------------------- host NIC


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_hnic_values_come_from_the_environment(tmp_path, launcher):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    env = {"HL_HNIC": "1", "HL_NUM_NODES": "2", "HL_DP": "4", "HL_HOSTSFILE": str(hosts), "HL_LAUNCHER_TYPE": launcher,
           "HL_TORCHRUN_MULTINODE": "1", "HL_RESULTS_DIR": str(tmp_path / "shared")}

    def forwarded(r: Run) -> List[str]:
        return r.x_vars() if launcher == "mpirun" else r.env_prefix()

    r = ok(dry_run(tmp_path, env))  # nothing set: the defaults
    assert {"HCCL_OVER_OFI=1", "HCCL_GAUDI_DIRECT=1", "FI_PROVIDER=verbs"} <= set(forwarded(r))
    r = ok(dry_run(tmp_path, {**env, "HCCL_OVER_OFI": "0", "HCCL_GAUDI_DIRECT": "0", "FI_PROVIDER": "tcp"}))
    assert {"HCCL_OVER_OFI=0", "HCCL_GAUDI_DIRECT=0", "FI_PROVIDER=tcp"} <= set(forwarded(r))
    r = ok(dry_run(tmp_path, {**env, "FI_PROVIDER": "tcp", "HL_FI_PROVIDER": "efa"}))  # HL_ name first
    assert "FI_PROVIDER=efa" in forwarded(r) and "FI_PROVIDER=tcp" not in forwarded(r)


# ---------------------------------------------------------------- unknown HL_* variables


def test_unknown_variable_warns_with_the_closest_known_name(tmp_path):
    r = ok(dry_run(tmp_path, {"HL_TRAIN_ITER": "7", "HL_TRAIN_ITERS": "20"}))
    warnings = [line for line in r.err.splitlines() if line]
    assert len(warnings) == 1, r.err
    assert "warning" in warnings[0] and "HL_TRAIN_ITER " in warnings[0]
    assert "did you mean HL_TRAIN_ITERS?" in warnings[0]
    assert r.after("--train-iters") == "20"  # the typo changed nothing
    r = ok(dry_run(tmp_path, {"HL_GBZ": "8", "HL_TOKEN_DISPATCHER": "alltoall", "HL_COMPLETELY_DIFFERENT_THING": "1"}))
    lines = sorted(line for line in r.err.splitlines() if line)
    assert len(lines) == 3, r.err
    assert "did you mean" not in lines[0] and "HL_COMPLETELY_DIFFERENT_THING" in lines[0]
    assert "HL_GBZ" in lines[1] and "did you mean HL_GBS?" in lines[1]
    assert "HL_TOKEN_DISPATCHER " in lines[2] and "did you mean HL_TOKEN_DISPATCHER_TYPE?" in lines[2]


def test_strict_env_makes_unknown_variables_an_error(tmp_path):
    one_error(dry_run(tmp_path, {"HL_TRAIN_ITER": "7", "HL_STRICT_ENV": "1"}), "HL_TRAIN_ITER", "HL_TRAIN_ITERS")
    assert ok(dry_run(tmp_path, {"HL_TRAIN_ITERS": "7", "HL_STRICT_ENV": "1"})).err == ""
    one_error(dry_run(tmp_path, {"HL_STRICT_ENV": "yes"}), "HL_STRICT_ENV")


def _known_vars() -> List[str]:
    text = launcher_text()
    block = re.search(r"^KNOWN_VARS=\((.*?)^\)", text, re.S | re.M)
    assert block, "KNOWN_VARS list not found"
    return block.group(1).split()


def test_known_variable_list_is_what_the_script_reads():
    text = launcher_text()
    known = _known_vars()
    assert len(known) == len(set(known))
    body = re.sub(r"^KNOWN_VARS=\(.*?^\)", "", text, flags=re.S | re.M)
    code = "\n".join(line.split(" #")[0] for line in body.splitlines() if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\bHL_[A-Z0-9_]*[A-Z0-9]\b", code))
    assert read == set(known), (sorted(read - set(known)), sorted(set(known) - read))
    # and the README documents every one of them
    readme = README.read_text()
    assert [v for v in known if v not in readme] == []


def test_every_known_variable_is_accepted_silently(tmp_path):
    """Setting any known variable (to its own default-like value where it matters) never warns."""
    env = {v: "" for v in _known_vars()}
    env.update(HL_DRY_RUN="1", HL_DEVICE="hpu", HL_MOCK_DATA="1", HL_NUM_LAYERS="4", HL_TOKENIZER_MODEL=str(tmp_path))
    r = dry_run(tmp_path, env)
    assert "warning" not in r.err and "is not a variable" not in r.err, r.err


# ---------------------------------------------------------------- per-rank logs, signals


def test_per_rank_logs_in_the_command(tmp_path):
    res = tmp_path / "my results"
    r = ok(dry_run(tmp_path, {"HL_RESULTS_DIR": str(res)}))
    assert r.after("--output-filename") == str(res / "logs")
    assert f"per-rank logs: {res / 'logs'}" in r.out
    r = ok(dry_run(tmp_path, {"HL_RESULTS_DIR": str(res), "HL_LAUNCHER_TYPE": "torchrun"}))
    assert r.after("--log-dir") == str(res / "logs") and r.after("--tee") == "3"


def test_exit_signal_handler_and_grace(tmp_path):
    r = ok(dry_run(tmp_path))
    assert "--exit-signal-handler" not in r.tokens and "odls_base_sigkill_timeout" not in r.tokens
    r = ok(dry_run(tmp_path, {"HL_EXIT_SIGNAL_HANDLER": "1"}))
    assert "--exit-signal-handler" in r.tokens and r.after("odls_base_sigkill_timeout") == "30"
    r = ok(dry_run(tmp_path, {"HL_EXIT_SIGNAL_HANDLER": "1", "HL_SHUTDOWN_TIMEOUT": "600"}))
    assert r.after("odls_base_sigkill_timeout") == "600"
    r = ok(dry_run(tmp_path, {"HL_EXIT_SIGNAL_HANDLER": "1", "HL_LAUNCHER_TYPE": "torchrun"}))
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=30" in r.env_prefix() and "--exit-signal-handler" in r.tokens
    r = ok(dry_run(tmp_path, {"HL_SHUTDOWN_TIMEOUT": "45", "HL_LAUNCHER_TYPE": "torchrun"}))
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=45" in r.env_prefix() and "--exit-signal-handler" not in r.tokens
    one_error(dry_run(tmp_path, {"HL_EXIT_SIGNAL_HANDLER": "yes"}), "HL_EXIT_SIGNAL_HANDLER")
    one_error(dry_run(tmp_path, {"HL_SHUTDOWN_TIMEOUT": "0"}), "HL_SHUTDOWN_TIMEOUT")
