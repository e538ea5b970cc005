# Part of pretrain_deepseek.sh (sourced by it, not run alone):
# the HL_* settings: what each variable says, with Intel's defaults.
# It uses the helpers (die, warn, note, is_int, is_01, is_num) and variables the launcher defines
# before sourcing it.

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
# Every HL_* variable this script reads (tests check this list against the launcher's source).
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
