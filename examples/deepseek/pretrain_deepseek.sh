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

# The settings, their validation and the command live in launcher/ beside this script, in the
# order they run.
source "$SCRIPT_DIR/launcher/settings.sh"
source "$SCRIPT_DIR/launcher/validate.sh"
source "$SCRIPT_DIR/launcher/command.sh"

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
