"""Regional torch.compile of a DeepSeekModel stage: one compiled region per decoder layer, per MTP
depth, and for the loss head, each with the backend the device layer names.

Why regions and not the whole model: every decoder layer of a stage has the same code and the same
shapes, so torch.compile traces the layer once and reuses the code for the others (one graph per
distinct layer kind: dense, MoE); the model's own Python (pipeline input, MTP rolling, aux-loss
bookkeeping) stays eager and free to change. Compile time stays flat in the number of layers.

What is compiled (in place, with `nn.Module.compile`, so parameter names and state dicts are
unchanged and DDP / the optimizer see the same parameters):
- every `DecoderLayer` in `model.layers`: input norm, MLA (projections, RoPE, SDPA), residuals,
  post-attention norm and the MLP (dense SwiGLU, or MoE: router, dispatch, experts, combine);
- every `MTPDepth` (its norms, eh_proj and its decoder layer) and its final norm;
- the loss head: `final_layernorm` and `token_losses` (fp32 cross entropy over the real
  vocabulary; the compiler fuses the log-softmax, the target gather and their backward).

Graph breaks (counted by tests/unit/core/models/test_compile.py with dynamo's counters):
- dense layers, MLA, and MoE layers with a static dispatch (capacity factor + pad_to_capacity,
  or capacity drop; one device): none.
- dropless MoE on one device: none on CPU / CUDA bf16 (the grouped GEMM is the opaque custom op
  `megatron::grouped_mm`), none elsewhere (the tiled fallback has static shapes).
- fp32 CPU linear layers through oneDNN: none (`megatron::onednn_linear` is an opaque custom op
  with a shape function, like the grouped GEMM; the compiler fuses the glue around it).
- TP2 + SP: none (dynamo traces the mappings' collectives as functional collectives).
- EP with the all-to-all dispatcher: per MoE layer, the host-side split sizes (a data-dependent
  read), the asynchronous all_to_all launches and their Work.wait break the graph (12 breaks over
  two training steps of a 1-dense + 1-MoE stage); the regions between them are compiled, and
  losses match eager (tests under EP2 and TP2 + SP).

Recompilation: shapes are static (`dynamic=False`), so a new micro-batch shape, a switch between
training and evaluation (grad mode) or a changed aux-loss scale compiles a new variant once; a
steady training loop compiles during its first step and never again.

Compiled autograd (`--use-torch-compiled-autograd`): see `compiled_autograd`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from megatron.core.device import Device, device_of

_COMPILED_FLAG = "_megatron_regional_compile"


def _stage_device(model: nn.Module) -> Device:
    for param in model.parameters():
        return device_of(param)
    return device_of(torch.empty(0))


def compile_backend(model: nn.Module) -> str:
    """The device layer's torch.compile backend for the device the model's parameters live on."""
    return _stage_device(model).compile_backend()


def compile_model(
    model: nn.Module, *, backend: Optional[str] = None, dynamic: bool = False, mode: Optional[str] = None
) -> nn.Module:
    """Compile `model` (a DeepSeekModel stage) region by region in place and return it.

    Call once on the built stage, after `.to(device, dtype)` and before wrapping it in DDP.
    `backend` defaults to the device layer's (`Device.compile_backend`: hpu_backend on Gaudi,
    inductor on CUDA / CPU); `mode` is passed to torch.compile. Idempotent.
    """
    if getattr(model, _COMPILED_FLAG, False):
        return model
    backend = backend or compile_backend(model)
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    for layer in getattr(model, "layers", {}).values():
        layer.compile(**options)
    for depth in getattr(model, "mtp", []):
        depth.compile(**options)
        depth.final_layernorm.compile(**options)
    if getattr(model, "post_process", False):
        model.final_layernorm.compile(**options)
        # An instance attribute shadows the method: model.forward's self.token_losses(...) calls
        # the compiled function; parameters and the state dict are untouched.
        model.token_losses = torch.compile(model.token_losses, **options)
    setattr(model, _COMPILED_FLAG, True)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_model` has been applied to this stage."""
    return bool(getattr(model, _COMPILED_FLAG, False))


@contextlib.contextmanager
def compiled_autograd(model: nn.Module, *, backend: Optional[str] = None) -> Iterator[None]:
    """Run the backward passes inside this block under torch's compiled autograd.

    Usage (the training loop, around backward only): `with compiled_autograd(model): loss.backward()`.
    The autograd graph, including the regions' compiled backward and the gradient hooks, is
    captured and compiled with the model's backend. Needs a compiled model (`compile_model`).

    Refused (ValueError) when gradients are reduced by hooks that launch asynchronous
    collectives (DDP with overlap_grad_reduce): compiled autograd traces the hooks into its
    graph, and a hook that starts a communication and records host-side bucket state cannot be
    captured; use it with overlap_grad_reduce off, where the hook only adds into main_grad.
    """
    ddp_config = getattr(model, "ddp_config", None)
    if ddp_config is not None and getattr(ddp_config, "overlap_grad_reduce", False):
        raise ValueError(
            "--use-torch-compiled-autograd cannot capture DDP's overlapped gradient reduction "
            "(its hooks launch collectives); disable --overlap-grad-reduce"
        )
    inner = getattr(model, "module", model)
    if not is_compiled(inner):
        raise ValueError("compiled autograd needs the model compiled first (compile_model / --use-torch-compile 1)")
    from torch._dynamo import compiled_autograd as ca

    compiler = torch.compile(backend=backend or compile_backend(inner), dynamic=False)
    with ca._enable(compiler):
        yield
