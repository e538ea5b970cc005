"""Frozen model configuration for DeepSeek-V3 / V2, validated as a whole.

Config flows one way: argparse flags (megatron/training/arguments.py) or an HF `config.json`
(megatron/core/models/deepseek/hf_config.py) -> these dataclasses -> module constructors.
Core code never reads the environment or a global args object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

_SCORE_FUNCTIONS = ("sigmoid", "softmax")
_LOAD_BALANCING = ("none", "aux_loss", "seq_aux_loss")
_DROP_POLICIES = ("probs", "position")
_ROPE_SCALING = (None, "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the decoupled `qk_rope_head_dim` slice, with optional YaRN."""

    theta: float = 10000.0
    # True: DeepSeek's interleaved pairs (x[2i], x[2i+1]); HF V3 lays the rotated result out as
    # [evens | odds] (rope_interleave=True) and V2 keeps it interleaved (complex rotation).
    # False: standard rotate-half.
    interleave: bool = True
    # V2's complex-rotation layout keeps the output interleaved; V3's permutes to [evens | odds].
    # Both give the same q.k; the flag only matters for matching HF intermediate tensors.
    interleave_output_permuted: bool = True
    scaling_type: Optional[str] = None  # None or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def validate(self) -> None:
        if self.scaling_type not in _ROPE_SCALING:
            raise ValueError(f"rope scaling type must be one of {_ROPE_SCALING}, got {self.scaling_type!r}")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.scaling_type == "yarn":
            if self.factor < 1.0:
                raise ValueError(f"YaRN factor must be >= 1, got {self.factor}")
            if self.beta_fast <= self.beta_slow:
                raise ValueError(f"YaRN beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention sizes."""

    num_heads: int = 128
    q_lora_rank: Optional[int] = 1536  # None: plain q projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # eps of q_a_layernorm / kv_a_layernorm: HF hard-codes 1e-6 regardless of rms_norm_eps.
    lora_norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MLA {name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or None, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for rotary embedding, got {self.qk_rope_head_dim}")


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + fine-grained routed experts, routing and load balancing."""

    num_experts: int = 256
    topk: int = 8
    ffn_hidden_size: int = 2048  # per routed expert (moe_intermediate_size)
    num_shared_experts: int = 1  # shared MLP width = ffn_hidden_size * num_shared_experts
    score_function: str = "sigmoid"  # V3 "sigmoid"; V2 "softmax"
    # Group-limited routing: keep the best `group_topk` of `num_groups` contiguous groups.
    # Group score = sum of the top-2 (sigmoid) or the max (softmax, V2) inside the group.
    num_groups: int = 1
    group_topk: int = 1
    norm_topk_prob: bool = True  # ignored with softmax (as HF V2)
    routed_scaling_factor: float = 1.0
    enable_expert_bias: bool = False  # aux-loss-free balancing (V3)
    bias_update_rate: float = 1e-3
    load_balancing_type: str = "none"  # "none" | "aux_loss" (V2 expert-level) | "seq_aux_loss" (V3)
    aux_loss_coeff: float = 0.0
    z_loss_coeff: Optional[float] = None
    # Token drop. capacity_factor None = dropless.
    capacity_factor: Optional[float] = None
    pad_to_capacity: bool = False
    drop_policy: str = "probs"  # "probs": keep highest-probability tokens; "position": earliest tokens

    def validate(self) -> None:
        if self.num_experts <= 0 or self.topk <= 0 or self.ffn_hidden_size <= 0:
            raise ValueError(
                f"MoE needs positive num_experts, topk and ffn_hidden_size, got "
                f"{self.num_experts}, {self.topk}, {self.ffn_hidden_size}"
            )
        if self.topk > self.num_experts:
            raise ValueError(f"moe topk ({self.topk}) cannot exceed num_experts ({self.num_experts})")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.score_function not in _SCORE_FUNCTIONS:
            raise ValueError(f"router score function must be one of {_SCORE_FUNCTIONS}, got {self.score_function!r}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by num_groups ({self.num_groups})")
        if not 1 <= self.group_topk <= self.num_groups:
            raise ValueError(f"group_topk ({self.group_topk}) must be in [1, num_groups={self.num_groups}]")
        experts_per_group = self.num_experts // self.num_groups
        if self.topk > self.group_topk * experts_per_group:
            raise ValueError(
                f"topk ({self.topk}) exceeds the experts in the selected groups "
                f"({self.group_topk} x {experts_per_group})"
            )
        if self.num_groups > 1 and self.score_function == "sigmoid" and experts_per_group < 2:
            raise ValueError("sigmoid group-limited routing scores groups by their top-2 experts: need >= 2 experts per group")
        if self.load_balancing_type not in _LOAD_BALANCING:
            raise ValueError(f"load balancing type must be one of {_LOAD_BALANCING}, got {self.load_balancing_type!r}")
        if self.drop_policy not in _DROP_POLICIES:
            raise ValueError(f"token drop policy must be one of {_DROP_POLICIES}, got {self.drop_policy!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity factor must be positive, got {self.capacity_factor}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity needs a capacity factor (--moe-expert-capacity-factor)")
        if self.enable_expert_bias and self.score_function != "sigmoid":
            raise ValueError("the expert bias (aux-loss-free balancing) needs the sigmoid score function")


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): `num_layers` sequential depths sharing embedding and head."""

    num_layers: int = 0
    loss_scaling_factor: float = 0.1

    def validate(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"mtp num_layers must be >= 0, got {self.num_layers}")
        if self.loss_scaling_factor < 0:
            raise ValueError(f"mtp loss scaling factor must be >= 0, got {self.loss_scaling_factor}")


@dataclass(frozen=True)
class KernelConfig:
    """Which fused kernels to use where the device has them (each has a plain-torch fallback)."""

    use_fused_sdpa: bool = True  # torch SDPA on CPU/CUDA, FusedSDPA on HPU
    use_fast_softmax: bool = False  # HPU FusedSDPA fast softmax
    use_fused_sdpa_with_recompute: bool = False  # HPU FusedSDPA recompute mode
    use_fused_rmsnorm: bool = True  # HPU FusedRMSNorm
    use_grouped_gemm: bool = True  # torch grouped_mm where available, else a loop over experts


_RECOMPUTE_GRANULARITY = (None, "full", "selective")
_RECOMPUTE_METHODS = (None, "uniform", "block")
_RECOMPUTE_MODULES = ("core_attn", "moe")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation (Megatron's --recompute-* flags): trade compute for memory.

    full + uniform: the stage's layers in chunks of `num_layers`, each chunk's inputs kept only;
    full + block: the first `num_layers` layers of the stage, each recomputed on its own;
    selective: only the listed `modules` ("core_attn": the softmax(QK^T)V part; "moe": whole MoE MLPs).
    """

    granularity: Optional[str] = None
    method: Optional[str] = None
    num_layers: Optional[int] = None
    modules: tuple = ()

    def __post_init__(self) -> None:
        if self.granularity not in _RECOMPUTE_GRANULARITY:
            raise ValueError(f"--recompute-granularity must be one of full, selective; got {self.granularity!r}")
        if self.granularity == "full":
            if self.method not in ("uniform", "block"):
                raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
            if not self.num_layers or self.num_layers < 1:
                raise ValueError("--recompute-granularity full needs --recompute-num-layers >= 1")
        if self.method not in _RECOMPUTE_METHODS:
            raise ValueError(f"--recompute-method must be uniform or block, got {self.method!r}")
        unknown = [m for m in self.modules if m not in _RECOMPUTE_MODULES]
        if unknown:
            raise ValueError(f"--recompute-modules: unknown {unknown}; supported: {_RECOMPUTE_MODULES}")
        if self.granularity == "selective" and not self.modules:
            raise ValueError("--recompute-granularity selective needs --recompute-modules (core_attn and/or moe)")

    @property
    def core_attention(self) -> bool:
        return self.granularity == "selective" and "core_attn" in self.modules

    @property
    def moe(self) -> bool:
        return self.granularity == "selective" and "moe" in self.modules


@dataclass(frozen=True)
class DeepSeekConfig:
    """The whole model. Defaults are DeepSeek-V3 671B's sizes (see presets for others)."""

    vocab_size: int = 129280  # embedding rows (already padded if padding is wanted)
    hidden_size: int = 7168
    ffn_hidden_size: int = 18432  # dense MLP of the first_k_dense layers
    num_layers: int = 61
    first_k_dense: int = 3  # layers [0, first_k_dense) are dense, the rest MoE
    moe_layer_freq: int = 1  # among layers >= first_k_dense, every moe_layer_freq-th is MoE
    norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    init_method_std: float = 0.02
    tie_word_embeddings: bool = False
    params_dtype: str = "float32"
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self) -> None:
        self.validate()

    def is_moe_layer(self, layer_idx: int) -> bool:
        if layer_idx < self.first_k_dense:
            return False
        return (layer_idx - self.first_k_dense) % self.moe_layer_freq == 0

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"first_k_dense ({self.first_k_dense}) must be in [0, num_layers={self.num_layers}]")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype must be one of {_DTYPES}, got {self.params_dtype!r}")
        self.mla.validate()
        self.moe.validate()
        self.rope.validate()
        self.mtp.validate()
