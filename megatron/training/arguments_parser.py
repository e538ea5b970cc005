"""Megatron-LM's command-line flags, as the Intel Gaudi DeepSeek example passes them.

Flag names, types and defaults follow Megatron-LM (and its Gaudi fork for the HPU flags), so
existing job scripts run unchanged. Deviations, each on purpose:
- --attention-dropout / --hidden-dropout default to 0 (Megatron: 0.1): the DeepSeek model has
  no dropout layers and DeepSeek trains without dropout.
- Architecture flags DeepSeek always implies (--swiglu, --multi-latent-attention,
  --qk-layernorm, --disable-bias-linear, RMSNorm, RoPE) are accepted; only an explicit
  contradiction (e.g. --normalization LayerNorm) is an error.
- Flags in COMPAT_FLAGS are accepted and have no effect (fusions that do not exist here,
  Transformer-Engine choices, GQA sizes that MLA ignores); their help says so, and a run that
  gives one prints a note saying so.
- Ours (not in Megatron): --model-preset, --device, --use-lazy-mode, --skip-nan-loss,
  --check-for-nan-in-loss-and-grad (Megatron only has the --no- form), --beta-fast,
  --beta-slow, --original-max-position-embeddings, --no-rotary-interleaved,
  --override-explicit-args-from-checkpoint, --allow-no-checkpoint.
The parser raises ArgumentsError (a ValueError) instead of exiting, so unknown flags and bad
values surface like every other configuration error, with argparse's message.
"""

from __future__ import annotations

import argparse
import ast
from typing import List, Optional, Tuple, Union

from megatron.core.config import RECOMPUTE_MODULES

DEVICE_KINDS = ("auto", "hpu", "cuda", "cpu")
DISTRIB_OPTIM_METHODS = ("parallel_node_0", "parallel_multi_node", "serial_per_node", "serial_per_dp_groups")
_MAX_PATTERN = 1_000_000  # --moe-layer-freq list entries (guards "[0]*10**12")


class ArgumentsError(ValueError):
    """A command line argparse rejects (unknown flag, bad type or choice): argparse's message."""


class MegatronArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that raises ArgumentsError rather than printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ArgumentsError(f"{self.prog}: error: {message}")


def str_to_bool(text: str) -> bool:
    """The Gaudi fork's boolean flag values (`--use-fused-sdpa 1`, `--use-torch-compile=0`).

    The fork treats anything but true/1 as False; a typo there silently disables a kernel, so
    unknown words are rejected here.
    """
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def moe_layer_freq_type(text: Union[str, int]) -> Union[int, List[int]]:
    """--moe-layer-freq: an int N (every N-th layer is MoE) or a list expression of 0/1 per layer,
    e.g. "([0]*3+[1]*58)". Evaluated from its syntax tree (ints, lists, + and * only), never eval."""
    if isinstance(text, int):
        return text
    try:
        tree = ast.parse(text.strip(), mode="eval")
        value = _eval_pattern(tree.body)
    except (SyntaxError, ValueError) as e:
        raise argparse.ArgumentTypeError(
            f"expected an int or a list expression like '([0]*3+[1]*58)', got {text!r}"
            + (f" ({e})" if isinstance(e, ValueError) and str(e) else "")
        ) from None
    if isinstance(value, list) and any(v not in (0, 1) for v in value):
        raise argparse.ArgumentTypeError(f"the layer pattern must hold only 0 (dense) and 1 (MoE), got {text!r}")
    return value


def _eval_pattern(node: ast.AST) -> Union[int, List[int]]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval_pattern(e) for e in node.elts]
        if not all(isinstance(i, int) for i in items):
            raise ValueError("nested lists are not allowed")
        return list(items)  # type: ignore[arg-type]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern(node.left), _eval_pattern(node.right)
        if isinstance(node.op, ast.Add):
            if type(left) is not type(right):
                raise ValueError("cannot add a list and an int")
            result = left + right  # type: ignore[operator]
        else:
            if isinstance(left, list) and isinstance(right, list):
                raise ValueError("cannot multiply two lists")
            n = len(left) if isinstance(left, list) else len(right) if isinstance(right, list) else 0
            times = right if isinstance(left, list) else left
            if n * max(int(times), 0) > _MAX_PATTERN:
                raise ValueError("pattern too long")
            result = left * right  # type: ignore[operator]
        if isinstance(result, list) and len(result) > _MAX_PATTERN:
            raise ValueError("pattern too long")
        return result
    raise ValueError(f"unsupported syntax {type(node).__name__}")


# Accepted for compatibility, no effect here. (flag, add_argument kwargs, why it does nothing)
COMPAT_FLAGS: Tuple[Tuple[str, dict, str], ...] = (
    ("--transformer-impl", dict(choices=["local", "transformer_engine"], default="transformer_engine"), "one implementation"),
    ("--distributed-backend", dict(choices=["nccl", "gloo", "hccl"], default="nccl"), "the backend follows the device (hccl/nccl/gloo)"),
    ("--use-mcore-models", dict(action="store_true"), "deprecated in Megatron; always core models"),
    ("--no-gradient-accumulation-fusion", dict(action="store_true"), "no such fusion here"),
    ("--no-masked-softmax-fusion", dict(action="store_true"), "no such fusion here"),
    ("--no-bias-gelu-fusion", dict(action="store_true"), "no biases, no GeLU"),
    ("--no-bias-swiglu-fusion", dict(action="store_true"), "no biases"),
    ("--no-bias-dropout-fusion", dict(action="store_true"), "no biases, no dropout"),
    ("--no-persist-layer-norm", dict(action="store_true"), "no persistent layer-norm kernel"),
    ("--no-async-tensor-model-parallel-allreduce", dict(action="store_true"), "deprecated in Megatron"),
    ("--use-flash-attn", dict(action="store_true"), "attention uses torch SDPA / HPU FusedSDPA (--use-fused-sdpa)"),
    ("--cross-entropy-loss-fusion", dict(action="store_true"), "no such fusion here"),
    ("--attention-softmax-in-fp32", dict(action="store_true"), "softmax precision is the kernel's"),
    ("--use-cpu-initialization", dict(action="store_true"), "initialisation is already layout-independent"),
    ("--group-query-attention", dict(action="store_true"), "MLA has no query groups"),
    ("--num-query-groups", dict(type=int, default=1), "MLA has no query groups"),
    ("--kv-channels", dict(type=int, default=None), "MLA head sizes come from --qk-head-dim / --v-head-dim"),
    ("--use-rotary-position-embeddings", dict(action="store_true"), "deprecated in Megatron; RoPE is implied"),
    ("--empty-unused-memory-level", dict(type=int, default=0, choices=[0, 1, 2]), "allocator caching is left alone"),
    ("--no-create-attention-mask-in-dataloader", dict(action="store_true"), "causal masks are built in the model"),
    ("--moe-router-fp32", dict(action="store_true"), "routing is always computed in fp32"),
    ("--manual-gc", dict(action="store_true"), "garbage collection is left to Python"),
    ("--manual-gc-interval", dict(type=int, default=0), "garbage collection is left to Python"),
    ("--save-distrib-optimizer-method", dict(choices=DISTRIB_OPTIM_METHODS, default="serial_per_node"),
     "every rank writes its own optimizer shard"),
    ("--load-distrib-optimizer-method", dict(choices=DISTRIB_OPTIM_METHODS, default="serial_per_dp_groups"),
     "every rank reads only the slices it needs"),
)


def compat_dest(flag: str) -> str:
    """Parser dest of a flag of COMPAT_FLAGS."""
    return "compat_" + flag.lstrip("-").replace("-", "_")


def build_parser(prog: Optional[str] = None) -> MegatronArgumentParser:
    """The full flag set. Defaults are Megatron's; `parse_args` resolves and validates them."""
    from megatron.core.models.deepseek.presets import preset_names
    from megatron.training.config.tokenizer_flags import tokenizer_types

    p = MegatronArgumentParser(
        prog=prog,
        description="DeepSeek-V3/V2 MoE training (Megatron-LM flags)",
        allow_abbrev=False,  # as Megatron: a prefix of a flag is an error, not a silent match
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_args(p, preset_names())
    _mla_rope_args(p)
    _moe_args(p)
    _parallel_args(p)
    _training_args(p)
    _lr_args(p)
    _data_args(p, tokenizer_types())
    _checkpoint_args(p)
    _logging_args(p)
    _device_args(p)
    g = p.add_argument_group("accepted for compatibility (no effect)")
    for flag, kwargs, why in COMPAT_FLAGS:
        g.add_argument(flag, dest=compat_dest(flag), help=f"No effect: {why}.", **kwargs)
    return p


def _model_args(p: argparse.ArgumentParser, presets: Tuple[str, ...]) -> None:
    g = p.add_argument_group("model")
    a = g.add_argument
    a("--model-preset", choices=presets, default=None,
      help="Start from a named model (flags given explicitly override its fields).")
    a("--num-layers", type=int, default=None)
    a("--hidden-size", type=int, default=None)
    a("--ffn-hidden-size", type=int, default=None, help="Dense MLP width (default: Megatron's SwiGLU rule from --hidden-size).")
    a("--num-attention-heads", type=int, default=None)
    a("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    a("--make-vocab-size-divisible-by", type=int, default=128)
    a("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="DeepSeek: RMSNorm (implied).")
    a("--norm-epsilon", type=float, default=1e-5)
    a("--swiglu", action="store_true", help="Implied: DeepSeek MLPs are SwiGLU.")
    a("--untie-embeddings-and-output-weights", action="store_true")
    a("--position-embedding-type", choices=["learned_absolute", "rope", "mrope", "relative", "none"],
      default="learned_absolute", help="DeepSeek: rope (implied).")
    a("--disable-bias-linear", action="store_false", dest="add_bias_linear", help="Implied: no linear biases.")
    a("--init-method-std", type=float, default=0.02)
    a("--multi-latent-attention", action="store_true", help="Implied: DeepSeek attention is MLA.")
    a("--qk-layernorm", action="store_true", help="Implied: MLA normalises its q/kv latents.")
    a("--mtp-num-layers", type=int, default=None)
    a("--mtp-loss-scaling-factor", type=float, default=0.1)
    a("--attention-dropout", type=float, default=0.0, help="Must be 0 (Megatron's default 0.1; the model has no dropout).")
    a("--hidden-dropout", type=float, default=0.0, help="Must be 0 (Megatron's default 0.1; the model has no dropout).")


def _mla_rope_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-latent attention and rotary embedding")
    a = g.add_argument
    a("--q-lora-rank", type=int, default=None, help="None: plain q projection (V2-Lite).")
    a("--kv-lora-rank", type=int, default=32)
    a("--qk-head-dim", type=int, default=128, help="Non-rotary part of the q/k head.")
    a("--qk-pos-emb-head-dim", type=int, default=64, help="Rotary part of the q/k head.")
    a("--v-head-dim", type=int, default=128)
    a("--rotary-base", type=int, default=10000)
    a("--rotary-percent", type=float, default=1.0, help="Must be 1.0 (MLA sets the rotary width explicitly).")
    a("--rotary-interleaved", action="store_true", dest="rotary_interleaved", default=None,
      help="Rotate interleaved pairs (x[2i], x[2i+1]) as DeepSeek checkpoints do (default with MLA).")
    a("--no-rotary-interleaved", action="store_false", dest="rotary_interleaved", default=None,
      help="Rotate halves (rotate_half) instead.")
    a("--rope-type", choices=["rope", "yarn"], default=None,
      help="Default: yarn when --rotary-scaling-factor > 1, else plain rope.")
    a("--rotary-scaling-factor", type=float, default=1.0, help="YaRN factor.")
    a("--mscale", type=float, default=1.0)
    a("--mscale-all-dim", type=float, default=0.0)
    a("--beta-fast", type=float, default=32.0)
    a("--beta-slow", type=float, default=1.0)
    a("--original-max-position-embeddings", type=int, default=None,
      help="YaRN: context length before scaling (default 4096).")


def _moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts")
    a = g.add_argument
    a("--num-experts", type=int, default=None)
    a("--moe-router-topk", type=int, default=2)
    a("--moe-ffn-hidden-size", type=int, default=None, help="Default: --ffn-hidden-size.")
    a("--moe-shared-expert-intermediate-size", type=int, default=None,
      help="Total shared-expert width: a multiple of --moe-ffn-hidden-size (None: no shared expert).")
    a("--moe-layer-freq", type=moe_layer_freq_type, default=1,
      help="int N: every N-th layer is MoE; or '([0]*3+[1]*58)': k dense layers then MoE layers.")
    a("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"], default="aux_loss")
    a("--moe-aux-loss-coeff", type=float, default=0.0)
    a("--moe-z-loss-coeff", type=float, default=None)
    a("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    a("--moe-router-topk-scaling-factor", type=float, default=None)
    a("--moe-router-num-groups", type=int, default=None)
    a("--moe-router-group-topk", type=int, default=None)
    a("--moe-router-enable-expert-bias", action="store_true")
    a("--moe-router-bias-update-rate", type=float, default=1e-3)
    a("--moe-router-pre-softmax", action="store_true", help="Softmax over all experts before top-k (DeepSeek-V2).")
    a("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather")
    a("--moe-expert-capacity-factor", type=float, default=None, help="None: dropless. Needs alltoall.")
    a("--moe-pad-expert-input-to-capacity", action="store_true")
    a("--moe-token-drop-policy", choices=["probs", "position"], default="probs")
    a("--moe-grouped-gemm", action="store_true")
    a("--moe-shared-expert-overlap", action="store_true")
    a("--moe-layer-recompute", action="store_true", help="Deprecated: --recompute-granularity selective --recompute-modules moe.")
    a("--moe-per-layer-logging", action="store_true")
    a("--moe-token-distribution-logging", action="store_true")
    a("--moe-token-distribution-logging-interval", type=int, default=50)
    a("--moe-token-distribution-logging-to-console", action="store_true", help="Also print the per-expert counts.")


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    a = g.add_argument
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--expert-model-parallel-size", type=int, default=1)
    a("--expert-tensor-parallel-size", type=int, default=None, help="Default: --tensor-model-parallel-size.")
    a("--context-parallel-size", type=int, default=1, help="Must be 1 (context parallelism is not implemented).")
    a("--sequence-parallel", action="store_true", help="Turned off when TP is 1 (as Megatron does).")
    a("--decoder-first-pipeline-num-layers", type=int, default=None)
    a("--decoder-last-pipeline-num-layers", type=int, default=None)
    a("--use-distributed-optimizer", action="store_true")
    a("--overlap-grad-reduce", action="store_true")
    a("--overlap-param-gather", action="store_true")
    a("--distributed-timeout-minutes", type=int, default=10)


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    a = g.add_argument
    a("--micro-batch-size", type=int, default=None)
    a("--global-batch-size", type=int, default=None, help="Default: micro batch x data-parallel size.")
    a("--train-iters", type=int, default=None)
    a("--train-samples", type=int, default=None)
    a("--exit-interval", type=int, default=None, help="Exit at iterations divisible by this (0/None: never).")
    a("--exit-duration-in-mins", type=int, default=None)
    a("--exit-signal-handler", action="store_true")
    a("--kill-switch-file", type=str, default=None, help="Save and exit when this file appears.")
    a("--eval-interval", type=int, default=1000)
    a("--eval-iters", type=int, default=100)
    a("--skip-train", action="store_true")
    a("--seed", type=int, default=1234)
    a("--bf16", action="store_true")
    a("--fp16", action="store_true", help="Rejected: train in bf16 (--bf16) or fp32.")
    a("--accumulate-allreduce-grads-in-fp32", action="store_true")
    a("--check-for-nan-in-loss-and-grad", action="store_true", dest="check_for_nan_in_loss_and_grad", default=True,
      help="Stop with an error on a NaN/Inf loss or gradient (default).")
    a("--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad", default=True)
    a("--skip-nan-loss", action="store_true",
      help="On a NaN/Inf loss or gradient, skip that optimizer step and go on instead of stopping.")
    a("--iterations-to-skip", nargs="+", type=int, default=[])
    a("--recompute-activations", action="store_true", help="Same as --recompute-granularity selective.")
    a("--recompute-granularity", choices=["full", "selective"], default=None)
    a("--recompute-method", choices=["uniform", "block"], default=None)
    a("--recompute-num-layers", type=int, default=None)
    a("--recompute-modules", nargs="*", choices=RECOMPUTE_MODULES, default=None, help="Selective only; default core_attn.")
    a("--deterministic-mode", action="store_true")
    a("--optimizer", choices=["adam", "fusedadamw"], default="adam", help="AdamW; fusedadamw runs it through Intel's FusedAdamW on Gaudi (elsewhere: the same update, with a note).")
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.999)
    a("--adam-eps", type=float, default=1e-8)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=1.0)


def _lr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning rate")
    a = g.add_argument
    a("--lr", type=float, default=None)
    a("--min-lr", type=float, default=0.0)
    a("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"], default="linear")
    a("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    a("--lr-decay-samples", type=int, default=None)
    a("--lr-warmup-iters", type=int, default=0)
    a("--lr-warmup-samples", type=int, default=0)
    a("--lr-warmup-fraction", type=float, default=None)
    a("--lr-warmup-init", type=float, default=0.0)
    a("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"], default="exponential")
    a("--lr-wsd-decay-iters", type=int, default=None)
    a("--lr-wsd-decay-samples", type=int, default=None)
    a("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
      dest="override_opt_param_scheduler")
    a("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", action="store_true",
      dest="use_checkpoint_opt_param_scheduler")


def _data_args(p: argparse.ArgumentParser, tokenizer_types: Tuple[str, ...]) -> None:
    g = p.add_argument_group("data and tokenizer")
    a = g.add_argument
    a("--data-path", nargs="*", default=None, help="A prefix, or weight/prefix pairs.")
    a("--data-args-path", type=str, default=None, help="A file holding the --data-path values (for blends of many datasets).")
    a("--per-split-data-args-path", type=str, default=None,
      help='A JSON file {"train": [...], "valid": [...], "test": [...]} of --train/valid/test-data-path values.')
    a("--split", type=str, default=None, help="train,valid,test weights (default with --data-path: 969, 30, 1).")
    a("--train-data-path", nargs="*", default=None)
    a("--valid-data-path", nargs="*", default=None)
    a("--test-data-path", nargs="*", default=None)
    a("--data-cache-path", default=None)
    a("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files")
    a("--mock-data", action="store_true")
    a("--seq-length", type=int, default=None)
    a("--num-workers", type=int, default=2)
    a("--reset-position-ids", action="store_true")
    a("--reset-attention-mask", action="store_true")
    a("--eod-mask-loss", action="store_true")
    a("--tokenizer-type", choices=tokenizer_types, default=None)
    a("--tokenizer-model", type=str, default=None)
    a("--vocab-file", type=str, default=None)
    a("--merge-file", type=str, default=None)
    a("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary (before eod and padding).")
    a("--extra-vocab-size", type=int, default=0, help="Extra ids added by DeepSeekV2Tokenizer (the example uses 467).")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    a = g.add_argument
    a("--save", type=str, default=None)
    a("--save-interval", "--persistent-save-interval", type=int, default=None, dest="save_interval")
    a("--no-save-optim", action="store_true")
    a("--no-save-rng", action="store_true")
    a("--load", type=str, default=None)
    a("--no-load-optim", action="store_true")
    a("--no-load-rng", action="store_true")
    a("--finetune", action="store_true")
    a("--use-checkpoint-args", action="store_true", help="Model (and tokenizer) flags come from the checkpoint.")
    a("--use-mp-args-from-checkpoint-args", action="store_true")
    a("--no-use-tokenizer-model-from-checkpoint-args", action="store_false",
      dest="use_tokenizer_model_from_checkpoint_args")
    a("--exit-on-missing-checkpoint", action="store_true", help="Default unless --load is the --save directory.")
    a("--allow-no-checkpoint", action="store_true",
      help="Train from scratch when --load holds no checkpoint (the default only when --load is the --save directory).")
    a("--override-explicit-args-from-checkpoint", action="store_true",
      help="With --use-checkpoint-args, let the checkpoint's model flags win over differing explicit ones.")
    a("--ckpt-step", type=int, default=None)
    a("--ckpt-force-unlock", action="store_true",
      help="Take over the --save directory's lock although its owner cannot be shown to be gone.")
    a("--ckpt-fallback-to-previous", action="store_true",
      help="When the newest checkpoint in --load is damaged, load the previous complete one (with a warning).")
    a("--ckpt-allow-tracker-rewind", action="store_true",
      help="Allow saving an iteration below the one latest_checkpointed_iteration.txt names.")
    a("--ckpt-format", type=str, default="torch_dist", help="Only torch_dist.")
    a("--verify-checkpoint", action="store_true")
    a("--verify-checkpoint-model-type", choices=["DEEPSEEK"], default="DEEPSEEK")


def _logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and profiling")
    a = g.add_argument
    a("--log-interval", type=int, default=100)
    a("--tensorboard-dir", type=str, default=None)
    a("--tensorboard-log-interval", type=int, default=1)
    a("--tensorboard-queue-size", type=int, default=1000)
    for flag in ("--log-throughput", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                 "--log-memory-to-tensorboard", "--log-world-size-to-tensorboard", "--log-params-norm",
                 "--log-num-zeros-in-grad", "--profile", "--use-pytorch-profiler"):
        a(flag, action="store_true")
    a("--timing-log-level", type=int, choices=range(0, 3), default=0)
    a("--timing-log-option", choices=["max", "minmax", "all"], default="minmax")
    a("--profile-type", choices=["pt", "pt-full", "hltv"], default=None)
    a("--profile-step-start", type=int, default=10)
    a("--profile-step-end", type=int, default=12)
    a("--profile-ranks", nargs="+", type=int, default=[0])
    a("--logging-level", type=int, default=None)


def _device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device (HPU flags are accepted on every device)")
    a = g.add_argument
    a("--device", choices=DEVICE_KINDS, default="auto")
    a("--use-lazy-mode", type=str_to_bool, default=None,
      help="HPU lazy mode; default: PT_HPU_LAZY_MODE at start-up (the launcher sets it from HL_USE_LAZY_MODE).")
    a("--use-torch-compile", type=str_to_bool, default=False)
    a("--use-torch-compiled-autograd", type=str_to_bool, default=False)
    a("--use-fused-sdpa", type=str_to_bool, default=True)
    a("--use-fused-sdpa-with-recompute", type=str_to_bool, default=False)
    a("--use-fast-softmax", type=str_to_bool, default=True)
    a("--use-fused-rmsnorm", type=str_to_bool, default=True)
    a("--use-onednn-linear", type=str_to_bool, default=True,
      help="CPU: run the fp32 GEMMs of linear layers through oneDNN instead of torch's default BLAS.")
    a("--no-rope-fusion", action="store_false", dest="apply_rope_fusion", default=True,
      help="Do not use Intel's fused RoPE kernel on HPU (the torch formula instead).")
    a("--mark-step-per-layer", action="store_true",
      help="HPU lazy mode: end the graph after every decoder layer (smaller graphs, faster compiles).")
