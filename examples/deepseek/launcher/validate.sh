# Part of pretrain_deepseek.sh (sourced by it, not run alone):
# validation of the settings; every error is one line naming the variable.
# It uses the helpers (die, warn, note, is_int, is_01, is_num) and variables the launcher defines
# before sourcing it.

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
