#!/usr/bin/env bash
# DeepSeek-V3 / V2 pre-training launcher, configured only through HL_* environment variables.
#
# Same variable names and defaults as Intel Gaudi's Megatron-LM example
# (examples/deepseek/pretrain_deepseek.sh of HabanaAI/Megatron-LM), so existing job scripts work
# unchanged; see examples/deepseek/README.md for the full table and every difference. In short:
#   - every setting is validated before anything is launched (one line naming the variable), and
#     the whole command line goes through the training code's own parser and memory planner first
#     (HL_PRECHECK): a layout predicted not to fit is refused, naming the nearest layouts that fit
#     (HL_PLAN_DEVICE_TYPE, HL_PLAN_DEVICE_MEMORY_GB; HL_PLAN_OVERRIDE=1 launches it anyway);
#   - an HL_* name this script does not know is reported with the closest known one
#     (HL_STRICT_ENV=1 makes it an error);
#   - the device is decided by the ranks (--device auto) unless HL_DEVICE says otherwise;
#     HL_USE_LAZY_MODE=1 means HPU;
#   - the command is a bash array (paths with spaces or quotes survive);
#   - HL_DRY_RUN=1 prints the resolved settings, the exact command and the memory plan, then exits 0;
#   - per-rank logs go to <results>/logs; a user error inside the ranks is shown as one line;
#     SIGINT / SIGTERM / SIGHUP stop every rank (with HL_EXIT_SIGNAL_HANDLER=1 they save first);
#   - additions: HL_MODEL presets, model-size overrides, MTP, HL_DEVICE (hpu/cuda/cpu),
#     HL_TOKEN_DROP=1 defaults the dispatcher to alltoall, HL_TOKEN_DROP=2 is rejected.
set -euo pipefail

PROG=pretrain_deepseek.sh
die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
warn() { echo "$PROG: warning: $*" >&2; }
note() { echo "$PROG: note: $*" >&2; }

# Integer checks: `is_int NAME VALUE [min]`.
is_int() {
    local name=$1 value=$2 min=${3:-0}
    [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a non-negative integer, got '$value'"
    value=$((10#$value))
    ((value >= min)) || die "$name must be >= $min, got '$value'"
}
is_01() { [[ "$2" == 0 || "$2" == 1 ]] || die "$1 must be 0 or 1, got '$2'"; }
is_num() { [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "$1 must be a number, got '$2'"; }

# The training code is always this checkout's (examples/deepseek/../..), whatever MEGATRON_LM_ROOT says.
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
if [[ -n "${MEGATRON_LM_ROOT:-}" ]]; then
    user_root=$(cd -- "$MEGATRON_LM_ROOT" 2>/dev/null && pwd -P) || user_root=""
    [[ "$user_root" == "$REPO_ROOT" ]] ||
        note "MEGATRON_LM_ROOT ($MEGATRON_LM_ROOT) is not this launcher's checkout; running $REPO_ROOT/pretrain_gpt.py"
fi

# ------------------------------------------------------------------ variables for the ranks
# ENV_FLAGS (the original script's name) and HL_ENV_FLAGS: comma-separated entries forwarded to
# every rank (mpirun -x, exported for torchrun), ENV_FLAGS first. An entry is NAME=value, or
# NAME alone for a variable set in this environment (its value is forwarded). A piece that is
# neither continues the previous value, so values with commas survive
# (PT_HPU_RECIPE_CACHE_CONFIG=/path,false,1024). Parsed before this script sets any variable of
# its own, so NAME entries see the caller's environment.
FORWARD_ENV=()
add_env_flags() {
    local source=$1 text=$2 piece trimmed n_before=${#FORWARD_ENV[@]}
    local -a pieces=()
    IFS=',' read -r -a pieces <<<"$text"
    for piece in "${pieces[@]}"; do
        trimmed=${piece#"${piece%%[![:space:]]*}"}
        trimmed=${trimmed%"${trimmed##*[![:space:]]}"}
        if [[ "$trimmed" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
            FORWARD_ENV+=("$trimmed")
        elif [[ "$trimmed" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && printenv -- "$trimmed" >/dev/null; then
            FORWARD_ENV+=("$trimmed=$(printenv -- "$trimmed")")
        elif ((${#FORWARD_ENV[@]} > n_before)); then
            FORWARD_ENV[-1]+=",$piece"
        elif [[ -n "$trimmed" ]]; then
            die "$source: '$trimmed' is neither NAME=value nor the name of a variable set in this environment"
        fi
    done
}
add_env_flags ENV_FLAGS "${ENV_FLAGS:-}"
add_env_flags HL_ENV_FLAGS "${HL_ENV_FLAGS:-}"

# ------------------------------------------------------------------ known HL_* variables
# Every HL_* variable this script reads (tests check this list against the script's text).
KNOWN_VARS=(
    HL_LAUNCHER_TYPE HL_NUM_NODES HL_DEVICES_PER_NODE HL_HOSTSFILE HL_DEFAULT_HOSTSFILE HL_SSH_PORT HL_PE
    HL_PPR HL_HNIC HL_HCCL_OVER_OFI HL_HCCL_GAUDI_DIRECT HL_FI_PROVIDER HL_TORCHRUN_MULTINODE
    HL_TORCHRUN_NODE_RANK HL_TORCHRUN_MASTER_ADDR HL_MASTER_PORT HL_ENV_FLAGS HL_USE_LAZY_MODE
    HL_USE_TORCH_COMPILE HL_USE_TORCH_COMPILED_AUTOGRAD HL_REDIRECT_LOGS HL_DEVICE HL_PYTHON HL_TORCHRUN
    HL_MPIRUN HL_DRY_RUN HL_CHECK_PATHS HL_PRECHECK HL_PLAN_DEVICE_TYPE HL_PLAN_DEVICE_MEMORY_GB HL_PLAN_OVERRIDE
    HL_STRICT_ENV HL_EXIT_SIGNAL_HANDLER HL_SHUTDOWN_TIMEOUT
    HL_DP HL_TP HL_PP HL_EP HL_SEQ_PARALLEL HL_MICRO_BATCH HL_GBS HL_SEQ_LEN HL_FISRT_PP_STAGE_LAYERS
    HL_LAST_PP_STAGE_LAYERS HL_USE_DISTRIBUTED_OPTIMIZER HL_ENABLE_GRAD_REDUCE_OVERLAP
    HL_ENABLE_PARAM_GATHER_OVERLAP HL_CKP_ACT HL_RECOMPUTE_NUM_LAYERS HL_MODEL HL_NUM_LAYERS
    HL_MOE_SKIP_FIRST_LAYERS HL_NUM_EXPERTS HL_MOE_TOPK HL_NUM_HEADS HL_HIDDEN_SIZE HL_FFN_HIDDEN_SIZE
    HL_MOE_FFN_HIDDEN_SIZE HL_SHARED_EXPERT_FFN_HIDDEN_SIZE HL_Q_LORA_RANK HL_KV_LORA_RANK HL_QK_HEAD_DIM
    HL_QK_POS_EMB_HEAD_DIM HL_V_HEAD_DIM HL_MTP_NUM_LAYERS HL_MTP_LOSS_SCALING HL_TOKEN_DROP
    HL_TOKEN_DISPATCHER_TYPE HL_MOE_GROUPED_GEMM HL_MOE_LAYER_RECOMPUTE HL_ENABLE_SHARED_EXPERT_OVERLAP
    HL_AUX_LOSS_COEFF HL_DROPOUT HL_MOE_TOKEN_DISTRIBUTION_LOGGING HL_MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL
    HL_DTYPE HL_LR HL_MIN_LR HL_LR_WARMUP_ITERS HL_INIT_STD HL_SEED HL_DATA_DIR_ROOT HL_DATA_FILE_PREFIX
    HL_DATA_PATH HL_DATA_CACHE_DIR HL_MOCK_DATA HL_SPLIT HL_TOKENIZER_TYPE HL_TOKENIZER_MODEL HL_VOCAB_SIZE
    HL_NUM_WORKERS HL_TRAIN_ITERS HL_LR_DECAY_ITER HL_LOG_INTERVAL HL_EVAL_INTERVAL HL_EVAL_ITERS
    HL_EXIT_INTERVAL HL_RESULTS_DIR HL_RESULTS_DIR_PREFIX HL_EXP_NAME HL_CHECKPOINTS_DIR HL_LOAD_DIR
    HL_TENSORBOARD_DIR HL_SAVE HL_SAVE_INTERVAL HL_CKPT_FORMAT HL_VERIFY_CKPT HL_SAVE_DISTRIB_OPTIMIZER_METHOD
    HL_LOAD_DISTRIB_OPTIMIZER_METHOD HL_KILL_SWITCH_FILE HL_KILL_SWITCH HL_DETERMINISTIC_MODE
    HL_PROFILE_TYPE HL_PROFILE_STEP_START HL_PROFILE_STEP_END HL_PROFILE_RANKS HL_OPTIMIZER
    HL_USE_FUSED_SDPA HL_USE_FUSED_SDPA_WITH_RECOMPUTE HL_USE_FAST_SOFTMAX HL_USE_FUSED_RMSNORM
    HL_TRANSFORMER_IMPL
)
# An HL_* variable of the environment that is not in the list is a warning naming the closest
# known variable (Levenshtein distance), or an error with HL_STRICT_ENV=1.
STRICT_ENV=${HL_STRICT_ENV:-0}
is_01 HL_STRICT_ENV "$STRICT_ENV"
mapfile -t unknown_vars < <(compgen -e | grep '^HL_' | grep -vxF -f <(printf '%s\n' "${KNOWN_VARS[@]}") || true)
if ((${#unknown_vars[@]} > 0)); then
    while IFS=$'\t' read -r name closest; do
        msg="$name is not a variable of this script and is ignored"
        [[ -z "$closest" ]] || msg+="; did you mean $closest?"
        if ((STRICT_ENV == 1)); then die "$msg (HL_STRICT_ENV=1)"; fi
        warn "$msg (HL_STRICT_ENV=1 makes this an error)"
    done < <(printf '%s\n' "${unknown_vars[@]}" | awk -v known="${KNOWN_VARS[*]}" '
        function dist(a, b,    i, j, la, lb, cost, d, x, y, z) {
            la = length(a); lb = length(b)
            for (i = 0; i <= la; i++) d[i, 0] = i
            for (j = 0; j <= lb; j++) d[0, j] = j
            for (i = 1; i <= la; i++)
                for (j = 1; j <= lb; j++) {
                    cost = (substr(a, i, 1) == substr(b, j, 1)) ? 0 : 1
                    x = d[i - 1, j] + 1; y = d[i, j - 1] + 1; z = d[i - 1, j - 1] + cost
                    d[i, j] = (x < y ? (x < z ? x : z) : (y < z ? y : z))
                }
            return d[la, lb]
        }
        BEGIN { n = split(known, names, " ") }
        {
            best = ""; bestd = 1e9
            for (k = 1; k <= n; k++) { dd = dist($0, names[k]); if (dd < bestd) { bestd = dd; best = names[k] } }
            # suggest only a near miss: at most a third of the (prefix-less) name differs
            print $0 "\t" ((bestd <= (length($0) - 3) / 3) ? best : "")
        }')
fi

# ------------------------------------------------------------------ launch and cluster
LAUNCHER_TYPE=${HL_LAUNCHER_TYPE:-mpirun}
NUM_NODES=${HL_NUM_NODES:-1}
DEVICES_PER_NODE=${HL_DEVICES_PER_NODE:-8}
HOSTSFILE=${HL_HOSTSFILE:-}
DEFAULT_HOSTSFILE=${HL_DEFAULT_HOSTSFILE:-/etc/mpi/hostfile}
SSH_PORT=${HL_SSH_PORT:-22}
HL_PE=${HL_PE:-}
HL_PPR=${HL_PPR:-}
HNIC=${HL_HNIC:-0}
TORCHRUN_MULTINODE=${HL_TORCHRUN_MULTINODE:-0}
TORCHRUN_NODE_RANK=${HL_TORCHRUN_NODE_RANK:-0}
TORCHRUN_MASTER_ADDR=${HL_TORCHRUN_MASTER_ADDR:-localhost}
MASTER_PORT=${HL_MASTER_PORT:-12345}
USE_LAZY_MODE=${HL_USE_LAZY_MODE:-0}
USE_TORCH_COMPILE=${HL_USE_TORCH_COMPILE:-0}
USE_TORCH_COMPILED_AUTOGRAD=${HL_USE_TORCH_COMPILED_AUTOGRAD:-0}
REDIRECT_LOGS=${HL_REDIRECT_LOGS:-0}
DEVICE=${HL_DEVICE:-auto}
PYTHON_BIN=${HL_PYTHON:-python3}
TORCHRUN_BIN=${HL_TORCHRUN:-torchrun}
MPIRUN_BIN=${HL_MPIRUN:-mpirun}
DRY_RUN=${HL_DRY_RUN:-0}
CHECK_PATHS=${HL_CHECK_PATHS:-1}
PRECHECK=${HL_PRECHECK:-}
PLAN_DEVICE_TYPE=${HL_PLAN_DEVICE_TYPE:-}
PLAN_DEVICE_MEMORY_GB=${HL_PLAN_DEVICE_MEMORY_GB:-}
PLAN_OVERRIDE=${HL_PLAN_OVERRIDE:-0}
EXIT_SIGNAL_HANDLER=${HL_EXIT_SIGNAL_HANDLER:-0}
SHUTDOWN_TIMEOUT=${HL_SHUTDOWN_TIMEOUT:-}

# ------------------------------------------------------------------ parallelism and batch
DP=${HL_DP:-2}
TP=${HL_TP:-2}
PP=${HL_PP:-2}
EP=${HL_EP:-2}
SEQ_PARALLEL=${HL_SEQ_PARALLEL:-1}
MICRO_BATCH_SIZE=${HL_MICRO_BATCH:-1}
GLOBAL_BATCH_SIZE=${HL_GBS:-3072}
SEQ_LEN=${HL_SEQ_LEN:-4096}
FISRT_PP_STAGE_LAYERS=${HL_FISRT_PP_STAGE_LAYERS:-0}
LAST_PP_STAGE_LAYERS=${HL_LAST_PP_STAGE_LAYERS:-0}
USE_DISTRIBUTED_OPTIMIZER=${HL_USE_DISTRIBUTED_OPTIMIZER:-1}
ENABLE_GRAD_REDUCE_OVERLAP=${HL_ENABLE_GRAD_REDUCE_OVERLAP:-0}
ENABLE_PARAM_GATHER_OVERLAP=${HL_ENABLE_PARAM_GATHER_OVERLAP:-0}
CKP_ACT=${HL_CKP_ACT:-0}
RECOMPUTE_NUM_LAYERS=${HL_RECOMPUTE_NUM_LAYERS:-1}

# ------------------------------------------------------------------ model
# HL_MODEL unset: the DeepSeek-V3 values below are passed explicitly (as the original script).
# HL_MODEL=<preset>: --model-preset <preset>, plus only the model variables set explicitly.
MODEL=${HL_MODEL:-}
# Preset table (must agree with megatron/core/models/deepseek/presets.py; a unit test checks):
# layers first_k_dense experts topk heads mtp_layers
preset_info() {
    case "$1" in
        deepseek-v3 | v3-671b) echo "deepseek_v3 61 3 256 8 128 1" ;;
        deepseek-v2 | v2-236b) echo "deepseek_v2 60 1 160 6 128 0" ;;
        deepseek-v2-lite | v2-lite) echo "deepseek_v2_lite 27 1 64 6 16 0" ;;
        tiny) echo "tiny 4 1 8 2 8 1" ;;
        *) return 1 ;;
    esac
}
if [[ -n "$MODEL" ]]; then
    info=$(preset_info "$MODEL") || die "HL_MODEL must be one of v3-671b, v2-236b, v2-lite, tiny (or deepseek-v3, deepseek-v2, deepseek-v2-lite), got '$MODEL'"
    read -r MODEL_DIR_NAME P_LAYERS P_FIRST_DENSE P_EXPERTS P_TOPK P_HEADS P_MTP <<<"$info"
else
    MODEL_DIR_NAME=deepseek_v3
    P_LAYERS=61 P_FIRST_DENSE=3 P_EXPERTS=256 P_TOPK=8 P_HEADS=128 P_MTP=0  # no --mtp-num-layers: none
fi
NUM_LAYERS=${HL_NUM_LAYERS:-$P_LAYERS}
MOE_SKIP_FIRST_LAYERS=${HL_MOE_SKIP_FIRST_LAYERS:-$P_FIRST_DENSE}
NUM_EXPERTS=${HL_NUM_EXPERTS:-$P_EXPERTS}
TOPK=${HL_MOE_TOPK:-$P_TOPK}
NUM_HEADS=${HL_NUM_HEADS:-$P_HEADS}
# V3 sizes (used when HL_MODEL is unset; with a preset only explicit overrides are passed).
HIDDEN_SIZE=${HL_HIDDEN_SIZE:-7168}
FFN_HIDDEN_SIZE=${HL_FFN_HIDDEN_SIZE:-18432}
EXPERT_FFN_HIDDEN_SIZE=${HL_MOE_FFN_HIDDEN_SIZE:-2048}
SHARED_EXPERT_FFN_HIDDEN_SIZE=${HL_SHARED_EXPERT_FFN_HIDDEN_SIZE:-2048}
Q_LORA_RANK=${HL_Q_LORA_RANK:-1536}
KV_LORA_RANK=${HL_KV_LORA_RANK:-512}
QK_HEAD_DIM=${HL_QK_HEAD_DIM:-128}
QK_POS_EMB_HEAD_DIM=${HL_QK_POS_EMB_HEAD_DIM:-64}
V_HEAD_DIM=${HL_V_HEAD_DIM:-128}
MTP_NUM_LAYERS=${HL_MTP_NUM_LAYERS:-}
MTP_LOSS_SCALING=${HL_MTP_LOSS_SCALING:-}
TOKEN_DROP=${HL_TOKEN_DROP:-0}
if [[ -n "${HL_TOKEN_DISPATCHER_TYPE:-}" ]]; then
    TOKEN_DISPATCHER_TYPE=$HL_TOKEN_DISPATCHER_TYPE
elif [[ "$TOKEN_DROP" == 1 ]]; then
    TOKEN_DISPATCHER_TYPE=alltoall  # capacity (token drop) needs the alltoall dispatcher
else
    TOKEN_DISPATCHER_TYPE=allgather
fi
MOE_GROUPED_GEMM=${HL_MOE_GROUPED_GEMM:-1}
MOE_LAYER_RECOMPUTE=${HL_MOE_LAYER_RECOMPUTE:-0}
ENABLE_SHARED_EXPERT_OVERLAP=${HL_ENABLE_SHARED_EXPERT_OVERLAP:-0}
AUX_LOSS_COEFF=${HL_AUX_LOSS_COEFF:-1e-4}
DROPOUT=${HL_DROPOUT:-0.0}
MOE_TOKEN_DISTRIBUTION_LOGGING=${HL_MOE_TOKEN_DISTRIBUTION_LOGGING:-0}
MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL=${HL_MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL:-}
DTYPE=${HL_DTYPE:-bf16}
LR=${HL_LR:-2.2e-4}
MIN_LR=${HL_MIN_LR:-2.2e-5}
LR_WARMUP_ITERS=${HL_LR_WARMUP_ITERS:-2000}
INIT_STD=${HL_INIT_STD:-6e-3}
SEED=${HL_SEED:-}
EXTRA_VOCAB_SIZE=467

# ------------------------------------------------------------------ data, tokenizer, outputs
DATA_DIR=${HL_DATA_DIR_ROOT:-/data/dataset_idx/red_pajama_deepseek}
DATA_FILE_PREFIX=${HL_DATA_FILE_PREFIX:-rp_wiki_24B_deepseek_tok_text_document}
DATA_PATH_LIST=${HL_DATA_PATH:-}
DATA_CACHE_DIR=${HL_DATA_CACHE_DIR:-}
MOCK_DATA=${HL_MOCK_DATA:-0}
SPLIT=${HL_SPLIT:-}
TOKENIZER_TYPE=${HL_TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${HL_TOKENIZER_MODEL:-$DATA_DIR}
VOCAB_SIZE=${HL_VOCAB_SIZE:-}
NUM_WORKERS=${HL_NUM_WORKERS:-2}
TRAIN_ITERS=${HL_TRAIN_ITERS:-500000}
LR_DECAY_ITER=${HL_LR_DECAY_ITER:-320000}
LOG_INTERVAL=${HL_LOG_INTERVAL:-10}
EVAL_INTERVAL=${HL_EVAL_INTERVAL:-1000}
EVAL_ITERS=${HL_EVAL_ITERS:-10}
EXIT_INTERVAL=${HL_EXIT_INTERVAL:-0}
OUTPUT_DIR=${HL_RESULTS_DIR:-}
OUTPUT_DIR_PREFIX=${HL_RESULTS_DIR_PREFIX:-.}
EXP_NAME=${HL_EXP_NAME:-${EXP_NAME:-default}}
CHECKPOINTS_DIR=${HL_CHECKPOINTS_DIR:-}
LOAD_DIR=${HL_LOAD_DIR:-}
TENSORBOARD_DIR=${HL_TENSORBOARD_DIR:-}
CHECKPOINT_SAVE=${HL_SAVE:-1}
SAVE_INTERVAL=${HL_SAVE_INTERVAL:-2000}
CKPT_FORMAT=${HL_CKPT_FORMAT:-torch_dist}
VERIFY_CKPT=${HL_VERIFY_CKPT:-0}
SAVE_DISTRIB_OPTIMIZER_METHOD=${HL_SAVE_DISTRIB_OPTIMIZER_METHOD:-parallel_multi_node}
LOAD_DISTRIB_OPTIMIZER_METHOD=${HL_LOAD_DISTRIB_OPTIMIZER_METHOD:-serial_per_node}
KILL_SWITCH_FILE=${HL_KILL_SWITCH_FILE:-${HL_KILL_SWITCH:-}}
DETERMINISTIC_MODE=${HL_DETERMINISTIC_MODE:-0}
PROFILE_TYPE=${HL_PROFILE_TYPE:-}
PROFILE_STEP_START=${HL_PROFILE_STEP_START:-3}
PROFILE_STEP_END=${HL_PROFILE_STEP_END:-4}
PROFILE_RANKS=${HL_PROFILE_RANKS:-}
OPTIMIZER=${HL_OPTIMIZER:-}
USE_FUSED_SDPA=${HL_USE_FUSED_SDPA:-1}
USE_FUSED_SDPA_WITH_RECOMPUTE=${HL_USE_FUSED_SDPA_WITH_RECOMPUTE:-1}
USE_FAST_SOFTMAX=${HL_USE_FAST_SOFTMAX:-1}
USE_FUSED_RMSNORM=${HL_USE_FUSED_RMSNORM:-1}
TRANSFORMER_IMPL=${HL_TRANSFORMER_IMPL:-transformer_engine}

# ------------------------------------------------------------------ a checkpoint to continue from
# The folder --load reads: HL_LOAD_DIR, else the checkpoints folder of a named results folder (a
# derived results folder is new, so it holds nothing yet). When it holds a checkpoint (tracker file
# -> iter_NNNNNNN/common.json, or an iteration folder itself), the model is the checkpoint's
# (--use-checkpoint-args): its sizes replace the defaults in the validation below, the settings and
# the results folder name, and a model variable set here that differs from it is an error.
if [[ -n "$LOAD_DIR" ]]; then
    LOAD_SOURCE=$LOAD_DIR
elif [[ -n "$CHECKPOINTS_DIR" ]]; then
    LOAD_SOURCE=$CHECKPOINTS_DIR
elif [[ -n "$OUTPUT_DIR" ]]; then
    LOAD_SOURCE=$OUTPUT_DIR/checkpoints
else
    LOAD_SOURCE=""
fi
CKPT_INFO=""
if [[ -n "$LOAD_SOURCE" && -d "$LOAD_SOURCE" ]]; then
    if [[ -f "$LOAD_SOURCE/latest_checkpointed_iteration.txt" || -f "$LOAD_SOURCE/common.json" ]]; then
        CKPT_INFO=$("$PYTHON_BIN" - "$LOAD_SOURCE" 2>&1 <<'EOF'
import json, os, sys
root = sys.argv[1]
tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
path = root
if os.path.isfile(tracker):
    text = open(tracker).read().strip()
    if not text.isdigit():
        sys.exit(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    path = os.path.join(root, f"iter_{int(text):07d}")
try:
    with open(os.path.join(path, "common.json")) as f:
        common = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"{os.path.join(path, 'common.json')}: unreadable ({e})")
a = common.get("args") or {}
values = [a.get("model_preset") or "-", a.get("model.num_layers"), a.get("model.first_k_dense"),
          a.get("model.moe.num_experts"), a.get("model.moe.topk"), a.get("model.mla.num_heads"),
          a.get("model.mtp.num_layers"), a.get("model.hidden_size"), a.get("model.moe.score_function"),
          a.get("model.moe.num_groups"), a.get("model.moe.group_topk")]
if any(v is None for v in values):
    sys.exit(f"{os.path.join(path, 'common.json')}: no model arguments")
print(common.get("iteration", "?"), *values, path)
EOF
        ) || die "HL_LOAD_DIR: cannot read the checkpoint in '$LOAD_SOURCE': $(echo "$CKPT_INFO" | tail -n 1)"
    fi
fi
if [[ -n "$CKPT_INFO" ]]; then
    read -r CKPT_ITERATION CKPT_PRESET CKPT_LAYERS CKPT_FIRST_DENSE CKPT_EXPERTS CKPT_TOPK CKPT_HEADS CKPT_MTP \
        CKPT_HIDDEN CKPT_SCORE CKPT_GROUPS CKPT_GROUP_TOPK CKPT_PATH <<<"$CKPT_INFO"
    for v in NUM_LAYERS:HL_NUM_LAYERS:CKPT_LAYERS MOE_SKIP_FIRST_LAYERS:HL_MOE_SKIP_FIRST_LAYERS:CKPT_FIRST_DENSE \
        NUM_EXPERTS:HL_NUM_EXPERTS:CKPT_EXPERTS TOPK:HL_MOE_TOPK:CKPT_TOPK NUM_HEADS:HL_NUM_HEADS:CKPT_HEADS \
        HIDDEN_SIZE:HL_HIDDEN_SIZE:CKPT_HIDDEN; do
        IFS=: read -r var env_name ckpt_var <<<"$v"
        if [[ -n "${!env_name:-}" && "${!env_name}" != "${!ckpt_var}" ]]; then
            die "$env_name=${!env_name}, but the checkpoint in HL_LOAD_DIR ($CKPT_PATH) has ${!ckpt_var}; unset $env_name (the model comes from the checkpoint)"
        fi
        printf -v "$var" '%s' "${!ckpt_var}"
    done
    MTP_NUM_LAYERS=""  # the checkpoint's depth is used (--use-checkpoint-args)
    # The preset passed along (its training choices; the shape is the checkpoint's): HL_MODEL, else
    # the checkpoint's, else the family its experts, top-k and heads match, else the family of its
    # router (sigmoid: deepseek-v3, softmax: deepseek-v2). The results folder is named after the
    # preset (checkpoint_model when the last rule chose it).
    MODEL_DIR_NAME=checkpoint_model
    for name in $MODEL "$CKPT_PRESET" deepseek-v3 deepseek-v2 deepseek-v2-lite tiny; do
        info=$(preset_info "$name") || continue
        read -r dir_name _ _ experts topk heads _ <<<"$info"
        if [[ "$name" == "$MODEL" || "$name" == "$CKPT_PRESET" ]] ||
            [[ "$experts $topk $heads" == "$CKPT_EXPERTS $CKPT_TOPK $CKPT_HEADS" ]]; then
            MODEL=$name MODEL_DIR_NAME=$dir_name
            break
        fi
    done
    if [[ -z "$MODEL" && "$CKPT_SCORE" == softmax ]]; then MODEL=deepseek-v2; fi
    MODEL=${MODEL:-deepseek-v3}
fi

# ================================================================== validation
case "$LAUNCHER_TYPE" in mpirun | torchrun) ;; *) die "HL_LAUNCHER_TYPE must be mpirun or torchrun, got '$LAUNCHER_TYPE'" ;; esac
case "$DEVICE" in auto | hpu | cuda | cpu) ;; *) die "HL_DEVICE must be auto, hpu, cuda or cpu, got '$DEVICE'" ;; esac
for v in NUM_NODES:HL_NUM_NODES DEVICES_PER_NODE:HL_DEVICES_PER_NODE DP:HL_DP TP:HL_TP PP:HL_PP EP:HL_EP \
    MICRO_BATCH_SIZE:HL_MICRO_BATCH GLOBAL_BATCH_SIZE:HL_GBS SEQ_LEN:HL_SEQ_LEN NUM_LAYERS:HL_NUM_LAYERS \
    NUM_EXPERTS:HL_NUM_EXPERTS TOPK:HL_MOE_TOPK NUM_HEADS:HL_NUM_HEADS TRAIN_ITERS:HL_TRAIN_ITERS \
    LOG_INTERVAL:HL_LOG_INTERVAL EVAL_INTERVAL:HL_EVAL_INTERVAL SAVE_INTERVAL:HL_SAVE_INTERVAL \
    RECOMPUTE_NUM_LAYERS:HL_RECOMPUTE_NUM_LAYERS; do
    var=${v%%:*}
    is_int "${v#*:}" "${!var}" 1
done
for v in FISRT_PP_STAGE_LAYERS:HL_FISRT_PP_STAGE_LAYERS LAST_PP_STAGE_LAYERS:HL_LAST_PP_STAGE_LAYERS \
    MOE_SKIP_FIRST_LAYERS:HL_MOE_SKIP_FIRST_LAYERS TORCHRUN_NODE_RANK:HL_TORCHRUN_NODE_RANK \
    EXIT_INTERVAL:HL_EXIT_INTERVAL EVAL_ITERS:HL_EVAL_ITERS NUM_WORKERS:HL_NUM_WORKERS \
    LR_DECAY_ITER:HL_LR_DECAY_ITER SSH_PORT:HL_SSH_PORT MASTER_PORT:HL_MASTER_PORT; do
    var=${v%%:*}
    is_int "${v#*:}" "${!var}" 0
done
for v in HNIC:HL_HNIC TORCHRUN_MULTINODE:HL_TORCHRUN_MULTINODE USE_LAZY_MODE:HL_USE_LAZY_MODE \
    USE_TORCH_COMPILE:HL_USE_TORCH_COMPILE USE_TORCH_COMPILED_AUTOGRAD:HL_USE_TORCH_COMPILED_AUTOGRAD \
    REDIRECT_LOGS:HL_REDIRECT_LOGS SEQ_PARALLEL:HL_SEQ_PARALLEL USE_DISTRIBUTED_OPTIMIZER:HL_USE_DISTRIBUTED_OPTIMIZER \
    ENABLE_GRAD_REDUCE_OVERLAP:HL_ENABLE_GRAD_REDUCE_OVERLAP ENABLE_PARAM_GATHER_OVERLAP:HL_ENABLE_PARAM_GATHER_OVERLAP \
    MOE_GROUPED_GEMM:HL_MOE_GROUPED_GEMM MOE_LAYER_RECOMPUTE:HL_MOE_LAYER_RECOMPUTE \
    ENABLE_SHARED_EXPERT_OVERLAP:HL_ENABLE_SHARED_EXPERT_OVERLAP CHECKPOINT_SAVE:HL_SAVE VERIFY_CKPT:HL_VERIFY_CKPT \
    DETERMINISTIC_MODE:HL_DETERMINISTIC_MODE USE_FUSED_SDPA:HL_USE_FUSED_SDPA \
    USE_FUSED_SDPA_WITH_RECOMPUTE:HL_USE_FUSED_SDPA_WITH_RECOMPUTE USE_FAST_SOFTMAX:HL_USE_FAST_SOFTMAX \
    USE_FUSED_RMSNORM:HL_USE_FUSED_RMSNORM MOCK_DATA:HL_MOCK_DATA DRY_RUN:HL_DRY_RUN CHECK_PATHS:HL_CHECK_PATHS \
    EXIT_SIGNAL_HANDLER:HL_EXIT_SIGNAL_HANDLER PLAN_OVERRIDE:HL_PLAN_OVERRIDE; do
    var=${v%%:*}
    is_01 "${v#*:}" "${!var}"
done
for v in AUX_LOSS_COEFF:HL_AUX_LOSS_COEFF DROPOUT:HL_DROPOUT LR:HL_LR MIN_LR:HL_MIN_LR INIT_STD:HL_INIT_STD; do
    var=${v%%:*}
    is_num "${v#*:}" "${!var}"
done
[[ -z "$PRECHECK" ]] || is_01 HL_PRECHECK "$PRECHECK"
[[ -z "$SHUTDOWN_TIMEOUT" ]] || is_int HL_SHUTDOWN_TIMEOUT "$SHUTDOWN_TIMEOUT" 1
[[ -z "$SEED" ]] || is_int HL_SEED "$SEED" 0
[[ -z "$MTP_NUM_LAYERS" ]] || is_int HL_MTP_NUM_LAYERS "$MTP_NUM_LAYERS" 0
[[ -z "$MTP_LOSS_SCALING" ]] || is_num HL_MTP_LOSS_SCALING "$MTP_LOSS_SCALING"
case "$MOE_TOKEN_DISTRIBUTION_LOGGING" in 0 | 1 | 2) ;; *) die "HL_MOE_TOKEN_DISTRIBUTION_LOGGING must be 0, 1 (TensorBoard) or 2 (TensorBoard and console), got '$MOE_TOKEN_DISTRIBUTION_LOGGING'" ;; esac
[[ -z "$MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL" ]] || is_int HL_MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL "$MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL" 1
for v in HL_HIDDEN_SIZE HL_FFN_HIDDEN_SIZE HL_MOE_FFN_HIDDEN_SIZE HL_SHARED_EXPERT_FFN_HIDDEN_SIZE HL_Q_LORA_RANK \
    HL_KV_LORA_RANK HL_QK_HEAD_DIM HL_QK_POS_EMB_HEAD_DIM HL_V_HEAD_DIM HL_VOCAB_SIZE HL_LR_WARMUP_ITERS; do
    [[ -z "${!v:-}" ]] || is_int "$v" "${!v}" $([[ $v == HL_Q_LORA_RANK || $v == HL_LR_WARMUP_ITERS ]] && echo 0 || echo 1)
done
for v in NUM_NODES DEVICES_PER_NODE DP TP PP EP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE NUM_LAYERS NUM_EXPERTS TOPK \
    NUM_HEADS FISRT_PP_STAGE_LAYERS LAST_PP_STAGE_LAYERS MOE_SKIP_FIRST_LAYERS TORCHRUN_NODE_RANK; do
    printf -v "$v" '%d' "$((10#${!v}))"  # strip leading zeros
done
case "$DTYPE" in bf16 | fp32) ;; *) die "HL_DTYPE must be bf16 or fp32, got '$DTYPE'" ;; esac
case "$CKP_ACT" in 0 | 1 | 2) ;; *) die "HL_CKP_ACT must be 0 (off), 1 (full) or 2 (selective), got '$CKP_ACT'" ;; esac
case "$TOKEN_DISPATCHER_TYPE" in allgather | alltoall) ;; *) die "HL_TOKEN_DISPATCHER_TYPE must be allgather or alltoall, got '$TOKEN_DISPATCHER_TYPE'" ;; esac
case "$TOKEN_DROP" in
    0) ;;
    1) [[ "$TOKEN_DISPATCHER_TYPE" == alltoall ]] ||
        die "HL_TOKEN_DROP=1 (capacity factor, token drop) needs HL_TOKEN_DISPATCHER_TYPE=alltoall, got '$TOKEN_DISPATCHER_TYPE'" ;;
    2) die "HL_TOKEN_DROP=2 (capacity without dropping) is not implemented; use HL_TOKEN_DROP=0 (dropless) or 1 (drop)" ;;
    *) die "HL_TOKEN_DROP must be 0 (dropless) or 1 (capacity factor 1.0, drop), got '$TOKEN_DROP'" ;;
esac
case "$PROFILE_TYPE" in "" | pt | pt-full | hltv) ;; *) die "HL_PROFILE_TYPE must be pt, pt-full or hltv, got '$PROFILE_TYPE'" ;; esac
case "$TRANSFORMER_IMPL" in local | transformer_engine) ;; *) die "HL_TRANSFORMER_IMPL must be local or transformer_engine, got '$TRANSFORMER_IMPL'" ;; esac
for v in SAVE_DISTRIB_OPTIMIZER_METHOD:HL_SAVE_DISTRIB_OPTIMIZER_METHOD LOAD_DISTRIB_OPTIMIZER_METHOD:HL_LOAD_DISTRIB_OPTIMIZER_METHOD; do
    var=${v%%:*}
    case "${!var}" in parallel_node_0 | parallel_multi_node | serial_per_node | serial_per_dp_groups) ;;
        *) die "${v#*:} must be parallel_node_0, parallel_multi_node, serial_per_node or serial_per_dp_groups, got '${!var}'" ;; esac
done
[[ "$CKPT_FORMAT" == torch_dist ]] || die "HL_CKPT_FORMAT: only torch_dist is implemented, got '$CKPT_FORMAT'"
[[ "$DROPOUT" =~ ^0*\.?0*$ ]] || die "HL_DROPOUT must be 0 (the DeepSeek model has no dropout layers), got '$DROPOUT'"

# Device: decided by the ranks at start-up (--device auto: hpu, else cuda, else cpu), never by the
# launching node, which may have no accelerator at all. HL_USE_LAZY_MODE=1 means HPU. With auto
# the HPU settings (PT_HPU_LAZY_MODE, the fused-kernel flags) are passed: off HPU they do nothing.
[[ "$DEVICE" != auto || "$USE_LAZY_MODE" != 1 ]] || DEVICE=hpu
[[ "$DEVICE" == hpu || "$USE_LAZY_MODE" == 0 ]] ||
    die "HL_USE_LAZY_MODE=1 is HPU-only (HL_DEVICE=$DEVICE)"
case "$DEVICE" in hpu) BACKEND=hccl ;; cuda) BACKEND=nccl ;; cpu) BACKEND=gloo ;; auto) BACKEND="" ;; esac
HPU_SETTINGS=0
[[ "$DEVICE" != hpu && "$DEVICE" != auto ]] || HPU_SETTINGS=1
if [[ -z "$OPTIMIZER" ]]; then
    # fusedadamw is the original's default; off HPU it runs the same AdamW as adam
    if ((HPU_SETTINGS == 1)); then OPTIMIZER=fusedadamw; else OPTIMIZER=adam; fi
fi
case "$OPTIMIZER" in adam | fusedadamw) ;; *) die "HL_OPTIMIZER must be adam or fusedadamw, got '$OPTIMIZER'" ;; esac

# Layout.
NUM_DEVICES=$((NUM_NODES * DEVICES_PER_NODE))
((NUM_DEVICES == DP * TP * PP)) ||
    die "HL_NUM_NODES x HL_DEVICES_PER_NODE ($NUM_NODES x $DEVICES_PER_NODE = $NUM_DEVICES) must equal HL_DP x HL_TP x HL_PP ($DP x $TP x $PP = $((DP * TP * PP)))"
(((DP * TP) % EP == 0)) || die "HL_EP ($EP) must divide HL_DP x HL_TP ($DP x $TP = $((DP * TP))): experts are split inside the data-parallel ranks of a stage"
((NUM_EXPERTS % EP == 0)) || die "HL_EP ($EP) must divide the number of experts ($NUM_EXPERTS; HL_NUM_EXPERTS)"
((TOPK <= NUM_EXPERTS)) || die "HL_MOE_TOPK ($TOPK) must not exceed the number of experts ($NUM_EXPERTS)"
((NUM_HEADS % TP == 0)) || die "HL_TP ($TP) must divide the number of attention heads ($NUM_HEADS; HL_NUM_HEADS)"
((SEQ_LEN % TP == 0 || SEQ_PARALLEL == 0 || TP == 1)) || die "HL_SEQ_LEN ($SEQ_LEN) must be divisible by HL_TP ($TP) with HL_SEQ_PARALLEL=1"
((MOE_SKIP_FIRST_LAYERS < NUM_LAYERS)) || die "HL_MOE_SKIP_FIRST_LAYERS ($MOE_SKIP_FIRST_LAYERS) must be less than HL_NUM_LAYERS ($NUM_LAYERS)"
if ((FISRT_PP_STAGE_LAYERS == 0 && LAST_PP_STAGE_LAYERS == 0)); then
    ((NUM_LAYERS % PP == 0)) ||
        die "HL_NUM_LAYERS ($NUM_LAYERS) must be divisible by HL_PP ($PP), or set HL_FISRT_PP_STAGE_LAYERS / HL_LAST_PP_STAGE_LAYERS"
else
    ((PP > 1)) || die "HL_FISRT_PP_STAGE_LAYERS / HL_LAST_PP_STAGE_LAYERS need HL_PP > 1"
    rest_stages=$PP
    ((FISRT_PP_STAGE_LAYERS > 0)) && rest_stages=$((rest_stages - 1))
    ((LAST_PP_STAGE_LAYERS > 0)) && rest_stages=$((rest_stages - 1))
    rest_layers=$((NUM_LAYERS - FISRT_PP_STAGE_LAYERS - LAST_PP_STAGE_LAYERS))
    if ((rest_stages == 0)); then
        ((rest_layers == 0)) ||
            die "HL_FISRT_PP_STAGE_LAYERS + HL_LAST_PP_STAGE_LAYERS ($FISRT_PP_STAGE_LAYERS + $LAST_PP_STAGE_LAYERS) must equal HL_NUM_LAYERS ($NUM_LAYERS) with HL_PP=2"
    else
        ((rest_layers > 0 && rest_layers % rest_stages == 0)) ||
            die "HL_NUM_LAYERS ($NUM_LAYERS) minus HL_FISRT_PP_STAGE_LAYERS ($FISRT_PP_STAGE_LAYERS) and HL_LAST_PP_STAGE_LAYERS ($LAST_PP_STAGE_LAYERS) leaves $rest_layers layers, not divisible over the other $rest_stages stages of HL_PP=$PP"
    fi
fi
((GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) == 0)) ||
    die "HL_GBS ($GLOBAL_BATCH_SIZE) must be divisible by HL_MICRO_BATCH x HL_DP ($MICRO_BATCH_SIZE x $DP = $((MICRO_BATCH_SIZE * DP)))"
if [[ "$ENABLE_SHARED_EXPERT_OVERLAP" == 1 && "$TOKEN_DISPATCHER_TYPE" != alltoall ]]; then
    warn "HL_ENABLE_SHARED_EXPERT_OVERLAP=1 has no effect with HL_TOKEN_DISPATCHER_TYPE=$TOKEN_DISPATCHER_TYPE (alltoall only)"
fi
if ((HNIC == 1 && NUM_NODES <= 1)); then die "HL_HNIC=1 (host NIC scale-out) needs HL_NUM_NODES > 1"; fi
if [[ "$LAUNCHER_TYPE" == torchrun ]]; then
    if ((NUM_NODES > 1 && TORCHRUN_MULTINODE != 1)); then
        die "HL_NUM_NODES=$NUM_NODES with torchrun needs HL_TORCHRUN_MULTINODE=1 (then run this script once per node with HL_TORCHRUN_NODE_RANK)"
    fi
    ((TORCHRUN_NODE_RANK < NUM_NODES)) || die "HL_TORCHRUN_NODE_RANK ($TORCHRUN_NODE_RANK) must be less than HL_NUM_NODES ($NUM_NODES)"
    # Each node runs this script: a derived results folder would carry each node's own start time,
    # and the ranks of different nodes would save their parts of a checkpoint to different folders.
    if ((NUM_NODES > 1)) && [[ -z "$OUTPUT_DIR" && -z "$CHECKPOINTS_DIR" ]]; then
        die "HL_TORCHRUN_MULTINODE=1 needs HL_RESULTS_DIR (or HL_CHECKPOINTS_DIR), the same shared folder on every node"
    fi
fi
if [[ -n "$HL_PPR" && -z "$HL_PE" ]]; then die "HL_PPR needs HL_PE (mapping ppr:\$HL_PPR:socket:PE=\$HL_PE)"; fi
[[ -z "$HL_PE" ]] || is_int HL_PE "$HL_PE" 1
[[ -z "$HL_PPR" ]] || is_int HL_PPR "$HL_PPR" 1

# Data and tokenizer.
DATA_PATH_ARGS=()
if [[ -n "$DATA_PATH_LIST" ]]; then
    read -r -a DATA_PATH_ARGS <<<"$DATA_PATH_LIST"  # "prefix" or "w1 prefix1 w2 prefix2 ..."
else
    DATA_PATH_ARGS=("$DATA_DIR/$DATA_FILE_PREFIX")
fi
if [[ "$MOCK_DATA" != 1 && "$CHECK_PATHS" == 1 ]]; then
    data_var=HL_DATA_DIR_ROOT/HL_DATA_FILE_PREFIX
    [[ -z "$DATA_PATH_LIST" ]] || data_var=HL_DATA_PATH
    for p in "${DATA_PATH_ARGS[@]}"; do
        [[ "$p" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] && continue  # a blend weight
        for ext in bin idx; do
            [[ -f "$p.$ext" ]] || die "$data_var: data file '$p.$ext' not found (or set HL_MOCK_DATA=1)"
        done
    done
fi
TOKENIZER_ARGS=()
case "$TOKENIZER_TYPE" in
    HuggingFaceTokenizer | GPTSentencePieceTokenizer | Llama2Tokenizer | Llama3Tokenizer | DeepSeekV2Tokenizer)
        [[ "$CHECK_PATHS" == 0 || -e "$TOKENIZER_MODEL" ]] ||
            die "HL_TOKENIZER_MODEL: tokenizer '$TOKENIZER_MODEL' not found (default: HL_DATA_DIR_ROOT)"
        TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
        [[ "$TOKENIZER_TYPE" != DeepSeekV2Tokenizer ]] || TOKENIZER_ARGS+=(--extra-vocab-size "$EXTRA_VOCAB_SIZE")
        ;;
    GPT2BPETokenizer)
        for f in gpt2-vocab.json gpt2-merges.txt; do
            [[ "$CHECK_PATHS" == 0 || -f "$DATA_DIR/$f" ]] || die "HL_TOKENIZER_TYPE=GPT2BPETokenizer needs '$DATA_DIR/$f' (HL_DATA_DIR_ROOT)"
        done
        TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$DATA_DIR/gpt2-vocab.json" --merge-file "$DATA_DIR/gpt2-merges.txt")
        ;;
    NullTokenizer)
        [[ -n "$VOCAB_SIZE" ]] || die "HL_TOKENIZER_TYPE=NullTokenizer needs HL_VOCAB_SIZE"
        TOKENIZER_ARGS=(--tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
        ;;
    *) die "HL_TOKENIZER_TYPE must be HuggingFaceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, Llama3Tokenizer, DeepSeekV2Tokenizer, GPT2BPETokenizer or NullTokenizer, got '$TOKENIZER_TYPE'" ;;
esac
[[ -z "$VOCAB_SIZE" || "$TOKENIZER_TYPE" == NullTokenizer ]] || die "HL_VOCAB_SIZE is only for HL_TOKENIZER_TYPE=NullTokenizer (other tokenizers set the vocabulary)"

# ================================================================== outputs
RUNTIME=$(date +"%Y%m%d_%H%M.%S.%N")
if [[ -z "$OUTPUT_DIR" ]]; then
    OUTPUT_DIR=$OUTPUT_DIR_PREFIX/out/$MODEL_DIR_NAME/${DTYPE}_${TRANSFORMER_IMPL}_${EXP_NAME}_nl${NUM_LAYERS}_gb${GLOBAL_BATCH_SIZE}_mb${MICRO_BATCH_SIZE}_sp${SEQ_PARALLEL}_D${DP}_T${TP}_P${PP}_E${EP}_devices${NUM_DEVICES}_${RUNTIME}
fi
CHECKPOINTS_DIR=${CHECKPOINTS_DIR:-$OUTPUT_DIR/checkpoints}
LOAD_DIR=${LOAD_DIR:-$CHECKPOINTS_DIR}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}
LOG_FILE=$OUTPUT_DIR/log_${EXP_NAME}_${RUNTIME}.txt

# Multi-node mpirun hostfile: HL_HOSTSFILE, else one generated from /etc/mpi/hostfile
# (HL_DEFAULT_HOSTSFILE) with HL_DEVICES_PER_NODE slots per host, written into the results folder.
GENERATED_HOSTSFILE=""
MASTER_ADDR=localhost
if [[ "$LAUNCHER_TYPE" == mpirun ]] && ((NUM_NODES > 1)); then
    if [[ -n "$HOSTSFILE" ]]; then
        [[ -f "$HOSTSFILE" ]] || die "HL_HOSTSFILE: '$HOSTSFILE' not found"
        hosts_source=$HOSTSFILE
    else
        [[ -f "$DEFAULT_HOSTSFILE" ]] || die "HL_HOSTSFILE must be set for HL_NUM_NODES=$NUM_NODES with mpirun ($DEFAULT_HOSTSFILE not available)"
        hosts_source=$DEFAULT_HOSTSFILE
        HOSTSFILE=$OUTPUT_DIR/hostsfile
        GENERATED_HOSTSFILE=$HOSTSFILE
    fi
    mapfile -t HOSTS < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$hosts_source")
    ((${#HOSTS[@]} >= NUM_NODES)) ||
        die "HL_HOSTSFILE: '$hosts_source' lists ${#HOSTS[@]} host(s), HL_NUM_NODES is $NUM_NODES"
    MASTER_ADDR=${HOSTS[0]}
elif [[ "$LAUNCHER_TYPE" == torchrun ]]; then
    MASTER_ADDR=$TORCHRUN_MASTER_ADDR
fi

# ================================================================== command
# Per-rank logs (stdout and stderr of every rank, also shown on the console): mpirun
# --output-filename (<logs>/1/rank.N/stdout|stderr), torchrun --log-dir --tee
# (<logs>/<run id>/attempt_0/<local rank>/stdout.log|stderr.log; console lines prefixed [defaultN]:).
LOG_DIR=$OUTPUT_DIR/logs
# Seconds the ranks get between SIGTERM and SIGKILL when the job is stopped (a signal to this
# script, or a failed rank): with HL_EXIT_SIGNAL_HANDLER=1 they save a checkpoint in that time.
GRACE_S=$SHUTDOWN_TIMEOUT
((EXIT_SIGNAL_HANDLER == 0)) || GRACE_S=${GRACE_S:-30}

# Variables every rank gets (mpirun: -x NAME=value; torchrun: exported here), then variables for
# torchrun itself.
RANK_ENV=()
((HPU_SETTINGS == 0)) || RANK_ENV+=("PT_HPU_LAZY_MODE=$USE_LAZY_MODE")
if ((HNIC == 1)); then
    # HL_<name> first, then <name> from this environment, then the default.
    RANK_ENV+=("HCCL_OVER_OFI=${HL_HCCL_OVER_OFI:-${HCCL_OVER_OFI:-1}}"
        "HCCL_GAUDI_DIRECT=${HL_HCCL_GAUDI_DIRECT:-${HCCL_GAUDI_DIRECT:-1}}"
        "FI_PROVIDER=${HL_FI_PROVIDER:-${FI_PROVIDER:-verbs}}")
fi
RANK_ENV+=(${FORWARD_ENV[@]+"${FORWARD_ENV[@]}"})
TOOL_ENV=()
if [[ "$LAUNCHER_TYPE" == torchrun && -n "$GRACE_S" ]]; then
    TOOL_ENV+=("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$GRACE_S")
fi
# This checkout first on PYTHONPATH (once), ahead of e.g. another Megatron-LM checkout.
python_path=$REPO_ROOT
IFS=':' read -r -a path_entries <<<"${PYTHONPATH:-}"
for entry in ${path_entries[@]+"${path_entries[@]}"}; do
    [[ "$entry" == "$REPO_ROOT" || "$entry" == "$REPO_ROOT/" ]] || python_path+=":$entry"
done
export PYTHONPATH=$python_path

LAUNCH=()
if [[ "$LAUNCHER_TYPE" == mpirun ]]; then
    LAUNCH=("$MPIRUN_BIN" --allow-run-as-root --mca plm_rsh_args "-p$SSH_PORT")
    [[ -z "${MPI_ROOT:-}" ]] || LAUNCH+=(--prefix "$MPI_ROOT")
    LAUNCH+=(-np "$NUM_DEVICES")
    MAP_BY=""
    [[ -n "$HL_PE" ]] && MAP_BY="socket:PE=$HL_PE"
    [[ -n "$HL_PE" && -n "$HL_PPR" ]] && MAP_BY="ppr:$HL_PPR:socket:PE=$HL_PE"
    if [[ -n "$MAP_BY" ]]; then
        LAUNCH+=(--bind-to core --rank-by slot --report-bindings --map-by "$MAP_BY")
    else
        LAUNCH+=(--bind-to none)
    fi
    ((NUM_NODES == 1)) || LAUNCH+=(--hostfile "$HOSTSFILE")
    [[ -z "$GRACE_S" ]] || LAUNCH+=(--mca odls_base_sigkill_timeout "$GRACE_S")
    LAUNCH+=(--output-filename "$LOG_DIR")
    ((HNIC == 0)) || LAUNCH+=(-x LD_LIBRARY_PATH)
    for kv in ${RANK_ENV[@]+"${RANK_ENV[@]}"}; do LAUNCH+=(-x "$kv"); done
    LAUNCH+=(-x "PYTHONPATH=$PYTHONPATH" -x "MASTER_ADDR=$MASTER_ADDR" -x "MASTER_PORT=$MASTER_PORT")
else
    LAUNCH=("$TORCHRUN_BIN" --nnodes "$NUM_NODES" --nproc_per_node "$DEVICES_PER_NODE" --no-python
        --node_rank "$TORCHRUN_NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        --log-dir "$LOG_DIR" --tee 3)
fi

ARGS=("$PYTHON_BIN" "$REPO_ROOT/pretrain_gpt.py" --device "$DEVICE")
[[ -z "$BACKEND" ]] || ARGS+=(--distributed-backend "$BACKEND")
ARGS+=(--transformer-impl "$TRANSFORMER_IMPL")
[[ -z "$MODEL" ]] || ARGS+=(--model-preset "$MODEL")
ARGS+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP")
((FISRT_PP_STAGE_LAYERS == 0)) || ARGS+=(--decoder-first-pipeline-num-layers "$FISRT_PP_STAGE_LAYERS")
((LAST_PP_STAGE_LAYERS == 0)) || ARGS+=(--decoder-last-pipeline-num-layers "$LAST_PP_STAGE_LAYERS")
((SEQ_PARALLEL == 0 || TP == 1)) || ARGS+=(--sequence-parallel)
ARGS+=(--seq-length "$SEQ_LEN")
[[ -n "$CKPT_INFO" ]] || ARGS+=(--max-position-embeddings "$SEQ_LEN")

# Model flags: `model_flag VAR FLAG VALUE` passes FLAG VALUE when the DeepSeek-V3 values are the
# defaults (no HL_MODEL, no checkpoint to continue from) or when the variable is set explicitly (it
# overrides the preset; with a checkpoint it must equal the checkpoint's value).
V3_DEFAULTS=0
[[ -n "$MODEL" || -n "$CKPT_INFO" ]] || V3_DEFAULTS=1
model_flag() {
    if ((V3_DEFAULTS == 1)) || [[ -n "${!1:-}" ]]; then ARGS+=("$2" "$3"); fi
}
# With a checkpoint, its main sizes (the parser checks the layout with them; equal to the
# checkpoint's, --use-checkpoint-args takes them silently and the rest of the shape from it).
if [[ -n "$CKPT_INFO" ]]; then
    ARGS+=(--num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS"
        --num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK"
        --moe-layer-freq "([0]*$MOE_SKIP_FIRST_LAYERS+[1]*$((NUM_LAYERS - MOE_SKIP_FIRST_LAYERS)))"
        --moe-router-num-groups "$CKPT_GROUPS" --moe-router-group-topk "$CKPT_GROUP_TOPK")
    for v in HL_NUM_LAYERS HL_HIDDEN_SIZE HL_NUM_HEADS HL_NUM_EXPERTS HL_MOE_TOPK HL_MOE_SKIP_FIRST_LAYERS; do
        unset "$v"  # passed above
    done
fi
model_flag HL_NUM_LAYERS --num-layers "$NUM_LAYERS"
model_flag HL_HIDDEN_SIZE --hidden-size "$HIDDEN_SIZE"
model_flag HL_FFN_HIDDEN_SIZE --ffn-hidden-size "$FFN_HIDDEN_SIZE"
model_flag HL_NUM_HEADS --num-attention-heads "$NUM_HEADS"
model_flag HL_NUM_EXPERTS --num-experts "$NUM_EXPERTS"
model_flag HL_MOE_TOPK --moe-router-topk "$TOPK"
model_flag HL_MOE_FFN_HIDDEN_SIZE --moe-ffn-hidden-size "$EXPERT_FFN_HIDDEN_SIZE"
model_flag HL_SHARED_EXPERT_FFN_HIDDEN_SIZE --moe-shared-expert-intermediate-size "$SHARED_EXPERT_FFN_HIDDEN_SIZE"
if { ((V3_DEFAULTS == 1)) || [[ -n "${HL_Q_LORA_RANK:-}" ]]; } && [[ "$Q_LORA_RANK" != 0 ]]; then
    ARGS+=(--q-lora-rank "$Q_LORA_RANK")  # HL_Q_LORA_RANK=0: plain q projection (V2-Lite style)
fi
model_flag HL_KV_LORA_RANK --kv-lora-rank "$KV_LORA_RANK"
model_flag HL_QK_HEAD_DIM --qk-head-dim "$QK_HEAD_DIM"
model_flag HL_QK_POS_EMB_HEAD_DIM --qk-pos-emb-head-dim "$QK_POS_EMB_HEAD_DIM"
model_flag HL_V_HEAD_DIM --v-head-dim "$V_HEAD_DIM"
if ((V3_DEFAULTS == 1)) || [[ -n "${HL_MOE_SKIP_FIRST_LAYERS:-}" || -n "${HL_NUM_LAYERS:-}" ]]; then
    ARGS+=(--moe-layer-freq "([0]*$MOE_SKIP_FIRST_LAYERS+[1]*$((NUM_LAYERS - MOE_SKIP_FIRST_LAYERS)))")
fi
if ((V3_DEFAULTS == 1)); then
    # DeepSeek-V3 router, MLA and architecture (the original script's fixed values).
    ARGS+=(--multi-latent-attention --qk-layernorm --position-embedding-type rope --rotary-base 10000
        --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights --disable-bias-linear
        --moe-router-load-balancing-type seq_aux_loss --moe-router-score-function sigmoid
        --moe-router-topk-scaling-factor 2.5 --moe-router-num-groups 8 --moe-router-group-topk 4
        --moe-router-enable-expert-bias --moe-router-bias-update-rate 0.001)
fi
if [[ -z "$MODEL" || -n "${HL_AUX_LOSS_COEFF:-}" ]]; then ARGS+=(--moe-aux-loss-coeff "$AUX_LOSS_COEFF"); fi
[[ -z "$MTP_NUM_LAYERS" ]] || ARGS+=(--mtp-num-layers "$MTP_NUM_LAYERS")
[[ -z "$MTP_LOSS_SCALING" ]] || ARGS+=(--mtp-loss-scaling-factor "$MTP_LOSS_SCALING")
ARGS+=(--attention-dropout "$DROPOUT" --hidden-dropout "$DROPOUT")
# A preset's own initialisation (its config's initializer_range) unless HL_INIT_STD says otherwise.
if ((V3_DEFAULTS == 1)) || [[ -n "${HL_INIT_STD:-}" ]]; then ARGS+=(--init-method-std "$INIT_STD"); fi

ARGS+=(--moe-token-dispatcher-type "$TOKEN_DISPATCHER_TYPE")
((MOE_GROUPED_GEMM == 0)) || ARGS+=(--moe-grouped-gemm)
if [[ "$TOKEN_DISPATCHER_TYPE" == alltoall ]] && ((ENABLE_SHARED_EXPERT_OVERLAP == 1)); then
    ARGS+=(--moe-shared-expert-overlap)
fi
if [[ "$TOKEN_DROP" == 1 ]]; then
    ARGS+=(--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity --moe-token-drop-policy probs)
fi
if ((MOE_TOKEN_DISTRIBUTION_LOGGING > 0)); then
    ARGS+=(--moe-token-distribution-logging)
    ((MOE_TOKEN_DISTRIBUTION_LOGGING == 1)) || ARGS+=(--moe-token-distribution-logging-to-console)
    [[ -z "$MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL" ]] ||
        ARGS+=(--moe-token-distribution-logging-interval "$MOE_TOKEN_DISTRIBUTION_LOGGING_INTERVAL")
fi

# Recompute: HL_CKP_ACT 1 full / 2 selective; HL_MOE_LAYER_RECOMPUTE adds the moe module.
if ((CKP_ACT == 1)); then
    ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers "$RECOMPUTE_NUM_LAYERS")
    ((MOE_LAYER_RECOMPUTE == 0)) || warn "HL_MOE_LAYER_RECOMPUTE=1 is ignored with HL_CKP_ACT=1 (full recompute covers it)"
elif ((CKP_ACT == 2)); then
    ARGS+=(--recompute-granularity selective)
    ((MOE_LAYER_RECOMPUTE == 0)) || ARGS+=(--recompute-modules core_attn moe)
elif ((MOE_LAYER_RECOMPUTE == 1)); then
    ARGS+=(--recompute-granularity selective --recompute-modules moe)
fi

# Optimizer and schedule (DeepSeek-V3 paper values).
ARGS+=(--optimizer "$OPTIMIZER" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-iters "$LR_DECAY_ITER" --adam-beta1 0.9 --adam-beta2 0.95
    --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0)
[[ "$DTYPE" == fp32 ]] || ARGS+=(--bf16)
[[ -z "$SEED" ]] || ARGS+=(--seed "$SEED")
ARGS+=(--micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS"
    --exit-interval "$EXIT_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --log-interval "$LOG_INTERVAL" --log-throughput --tensorboard-dir "$TENSORBOARD_DIR"
    --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --distributed-timeout-minutes 60)
if ((USE_DISTRIBUTED_OPTIMIZER == 1)); then
    ARGS+=(--use-distributed-optimizer --save-distrib-optimizer-method "$SAVE_DISTRIB_OPTIMIZER_METHOD"
        --load-distrib-optimizer-method "$LOAD_DISTRIB_OPTIMIZER_METHOD")
fi
((ENABLE_GRAD_REDUCE_OVERLAP == 0)) || ARGS+=(--overlap-grad-reduce)
((ENABLE_PARAM_GATHER_OVERLAP == 0)) || ARGS+=(--overlap-param-gather)
((DETERMINISTIC_MODE == 0)) || ARGS+=(--deterministic-mode)

# Device-specific flags: HPU kernels and lazy mode unless the device is cpu or cuda.
ARGS+=("--use-torch-compile=$USE_TORCH_COMPILE" "--use-torch-compiled-autograd=$USE_TORCH_COMPILED_AUTOGRAD")
if ((HPU_SETTINGS == 1)); then
    ARGS+=(--use-lazy-mode "$USE_LAZY_MODE" --use-fused-sdpa "$USE_FUSED_SDPA"
        --use-fused-sdpa-with-recompute "$USE_FUSED_SDPA_WITH_RECOMPUTE"
        --use-fast-softmax "$USE_FAST_SOFTMAX" --use-fused-rmsnorm "$USE_FUSED_RMSNORM")
fi

# Data and tokenizer.
if [[ "$MOCK_DATA" == 1 ]]; then
    ARGS+=(--mock-data)
else
    ARGS+=(--data-path "${DATA_PATH_ARGS[@]}")
fi
[[ -z "$SPLIT" ]] || ARGS+=(--split "$SPLIT")
[[ -z "$DATA_CACHE_DIR" ]] || ARGS+=(--data-cache-path "$DATA_CACHE_DIR")
ARGS+=(--num-workers "$NUM_WORKERS" "${TOKENIZER_ARGS[@]}")

# Checkpoints: --use-checkpoint-args only when there is a checkpoint to take the model from.
if [[ -n "$CKPT_INFO" ]]; then
    ARGS+=(--load "$LOAD_DIR" --use-checkpoint-args)
elif [[ -n "${HL_LOAD_DIR:-}" ]] || ((CHECKPOINT_SAVE == 1)); then
    ARGS+=(--load "$LOAD_DIR")  # a restart finds this run's own checkpoints here
fi
if ((CHECKPOINT_SAVE == 1)); then
    ARGS+=(--save "$CHECKPOINTS_DIR" --save-interval "$SAVE_INTERVAL" --ckpt-format "$CKPT_FORMAT")
    ((VERIFY_CKPT == 0)) || ARGS+=(--verify-checkpoint --verify-checkpoint-model-type DEEPSEEK)
fi
[[ -z "$KILL_SWITCH_FILE" ]] || ARGS+=(--kill-switch-file "$KILL_SWITCH_FILE")
((EXIT_SIGNAL_HANDLER == 0)) || ARGS+=(--exit-signal-handler)
if [[ -n "$PROFILE_TYPE" ]]; then
    ARGS+=(--profile-type "$PROFILE_TYPE" --profile-step-start "$PROFILE_STEP_START" --profile-step-end "$PROFILE_STEP_END")
    if [[ -n "$PROFILE_RANKS" ]]; then
        read -r -a profile_ranks <<<"${PROFILE_RANKS//,/ }"
        ARGS+=(--profile-ranks "${profile_ranks[@]}")
    fi
fi

CMD=("${LAUNCH[@]}" "${ARGS[@]}")

# ================================================================== report, check, launch
print_settings() {
    echo "# pretrain_deepseek.sh resolved settings"
    local device=$DEVICE
    [[ "$DEVICE" != auto ]] || device="auto (each rank picks hpu, else cuda, else cpu)"
    echo "launcher=$LAUNCHER_TYPE nodes=$NUM_NODES devices_per_node=$DEVICES_PER_NODE world_size=$NUM_DEVICES device=$device${BACKEND:+ backend=$BACKEND}"
    echo "layout: DP=$DP TP=$TP PP=$PP EP=$EP seq_parallel=$SEQ_PARALLEL micro_batch=$MICRO_BATCH_SIZE global_batch=$GLOBAL_BATCH_SIZE seq_len=$SEQ_LEN"
    if [[ -n "$CKPT_INFO" ]]; then
        echo "model: from the checkpoint in $CKPT_PATH (iteration $CKPT_ITERATION, --use-checkpoint-args) preset=$MODEL layers=$NUM_LAYERS dense_first=$MOE_SKIP_FIRST_LAYERS experts=$NUM_EXPERTS topk=$TOPK heads=$NUM_HEADS hidden=$CKPT_HIDDEN mtp=$CKPT_MTP"
    else
        echo "model: ${MODEL:-deepseek-v3 (explicit flags)} layers=$NUM_LAYERS dense_first=$MOE_SKIP_FIRST_LAYERS experts=$NUM_EXPERTS topk=$TOPK heads=$NUM_HEADS mtp=${MTP_NUM_LAYERS:-$P_MTP}"
    fi
    echo "moe: dispatcher=$TOKEN_DISPATCHER_TYPE token_drop=$TOKEN_DROP grouped_gemm=$MOE_GROUPED_GEMM"
    echo "master: $MASTER_ADDR:$MASTER_PORT${HOSTSFILE:+ hostsfile=$HOSTSFILE}${GENERATED_HOSTSFILE:+ (generated from $DEFAULT_HOSTSFILE)}"
    [[ "$LAUNCHER_TYPE" == mpirun ]] || echo "env for ranks (exported): ${RANK_ENV[*]:-(none)}"
    echo "results: $OUTPUT_DIR"
    echo "checkpoints: $CHECKPOINTS_DIR (load: $LOAD_DIR)"
    echo "tensorboard: $TENSORBOARD_DIR"
    echo "per-rank logs: $LOG_DIR"
    ((EXIT_SIGNAL_HANDLER == 0)) || echo "on SIGTERM / Ctrl-C: the ranks save, then exit (grace ${GRACE_S} s)"
    ((REDIRECT_LOGS == 0)) || echo "log: $LOG_FILE"
}

# The exact command (shell-quoted; torchrun's variables as an `env` prefix).
print_command() {
    echo "# command"
    if [[ "$LAUNCHER_TYPE" == torchrun ]] && ((${#TOOL_ENV[@]} + ${#RANK_ENV[@]} > 0)); then
        printf 'env '
        printf '%q ' ${TOOL_ENV[@]+"${TOOL_ENV[@]}"} ${RANK_ENV[@]+"${RANK_ENV[@]}"}
    fi
    printf '%q ' "${CMD[@]}"
    echo
}

# Pre-launch check by the training code (megatron/training/planning/launch_check.py): the command
# line through its own parser (parse_args), then the memory plan of the layout on the device model:
# HL_PLAN_DEVICE_TYPE, else cpu for HL_DEVICE=cpu, else the model hl-smi / nvidia-smi name on this
# node (none: no memory check). Modes: strict (a real launch; HL_PRECHECK=1 also in a dry run)
# stops on invalid flags and on a layout predicted not to fit (HL_PLAN_OVERRIDE=1 launches it
# anyway); report (a dry run) prints the plan and what a launch would do; off (HL_PRECHECK=0).
if [[ "$PRECHECK" == 0 ]]; then
    CHECK_MODE=off
elif [[ "$PRECHECK" == 1 || "$DRY_RUN" == 0 ]]; then
    CHECK_MODE=strict
else
    CHECK_MODE=report
fi
CHECK_ARGS=(--num-devices "$NUM_DEVICES" --devices-per-node "$DEVICES_PER_NODE")
((CHECK_PATHS == 0)) || CHECK_ARGS+=(--check-paths)
if [[ -n "$PLAN_DEVICE_TYPE" ]]; then
    CHECK_ARGS+=(--device-type "$PLAN_DEVICE_TYPE")
elif [[ "$DEVICE" == cpu ]]; then
    CHECK_ARGS+=(--device-type cpu)
else
    CHECK_ARGS+=(--detect "$DEVICE")
fi
[[ -z "$PLAN_DEVICE_MEMORY_GB" ]] || CHECK_ARGS+=(--device-memory-gb "$PLAN_DEVICE_MEMORY_GB")
((DRY_RUN == 0)) || CHECK_ARGS+=(--print-plan)
((PLAN_OVERRIDE == 0)) || CHECK_ARGS+=(--nearest 0)
PLAN_TEXT=""  # the plan (printed by a dry run)
PLAN_LINE=""  # one line after it; a launch prints it when the layout fits
PLAN_NOTE=""  # a launch without the memory check: why (one line)
PLAN_WARN=""  # a layout that does not fit, launched with HL_PLAN_OVERRIDE=1 (one line)
if [[ "$CHECK_MODE" == off ]]; then
    PLAN_LINE="no plan: HL_PRECHECK=0 skips the pre-launch check"
else
    check_rc=0
    check_out=$("$PYTHON_BIN" "$REPO_ROOT/megatron/training/planning/launch_check.py" "${CHECK_ARGS[@]}" -- "${ARGS[@]:2}") ||
        check_rc=$?
    check_line=$(tail -n 1 <<<"$check_out")
    PLAN_TEXT=$(sed '$d' <<<"$check_out")
    case "$check_rc:$check_line" in
        0:*) PLAN_LINE="memory check: $check_line" ;;
        1:"error: --device-type: "*) die "HL_PLAN_DEVICE_TYPE: ${check_line#error: --device-type: }" ;;
        1:"error: --device-memory-gb "*) die "HL_PLAN_DEVICE_MEMORY_GB ${check_line#error: --device-memory-gb }" ;;
        1:"error: the training flags are invalid: "*)
            [[ "$CHECK_MODE" == report ]] || die "HL_PRECHECK: ${check_line#error: } (HL_PRECHECK=0 skips this check)"
            PLAN_LINE="no plan: ${check_line#error: }" ;;
        3:*)
            if ((PLAN_OVERRIDE == 1)); then
                PLAN_WARN="HL_PLAN_OVERRIDE=1: launching although the layout $check_line"
            else
                [[ "$CHECK_MODE" == report ]] || die "the layout $check_line; HL_PLAN_OVERRIDE=1 launches it anyway"
                PLAN_LINE="a launch stops here: the layout $check_line; HL_PLAN_OVERRIDE=1 launches it anyway"
            fi ;;
        4:"no memory plan: the device model is unknown"*)
            PLAN_LINE="$check_line; the memory check needs HL_PLAN_DEVICE_TYPE"
            PLAN_NOTE="$check_line; launching without the memory check (HL_PLAN_DEVICE_TYPE enables it)" ;;
        4:*)
            PLAN_LINE=$check_line
            PLAN_NOTE="$check_line; launching without the memory check" ;;
        *)
            why=${check_line#error: }
            why=${why:-exit status $check_rc}
            [[ "$CHECK_MODE" == report ]] ||
                die "HL_PRECHECK: HL_PYTHON ($PYTHON_BIN) cannot run the check ($why); set HL_PYTHON, or HL_PRECHECK=0 to skip the check"
            PLAN_LINE="no plan: HL_PYTHON ($PYTHON_BIN) cannot run the check ($why)" ;;
    esac
fi

if ((DRY_RUN == 1)); then
    print_settings
    print_command
    echo "# plan"
    [[ -z "$PLAN_TEXT" ]] || printf '%s\n' "$PLAN_TEXT"
    [[ -z "$PLAN_LINE" ]] || printf '%s\n' "$PLAN_LINE"
    [[ -z "$PLAN_WARN" ]] || warn "$PLAN_WARN"
    exit 0
fi

mkdir -p "$OUTPUT_DIR" "$CHECKPOINTS_DIR" "$TENSORBOARD_DIR" "$LOG_DIR"
if [[ -n "$GENERATED_HOSTSFILE" ]]; then
    awk -v slots="$DEVICES_PER_NODE" '!/^[[:space:]]*(#|$)/ {print $1 " slots=" slots}' "$DEFAULT_HOSTSFILE" >"$GENERATED_HOSTSFILE"
fi

# With HL_REDIRECT_LOGS=1 everything from here on (settings, ranks, launcher) also goes to $LOG_FILE.
# The helper processes below ignore the terminal's signals: they must outlive the ranks' last words.
TEE_PID=""
if ((REDIRECT_LOGS == 1)); then
    exec > >(trap '' INT TERM HUP; exec tee -a -- "$LOG_FILE") 2>&1
    TEE_PID=$!
fi
print_settings
print_command
[[ "$PLAN_LINE" != "memory check: "* ]] || echo "# $PLAN_LINE"
[[ -z "$PLAN_NOTE" ]] || note "$PLAN_NOTE"
[[ -z "$PLAN_WARN" ]] || warn "$PLAN_WARN"
if [[ "$LAUNCHER_TYPE" == torchrun ]]; then
    for kv in ${TOOL_ENV[@]+"${TOOL_ENV[@]}"} ${RANK_ENV[@]+"${RANK_ENV[@]}"}; do export "${kv?}"; done
fi

# The stderr of the launcher tool and of every rank passes through this filter to the console and
# into <logs>/launcher_stderr.log. A user error reported by a rank (pretrain_gpt.py prints
# `error: <message>`) is shown once, with the log folder, and written to <logs>/error.txt; what
# follows it (ranks being stopped, the tool's failure report) goes to the log file only.
ERROR_FILE=$LOG_DIR/error.txt
# torchrun's own traceback when it is stopped by a signal (SignalException) is logged only: the
# launcher has already said why the job stops.
filter_stderr() {
    trap '' INT TERM HUP
    set +e
    local line quiet=0 re='^(\[[A-Za-z_]+[0-9]+\]:)?error: (.*)$'
    local -a traceback=()
    exec 3>>"$LOG_DIR/launcher_stderr.log"
    while IFS= read -r line || [[ -n "$line" ]]; do
        printf '%s\n' "$line" >&3
        ((quiet == 0)) || continue
        if ((${#traceback[@]} > 0)); then
            traceback+=("$line")
            [[ "$line" == [[:space:]]* ]] && continue  # the exception line (not indented) ends it
            [[ "$line" == *SignalException:*signal* ]] || printf '%s\n' "${traceback[@]}" >&2
            traceback=()
        elif [[ "$line" == "Traceback (most recent call last):" ]]; then
            traceback=("$line")
        elif [[ "$line" =~ $re ]]; then
            printf '%s\n' "${BASH_REMATCH[2]}" >"$ERROR_FILE"
            printf 'error: %s (per-rank logs: %s)\n' "${BASH_REMATCH[2]}" "$LOG_DIR" >&2
            quiet=1
        else
            printf '%s\n' "$line" >&2
        fi
    done
    ((${#traceback[@]} == 0)) || printf '%s\n' "${traceback[@]}" >&2
}
exec {filter_fd}> >(filter_stderr)
FILTER_PID=$!

# The job runs in a session of its own, so a Ctrl-C in the terminal reaches only this script,
# which stops the job the same way as SIGTERM: SIGTERM to torchrun / mpirun, which pass it to every
# rank and SIGKILL what is left after the grace time (HL_SHUTDOWN_TIMEOUT).
CHILD=""
STOP_SIGNAL=""
stop_job() {
    if [[ -z "$CHILD" ]]; then exit 130; fi
    if [[ -n "$STOP_SIGNAL" ]]; then
        note "SIG$1 again: the ranks are already being stopped${GRACE_S:+ (at most ${GRACE_S} s)}"
        return
    fi
    STOP_SIGNAL=$1
    if ((EXIT_SIGNAL_HANDLER == 1)); then
        note "SIG$1: stopping every rank; they save a checkpoint first (at most ${GRACE_S} s)"
    else
        note "SIG$1: stopping every rank (HL_EXIT_SIGNAL_HANDLER=1 would save a checkpoint first)"
    fi
    kill -TERM "$CHILD" 2>/dev/null || true
}
trap 'stop_job INT' INT
trap 'stop_job TERM' TERM
trap 'stop_job HUP' HUP
if command -v setsid >/dev/null 2>&1; then
    setsid "${CMD[@]}" 2>&"$filter_fd" {filter_fd}>&- &
else
    "${CMD[@]}" 2>&"$filter_fd" {filter_fd}>&- &
fi
CHILD=$!
rc=0
while :; do
    rc=0
    wait "$CHILD" || rc=$?
    kill -0 "$CHILD" 2>/dev/null || break  # wait returned early for a trapped signal
done
trap - INT TERM HUP

exec {filter_fd}>&-
wait "$FILTER_PID" 2>/dev/null || true
if [[ -f "$ERROR_FILE" ]]; then
    rc=2
elif [[ -n "$STOP_SIGNAL" ]]; then
    case "$STOP_SIGNAL" in INT) rc=130 ;; TERM) rc=143 ;; HUP) rc=129 ;; esac
fi
if [[ -n "$TEE_PID" ]]; then
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true
fi
exit "$rc"
