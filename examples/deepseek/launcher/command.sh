# Part of pretrain_deepseek.sh (sourced by it, not run alone):
# the output folders and the launch command (the CMD array).
# It uses the helpers (die, warn, note, is_int, is_01, is_num) and variables the launcher defines
# before sourcing it.

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
