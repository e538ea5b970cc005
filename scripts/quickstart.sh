#!/usr/bin/env bash
# Quickstart: train a tiny DeepSeek-V3-shaped MoE model on CPU, end to end, offline.
#
#   bash scripts/quickstart.sh
#
# 1. creates / reuses ./.venv (torch==2.13.0 when it has no torch, then requirements.txt);
# 2. builds an English corpus from the docstrings of this machine's Python standard library
#    (scripts/make_quickstart_corpus.py; nothing is downloaded);
# 3. trains a 4096-token byte-level BPE tokenizer on it (scripts/train_quickstart_tokenizer.py);
# 4. tokenizes the corpus into .bin/.idx with tools/preprocess_data.py;
# 5. runs examples/deepseek/pretrain_deepseek.sh with torchrun on 2 CPU ranks, expert parallel 2,
#    HL_MODEL=tiny (MLA, first layer dense, MoE with a shared expert, MTP 1), saving a checkpoint
#    and TensorBoard logs.
# Everything goes under ./quickstart_out/ (git-ignored). Steps 2-4 are skipped when their output
# exists (delete quickstart_out/ to rebuild). Any HL_* variable set in the environment overrides
# the quickstart's choice (e.g. HL_TRAIN_ITERS=50 bash scripts/quickstart.sh). The schedule follows
# HL_TRAIN_ITERS (default 300): unless set, the learning rate decays over the whole run after a
# warm-up of its first 1/15, the log line comes every tenth of the run (at most every 10
# iterations), validation runs 3 times and checkpoints are saved twice. QUICKSTART_DRY_RUN=1 skips
# steps 2-4 and stops after printing the launcher's settings and command.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
OUT=${QUICKSTART_OUT:-quickstart_out}
case "$OUT" in
    /*) ;;                 # an absolute QUICKSTART_OUT is used as given
    *) OUT=$ROOT/$OUT ;;   # a relative one is taken from the repository root
esac

step() { echo; echo "=== $*"; }

step "1/5 Python environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$VENV/bin/python" -c "import numpy, tokenizers, transformers, tensorboard" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q -r requirements.txt
fi
VPY=$ROOT/$VENV/bin/python
[ -x "$VENV/bin/torchrun" ] || { echo "quickstart: $VENV/bin/torchrun not found (torch install incomplete)" >&2; exit 1; }
mkdir -p "$OUT"

DRY=${QUICKSTART_DRY_RUN:-0}
step "2/5 corpus: Python standard-library docstrings"
CORPUS=$OUT/corpus.jsonl
if [ "$DRY" = 1 ]; then
    echo "dry run: skipped"
elif [ -s "$CORPUS" ]; then
    echo "reusing $CORPUS"
else
    "$VPY" scripts/make_quickstart_corpus.py --output "$CORPUS" --max-mb "${QUICKSTART_CORPUS_MB:-4}"
fi

step "3/5 tokenizer: byte-level BPE, 4096 tokens"
TOKENIZER=$OUT/tokenizer
if [ "$DRY" = 1 ]; then
    echo "dry run: skipped"
elif [ -s "$TOKENIZER/tokenizer.json" ]; then
    echo "reusing $TOKENIZER"
else
    "$VPY" scripts/train_quickstart_tokenizer.py --input "$CORPUS" --output "$TOKENIZER" --vocab-size 4096
fi

step "4/5 preprocessing: tools/preprocess_data.py -> .bin/.idx"
DATA_PREFIX=$OUT/data/corpus
if [ "$DRY" = 1 ]; then
    echo "dry run: skipped"
elif [ -s "${DATA_PREFIX}_text_document.bin" ] && [ -s "${DATA_PREFIX}_text_document.idx" ]; then
    echo "reusing ${DATA_PREFIX}_text_document.{bin,idx}"
else
    mkdir -p "$OUT/data"
    "$VPY" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$DATA_PREFIX" \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --append-eod --workers 2
fi

step "5/5 training: examples/deepseek/pretrain_deepseek.sh (torchrun, 2 CPU ranks, EP 2, HL_MODEL=tiny)"
export HL_LAUNCHER_TYPE=${HL_LAUNCHER_TYPE:-torchrun}
export HL_DEVICE=${HL_DEVICE:-cpu}
export HL_PYTHON=${HL_PYTHON:-$VPY}
export HL_TORCHRUN=${HL_TORCHRUN:-$ROOT/$VENV/bin/torchrun}
export HL_NUM_NODES=${HL_NUM_NODES:-1} HL_DEVICES_PER_NODE=${HL_DEVICES_PER_NODE:-2}
export HL_DP=${HL_DP:-2} HL_TP=${HL_TP:-1} HL_PP=${HL_PP:-1} HL_EP=${HL_EP:-2}
export HL_MODEL=${HL_MODEL:-tiny} HL_MTP_NUM_LAYERS=${HL_MTP_NUM_LAYERS:-1}
export HL_DTYPE=${HL_DTYPE:-fp32}
export HL_SEQ_LEN=${HL_SEQ_LEN:-128} HL_MICRO_BATCH=${HL_MICRO_BATCH:-4} HL_GBS=${HL_GBS:-8}
# The schedule scales with the run's length (300 iterations: warm-up 20, log every 10, validate
# every 100, save every 150); a value set in the environment wins.
ITERS=${HL_TRAIN_ITERS:-300}
[[ "$ITERS" =~ ^[0-9]+$ ]] && ((10#$ITERS >= 1)) || { echo "quickstart: HL_TRAIN_ITERS must be a positive integer, got '$ITERS'" >&2; exit 1; }
ITERS=$((10#$ITERS))
at_least_1() { echo $(($1 > 1 ? $1 : 1)); }
export HL_TRAIN_ITERS=$ITERS HL_LR_DECAY_ITER=${HL_LR_DECAY_ITER:-$ITERS}
export HL_LR=${HL_LR:-2e-3} HL_MIN_LR=${HL_MIN_LR:-2e-4} HL_LR_WARMUP_ITERS=${HL_LR_WARMUP_ITERS:-$((ITERS / 15))}
export HL_INIT_STD=${HL_INIT_STD:-0.02}
LOG_EVERY=$(at_least_1 $((ITERS / 10)))
export HL_LOG_INTERVAL=${HL_LOG_INTERVAL:-$((LOG_EVERY < 10 ? LOG_EVERY : 10))}
export HL_EVAL_INTERVAL=${HL_EVAL_INTERVAL:-$(at_least_1 $((ITERS / 3)))} HL_EVAL_ITERS=${HL_EVAL_ITERS:-4}
export HL_SAVE=${HL_SAVE:-1} HL_SAVE_INTERVAL=${HL_SAVE_INTERVAL:-$(at_least_1 $((ITERS / 2)))}
export HL_TOKEN_DISPATCHER_TYPE=${HL_TOKEN_DISPATCHER_TYPE:-allgather}
export HL_USE_DISTRIBUTED_OPTIMIZER=${HL_USE_DISTRIBUTED_OPTIMIZER:-0}
export HL_NUM_WORKERS=${HL_NUM_WORKERS:-0}
export HL_SEED=${HL_SEED:-1234}
export HL_DATA_DIR_ROOT=${HL_DATA_DIR_ROOT:-$OUT/data}
export HL_DATA_FILE_PREFIX=${HL_DATA_FILE_PREFIX:-corpus_text_document}
export HL_DATA_CACHE_DIR=${HL_DATA_CACHE_DIR:-$OUT/data/cache}
export HL_TOKENIZER_TYPE=${HL_TOKENIZER_TYPE:-HuggingFaceTokenizer}
export HL_TOKENIZER_MODEL=${HL_TOKENIZER_MODEL:-$TOKENIZER}
export HL_RESULTS_DIR=${HL_RESULTS_DIR:-$OUT/run_$(date +%Y%m%d_%H%M%S)}
export HL_REDIRECT_LOGS=${HL_REDIRECT_LOGS:-1}
export HL_ENV_FLAGS=${HL_ENV_FLAGS:-OMP_NUM_THREADS=1}
export HL_DRY_RUN=${QUICKSTART_DRY_RUN:-${HL_DRY_RUN:-0}}
[ "$DRY" != 1 ] || export HL_CHECK_PATHS=${HL_CHECK_PATHS:-0}  # steps 2-4 did not run
bash examples/deepseek/pretrain_deepseek.sh
[ "$HL_DRY_RUN" = 1 ] && exit 0

step "what the model learned: a greedy continuation"
PROMPT=${QUICKSTART_PROMPT:-"Return the number of"}
echo "prompt: $PROMPT"
"$VENV/bin/python" tools/generate.py --load "$HL_RESULTS_DIR/checkpoints" --tokenizer-model "$TOKENIZER" \
    --prompt "$PROMPT" --max-new-tokens 24 || echo "quickstart: generation failed (training succeeded)" >&2

step "done"
echo "corpus:      $OUT/corpus.jsonl"
echo "tokenizer:   $TOKENIZER"
echo "dataset:     ${DATA_PREFIX}_text_document.{bin,idx}"
echo "results:     $HL_RESULTS_DIR"
echo "checkpoints: $HL_RESULTS_DIR/checkpoints"
echo "tensorboard: $HL_RESULTS_DIR/tensorboard   ($VENV/bin/tensorboard --logdir '$HL_RESULTS_DIR/tensorboard')"
echo "log:         $(ls "$HL_RESULTS_DIR"/log_*.txt 2>/dev/null | tail -n 1)"
