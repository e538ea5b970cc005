"""The one device layer: every device-specific call goes through here.

Three backends, chosen once per process:
- ``hpu``: Intel Gaudi, only when ``habana_frameworks.torch`` imports (it is not on PyPI);
- ``cuda``: NVIDIA GPUs through torch.cuda;
- ``cpu``: everything else, and the reference for tests.

Other modules never call ``torch.cuda.*`` or import ``habana_frameworks`` themselves: they ask a
``Device`` (``get_device()``) for the torch device of a local rank, the distributed backend,
synchronisation, memory statistics, lazy-mode ``mark_step()`` and the optional fused kernels.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Optional

import torch

DEVICE_KINDS = ("auto", "hpu", "cuda", "cpu")
_DIST_BACKENDS = {"hpu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def _import_optional(name: str) -> Optional[ModuleType]:
    """Import an optional package, returning None when it (or its native stack) is missing."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a native library failing to load
        return None


@dataclass
class Device:
    """One accelerator kind. ``modules`` caches lazily imported optional packages by name."""

    kind: str
    importer: Callable[[str], Optional[ModuleType]] = _import_optional
    lazy_mode: bool = False  # HPU lazy mode (PT_HPU_LAZY_MODE=1), set by the launcher/initialize
    modules: Dict[str, Optional[ModuleType]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("hpu", "cuda", "cpu"):
            raise ValueError(f"unknown device kind {self.kind!r}; expected one of hpu, cuda, cpu")

    # ---- optional modules -------------------------------------------------------------
    def _module(self, name: str) -> Optional[ModuleType]:
        if name not in self.modules:
            self.modules[name] = self.importer(name)
        return self.modules[name]

    # ---- placement and processes ------------------------------------------------------
    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The device a process with this local rank computes on (CPU ranks share the CPU).

        CUDA: every process sees all GPUs and addresses its own as cuda:<local rank>. Gaudi: the
        HCCL bridge gives each process ONE card, the one whose module ID equals the process's local
        rank (LOCAL_RANK / OMPI_COMM_WORLD_LOCAL_RANK, Intel's "Gaudi-to-process assignment";
        HABANA_VISIBLE_MODULES narrows the choice), and the process addresses it as plain "hpu".
        """
        if self.kind == "cpu":
            return torch.device("cpu")
        if self.kind == "hpu":
            return torch.device("hpu")
        return torch.device(self.kind, local_rank)

    def set_device(self, local_rank: int) -> None:
        """Select this process's device: CUDA by index; on Gaudi the card is assigned from the local
        rank when the HCCL process group starts, so there is nothing to select."""
        if self.kind == "cuda":
            torch.cuda.set_device(local_rank)

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend: hccl on Gaudi, nccl on CUDA, gloo on CPU."""
        if self.kind == "hpu":
            # Registers the hccl backend with torch.distributed.
            self._module("habana_frameworks.torch.distributed.hccl")
        return _DIST_BACKENDS[self.kind]

    def device_name(self) -> str:
        """Accelerator model name (for peak-FLOP tables): e.g. "NVIDIA H100 80GB HBM3", "GAUDI2", "cpu"."""
        if self.kind == "cuda":
            return torch.cuda.get_device_name()
        if self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            get_name = getattr(hpu, "get_device_name", None) if hpu is not None else None
            return str(get_name()) if get_name is not None else "GAUDI"
        return "cpu"

    def device_count(self) -> int:
        if self.kind == "cuda":
            return torch.cuda.device_count()
        if self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            return int(hpu.device_count()) if hpu is not None else 0
        return 1

    # ---- synchronisation ----------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for queued device work (for timers and benchmarks; never in the hot path)."""
        if self.kind == "cuda":
            torch.cuda.synchronize()
        elif self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            if hpu is not None:
                hpu.synchronize()

    def mark_step(self) -> None:
        """Lazy-mode graph boundary on HPU (after backward, after the optimizer step); a no-op elsewhere."""
        if self.kind != "hpu" or not self.lazy_mode:
            return
        core = self._module("habana_frameworks.torch.core")
        if core is not None:
            core.mark_step()

    # ---- memory -------------------------------------------------------------------------
    def memory_stats(self) -> Dict[str, int]:
        """Bytes allocated now and at peak on this process's device (empty on CPU)."""
        if self.kind == "cuda":
            return {
                "allocated": torch.cuda.memory_allocated(),
                "max_allocated": torch.cuda.max_memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
            }
        if self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            if hpu is None:
                return {}
            return {"allocated": int(hpu.memory_allocated()), "max_allocated": int(hpu.max_memory_allocated())}
        return {}

    def total_memory(self) -> Optional[int]:
        """Bytes of memory of this process's device (None on CPU or when the stack cannot say)."""
        if self.kind == "cuda":
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        if self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            info = getattr(hpu, "mem_get_info", None) if hpu is not None else None
            return int(info()[1]) if info is not None else None
        return None

    def reset_peak_memory_stats(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            if hpu is not None and hasattr(hpu, "reset_peak_memory_stats"):
                hpu.reset_peak_memory_stats()

    def set_deterministic(self, enabled: bool) -> None:
        """Deterministic kernels only (--deterministic-mode): torch raises on an op that has none.
        The environment part (CUBLAS_WORKSPACE_CONFIG, NCCL_ALGO) is set by the training start-up
        before the device initialises."""
        torch.use_deterministic_algorithms(enabled)
        if self.kind == "cuda":
            torch.backends.cudnn.benchmark = not enabled

    # ---- random state -------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if self.kind == "cuda":
            torch.cuda.manual_seed_all(seed)
        elif self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu")
            if hpu is not None and hasattr(hpu, "manual_seed"):
                hpu.manual_seed(seed)

    def get_rng_state(self) -> Optional[torch.Tensor]:
        if self.kind == "cuda":
            return torch.cuda.get_rng_state()
        if self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu.random")
            return hpu.get_rng_state() if hpu is not None else None
        return None

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if state is None:
            return
        if self.kind == "cuda":
            torch.cuda.set_rng_state(state)
        elif self.kind == "hpu":
            hpu = self._module("habana_frameworks.torch.hpu.random")
            if hpu is not None:
                hpu.set_rng_state(state)

    # ---- fused kernels ------------------------------------------------------------------
    def fused_sdpa(self) -> Optional[Any]:
        """Intel's FusedSDPA autograd function on HPU, else None (callers use torch SDPA)."""
        if self.kind != "hpu":
            return None
        kernels = self._module("habana_frameworks.torch.hpex.kernels")
        return getattr(kernels, "FusedSDPA", None) if kernels is not None else None

    def fused_rmsnorm(self) -> Optional[Any]:
        """Intel's FusedRMSNorm autograd function on HPU, else None (callers use the torch formula)."""
        if self.kind != "hpu":
            return None
        norm = self._module("habana_frameworks.torch.hpex.normalization")
        return getattr(norm, "FusedRMSNorm", None) if norm is not None else None

    def fused_rope(self) -> Optional[Any]:
        """Intel's RotaryPosEmbeddingHelperV1 on HPU, else None (callers use the torch formula).

        An autograd Function: apply(x, cos, sin, offset) -> x * cos + rotate_half(x) * sin
        (Intel's BLOCKWISE mode) with cos/sin as wide as x's last dimension.
        """
        if self.kind != "hpu":
            return None
        kernels = self._module("habana_frameworks.torch.hpex.kernels")
        return getattr(kernels, "RotaryPosEmbeddingHelperV1", None) if kernels is not None else None

    def fused_clip_norm(self) -> Optional[Any]:
        """Intel's FusedClipNorm class on HPU, else None (callers use torch's foreach norm and scale).

        FusedClipNorm(parameters, max_norm).clip_norm(parameters) -> total L2 norm (a device
        tensor) of the `.grad` of those parameters, after scaling them in place by
        max_norm / (norm + 1e-6) when that is below 1.
        """
        if self.kind != "hpu":
            return None
        norm = self._module("habana_frameworks.torch.hpex.normalization")
        return getattr(norm, "FusedClipNorm", None) if norm is not None else None

    def fused_adamw(self) -> Optional[Any]:
        """Intel's FusedAdamW optimizer class (habana_frameworks.torch.hpex.optimizers) on HPU, else None.

        A torch.optim.Optimizer: FusedAdamW(params, lr=..., betas=(b1, b2), eps=..., weight_decay=...).
        """
        if self.kind != "hpu":
            return None
        optimizers = self._module("habana_frameworks.torch.hpex.optimizers")
        return getattr(optimizers, "FusedAdamW", None) if optimizers is not None else None

    def fused_moe(self) -> Optional[Callable[..., torch.Tensor]]:
        """torch.ops.hpu.mixture_of_experts on HPU (registered by habana_frameworks.torch), else None.

        Called with keywords hidden_states [T, H], expert_routing_table [T, k], router_weights [T, k],
        w12 (per-expert [2I, H]), w3 (per-expert [H, I]), permuted_weights, activation,
        experts_min, experts_max; returns [T, H].
        """
        if self.kind != "hpu" or self._module("habana_frameworks.torch.core") is None:
            return None
        try:
            return getattr(torch.ops.hpu, "mixture_of_experts")
        except (AttributeError, RuntimeError):
            return None

    def onednn_gemm(self, *tensors: torch.Tensor) -> Optional[ModuleType]:
        """`megatron.core.onednn` (fp32 GEMMs run by oneDNN instead of the default BLAS) on CPU when
        torch has oneDNN and every given tensor is fp32, else None (callers use torch's ops)."""
        if self.kind != "cpu":
            return None
        from megatron.core import onednn

        if not onednn.available() or any(t.dtype != torch.float32 for t in tensors):
            return None
        return onednn

    def compile_backend(self) -> str:
        """torch.compile backend: Intel's "hpu_backend" on Gaudi (registered when
        habana_frameworks.torch imports), inductor on CUDA and CPU."""
        if self.kind == "hpu":
            self._module("habana_frameworks.torch.core")
            return "hpu_backend"
        return "inductor"

    def sdpa_takes_value_head_dim(self, query: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether torch SDPA has a fused kernel for a value head size different from the query's.

        CPU: no (its flash kernel wants one head size; the math path is the only taker). CUDA:
        the cuDNN kernel does on Hopper and newer in fp16/bf16 (e.g. d_qk 192, d_v 128); other
        GPUs and dtypes would fall to the memory-efficient kernel, slower than flash with a padded v.
        """
        if self.kind != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
            return False
        if query.shape[-1] > 256 or value.shape[-1] > 256:
            return False
        major, _ = torch.cuda.get_device_capability(query.device)
        return major >= 9


def detect_device_kind(importer: Callable[[str], Optional[ModuleType]] = _import_optional) -> str:
    """hpu when habana_frameworks imports and reports a device, cuda when available, else cpu."""
    hpu = importer("habana_frameworks.torch.hpu")
    if hpu is not None:
        try:
            if hpu.is_available():
                return "hpu"
        except Exception:
            pass
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def get_device(
    kind: str = "auto",
    *,
    lazy_mode: bool = False,
    importer: Callable[[str], Optional[ModuleType]] = _import_optional,
) -> Device:
    """Build the device layer for ``kind`` ("auto" detects). Asking for a missing device is an error."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device must be one of {DEVICE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = detect_device_kind(importer)
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch reports no CUDA device")
    elif kind == "hpu":
        hpu = importer("habana_frameworks.torch.hpu")
        if hpu is None:
            raise ValueError(
                "device 'hpu' was requested but habana_frameworks.torch cannot be imported; "
                "install Intel Gaudi's PyTorch stack or choose --device cpu/cuda"
            )
    if lazy_mode and kind != "hpu":
        lazy_mode = False  # lazy mode only exists on Gaudi; elsewhere mark_step is a no-op anyway
    return Device(kind=kind, importer=importer, lazy_mode=lazy_mode)


def device_of(tensor: torch.Tensor) -> Device:
    """The device layer for the device a tensor lives on (modules use this inside forward)."""
    kind = tensor.device.type
    return _device_for_kind(kind if kind in ("hpu", "cuda") else "cpu")


# One Device per kind, memoising only which optional kernels import; it carries no configuration.
# A plain dict built at import (not a cache decorator) so torch.compile sees a constant object.
_DEVICE_BY_KIND: Dict[str, Device] = {kind: Device(kind=kind) for kind in ("hpu", "cuda", "cpu")}


def _device_for_kind(kind: str) -> Device:
    return _DEVICE_BY_KIND[kind]
