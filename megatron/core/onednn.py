"""fp32 GEMMs on CPU through oneDNN (torch's mkldnn ops) instead of torch's default BLAS.

Why: torch runs fp32 `mm` on CPU through its BLAS (MKL in the official wheels; bf16 already goes
to oneDNN). MKL picks its kernels by CPU vendor, and on an AMD EPYC CPU with AVX-512 it runs a
path at about half the speed of oneDNN's AVX-512 kernels: a 2048^3 fp32 matmul on 2 threads of
an AMD EPYC (Zen 5) runs at 224 GFLOP/s through MKL and 492 GFLOP/s through oneDNN
(benchmarks/RESULTS.md). Where MKL is as fast (it is tuned for Intel CPUs), the flag below keeps it.

The arithmetic stays IEEE fp32 (torch.backends.mkldnn's fp32 precision is left at its default,
"none": no bf16 or tf32 inputs); results differ from MKL's by summation order only, ~1e-6 relative.

- `linear(x [.., in], weight [out, in], bias [out] or None) -> [.., out]` is F.linear: one custom
  op `megatron::onednn_linear` on the flattened [T, in] input, opaque to torch.compile (inductor's
  own lowering of the mkldnn linear only takes frozen weights, i.e. inference), with its backward
  made of the same op: grad_x = g @ W, grad_W = g^T x (two more GEMMs), grad_b = sum(g).

oneDNN builds a kernel for every new GEMM shape and keeps it in two caches of 1,024 entries each
(about 0.6 MiB per shape here, `benchmarks/cpu_gemm.py`). The linear layers' shapes are fixed by
the micro-batch and sequence length, so a training run builds a few dozen; the MoE experts' row
counts change every step, so their grouped GEMMs stay on torch's kernel (routing them here grew a
training process by ~500 MiB over 6 steps). A process that feeds the linear layers many
different token counts (e.g. generation over prompts of many lengths) keeps up to the caches'
capacity of kernels.

Used only for fp32 CPU tensors and only where `available()` (torch built with oneDNN); the
model's `--use-onednn-linear false` keeps torch's default BLAS.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F


def _probe() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# Decided once at import: a constant, so torch.compile does not guard on it.
_AVAILABLE = _probe()


def available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear kernel (torch.ops.mkldnn._linear_pointwise)."""
    return _AVAILABLE


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    # x [.., in] (any strides) @ weight[out, in]^T (any strides) + bias -> [.., out], contiguous
    if x.numel() == 0 or weight.numel() == 0:
        return F.linear(x, weight, bias)  # oneDNN builds no empty GEMMs (e.g. zero tokens on a rank)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("megatron::onednn_linear", mutates_args=())
def _linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # x [T, in] -> [T, out], a fresh tensor (never a view: callers may write into views of it)
    return _gemm(x, weight, bias)


@_linear_2d.register_fake
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_setup(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    x, weight = ctx.saved_tensors  # [T, in], [out, in]
    grad_x = _linear_2d(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # [T, out] @ [out, in]
    grad_weight = None
    if ctx.needs_input_grad[1]:
        # oneDNN copies a transposed source operand into a plain layout first (its weight operand
        # may stay transposed), so the smaller of g^T [out, T] and x^T [in, T] is made the source:
        # wide outputs (the LM head) compute (x^T g)^T and copy the [in, out] result once.
        if weight.shape[0] > weight.shape[1]:
            grad_weight = _linear_2d(x.t(), grad.t(), None).t().contiguous()  # [in, T] @ [T, out] -> [out, in]
        else:
            grad_weight = _linear_2d(grad.t(), x.t(), None)  # [out, T] @ [T, in]
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


_linear_2d.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for fp32 CPU tensors, computed by oneDNN (module doc).
    x [.., in] -> [.., out]; the leading dimensions are flattened around one 2-D GEMM."""
    out = _linear_2d(x.reshape(-1, x.shape[-1]), weight, bias)  # [T, out]
    return out.view(*x.shape[:-1], weight.shape[0])
