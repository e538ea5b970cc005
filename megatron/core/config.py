"""Frozen model configuration for DeepSeek-V3 / V2, each dataclass validated where it is built.

Config flows one way: argparse flags (megatron/training/arguments.py) or an HF `config.json`
(megatron/core/models/deepseek/hf_config.py) -> these dataclasses -> module constructors.
Core code never reads the environment or a global args object.

Fields that a Megatron command-line flag sets carry that flag in their metadata (`flag_field`):
error messages name the flag a user has to change, and the training package maps "plain" fields
(the flag's value is the field's value) to and from flags without per-field code. "Derived"
fields are computed from one or more flags by the training package's model-flag adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple


def flag_field(default: Any, flag: str, derived: bool = False) -> Any:
    """A dataclass field set by the Megatron flag `flag`; `derived`: not simply the flag's value."""
    return field(default=default, metadata={"flag": flag, "derived": derived})


def flag_of(config: Any, name: str) -> str:
    """The flag that sets field `name` of a config dataclass (or instance), else the field name."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get("flag", name)
    raise AttributeError(f"{type(config).__name__} has no field {name!r}")

_SCORE_FUNCTIONS = ("sigmoid", "softmax")
_LOAD_BALANCING = ("none", "aux_loss", "seq_aux_loss")
_DROP_POLICIES = ("probs", "position")
_ROPE_SCALING = (None, "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the decoupled `qk_rope_head_dim` slice, with optional YaRN."""

    theta: float = flag_field(10000.0, "--rotary-base", derived=True)
    # True: DeepSeek's interleaved pairs (x[2i], x[2i+1]); HF V3 lays the rotated result out as
    # [evens | odds] (rope_interleave=True) and V2 keeps it interleaved (complex rotation).
    # False: standard rotate-half.
    interleave: bool = flag_field(True, "--rotary-interleaved", derived=True)
    # V2's complex-rotation layout keeps the output interleaved; V3's permutes to [evens | odds].
    # Both give the same q.k; the flag only matters for matching HF intermediate tensors.
    interleave_output_permuted: bool = True
    scaling_type: Optional[str] = flag_field(None, "--rope-type", derived=True)  # None or "yarn"
    factor: float = flag_field(1.0, "--rotary-scaling-factor")
    original_max_position_embeddings: int = flag_field(4096, "--original-max-position-embeddings", derived=True)
    beta_fast: float = flag_field(32.0, "--beta-fast")
    beta_slow: float = flag_field(1.0, "--beta-slow")
    mscale: float = flag_field(1.0, "--mscale")
    mscale_all_dim: float = flag_field(0.0, "--mscale-all-dim")

    def __post_init__(self) -> None:
        f = lambda name: flag_of(self, name)  # noqa: E731
        if self.scaling_type not in _ROPE_SCALING:
            raise ValueError(f"{f('scaling_type')} must be rope or yarn, got {self.scaling_type!r}")
        if self.theta <= 0:
            raise ValueError(f"{f('theta')} must be positive, got {self.theta}")
        if self.scaling_type == "yarn":
            if self.factor < 1.0:
                raise ValueError(f"{f('factor')} (the YaRN factor) must be >= 1, got {self.factor}")
            if self.beta_fast <= self.beta_slow:
                raise ValueError(f"{f('beta_fast')} ({self.beta_fast}) must exceed {f('beta_slow')} ({self.beta_slow})")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention sizes."""

    num_heads: int = flag_field(128, "--num-attention-heads")
    q_lora_rank: Optional[int] = flag_field(1536, "--q-lora-rank")  # None: plain q projection (V2-Lite)
    kv_lora_rank: int = flag_field(512, "--kv-lora-rank")
    qk_nope_head_dim: int = flag_field(128, "--qk-head-dim")
    qk_rope_head_dim: int = flag_field(64, "--qk-pos-emb-head-dim")
    v_head_dim: int = flag_field(128, "--v-head-dim")
    attention_bias: bool = False
    # eps of q_a_layernorm / kv_a_layernorm: HF hard-codes 1e-6 regardless of rms_norm_eps.
    lora_norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def __post_init__(self) -> None:
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag_of(self, name)} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"{flag_of(self, 'q_lora_rank')} must be positive (or unset), got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{flag_of(self, 'qk_rope_head_dim')} must be even for rotary embedding, got {self.qk_rope_head_dim}")


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + fine-grained routed experts, routing and load balancing."""

    num_experts: int = flag_field(256, "--num-experts")
    topk: int = flag_field(8, "--moe-router-topk")
    # per routed expert (moe_intermediate_size)
    ffn_hidden_size: int = flag_field(2048, "--moe-ffn-hidden-size", derived=True)
    # shared MLP width = ffn_hidden_size * num_shared_experts
    num_shared_experts: int = flag_field(1, "--moe-shared-expert-intermediate-size", derived=True)
    score_function: str = flag_field("sigmoid", "--moe-router-score-function")  # V3 "sigmoid"; V2 "softmax"
    # Group-limited routing: keep the best `group_topk` of `num_groups` contiguous groups.
    # Group score = sum of the top-2 (sigmoid) or the max (softmax, V2) inside the group.
    num_groups: int = flag_field(1, "--moe-router-num-groups", derived=True)
    group_topk: int = flag_field(1, "--moe-router-group-topk", derived=True)
    # ignored with softmax (as HF V2)
    norm_topk_prob: bool = flag_field(True, "--moe-router-score-function", derived=True)
    routed_scaling_factor: float = flag_field(1.0, "--moe-router-topk-scaling-factor", derived=True)
    enable_expert_bias: bool = flag_field(False, "--moe-router-enable-expert-bias")  # aux-loss-free balancing (V3)
    bias_update_rate: float = flag_field(1e-3, "--moe-router-bias-update-rate")
    # "none" | "aux_loss" (V2 expert-level) | "seq_aux_loss" (V3)
    load_balancing_type: str = flag_field("none", "--moe-router-load-balancing-type")
    aux_loss_coeff: float = flag_field(0.0, "--moe-aux-loss-coeff")
    z_loss_coeff: Optional[float] = flag_field(None, "--moe-z-loss-coeff")
    # Token drop. capacity_factor None = dropless.
    capacity_factor: Optional[float] = flag_field(None, "--moe-expert-capacity-factor")
    pad_to_capacity: bool = flag_field(False, "--moe-pad-expert-input-to-capacity")
    # "probs": keep highest-probability tokens; "position": earliest tokens
    drop_policy: str = flag_field("probs", "--moe-token-drop-policy")

    def __post_init__(self) -> None:
        f = lambda name: flag_of(self, name)  # noqa: E731
        for name in ("num_experts", "topk", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{f(name)} must be positive, got {getattr(self, name)}")
        if self.topk > self.num_experts:
            raise ValueError(f"{f('topk')} ({self.topk}) cannot exceed {f('num_experts')} ({self.num_experts})")
        if self.num_shared_experts < 0:
            raise ValueError(f"the number of shared experts must be >= 0, got {self.num_shared_experts}")
        if self.score_function not in _SCORE_FUNCTIONS:
            raise ValueError(f"{f('score_function')} must be one of {_SCORE_FUNCTIONS}, got {self.score_function!r}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"{f('num_experts')} ({self.num_experts}) must be divisible by {f('num_groups')} ({self.num_groups})")
        if not 1 <= self.group_topk <= self.num_groups:
            raise ValueError(f"{f('group_topk')} ({self.group_topk}) must be in [1, {f('num_groups')} = {self.num_groups}]")
        experts_per_group = self.num_experts // self.num_groups
        if self.topk > self.group_topk * experts_per_group:
            raise ValueError(
                f"{f('topk')} ({self.topk}) exceeds the experts in the selected groups "
                f"({f('group_topk')} {self.group_topk} x {experts_per_group} experts per group)"
            )
        if self.num_groups > 1 and self.score_function == "sigmoid" and experts_per_group < 2:
            raise ValueError(
                f"sigmoid group-limited routing scores groups by their top-2 experts: need >= 2 experts per group "
                f"({f('num_experts')} / {f('num_groups')})"
            )
        if self.load_balancing_type not in _LOAD_BALANCING:
            raise ValueError(f"{f('load_balancing_type')} must be one of {_LOAD_BALANCING}, got {self.load_balancing_type!r}")
        if self.drop_policy not in _DROP_POLICIES:
            raise ValueError(f"{f('drop_policy')} must be one of {_DROP_POLICIES}, got {self.drop_policy!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"{f('capacity_factor')} must be positive, got {self.capacity_factor}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError(f"{f('pad_to_capacity')} needs {f('capacity_factor')}")
        if self.enable_expert_bias and self.score_function != "sigmoid":
            raise ValueError(f"{f('enable_expert_bias')} needs {f('score_function')} sigmoid (DeepSeek-V3 routing)")


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): `num_layers` sequential depths sharing embedding and head."""

    num_layers: int = flag_field(0, "--mtp-num-layers", derived=True)
    loss_scaling_factor: float = flag_field(0.1, "--mtp-loss-scaling-factor")

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"{flag_of(self, 'num_layers')} must be >= 0, got {self.num_layers}")
        if self.loss_scaling_factor < 0:
            raise ValueError(f"{flag_of(self, 'loss_scaling_factor')} must be >= 0, got {self.loss_scaling_factor}")


@dataclass(frozen=True)
class KernelConfig:
    """Which fused kernels to use where the device has them (each has a plain-torch fallback)."""

    use_fused_sdpa: bool = flag_field(True, "--use-fused-sdpa")  # torch SDPA on CPU/CUDA, FusedSDPA on HPU
    use_fast_softmax: bool = flag_field(False, "--use-fast-softmax")  # HPU FusedSDPA fast softmax
    use_fused_sdpa_with_recompute: bool = flag_field(False, "--use-fused-sdpa-with-recompute")  # HPU FusedSDPA recompute mode
    use_fused_rmsnorm: bool = flag_field(True, "--use-fused-rmsnorm")  # HPU FusedRMSNorm
    # torch grouped_mm where available, else a loop over experts
    use_grouped_gemm: bool = flag_field(True, "--moe-grouped-gemm")
    # fp32 linear-layer GEMMs on CPU through oneDNN instead of torch's default BLAS (megatron.core.onednn)
    use_onednn_linear: bool = flag_field(True, "--use-onednn-linear")
    # Intel's fused RoPE on HPU where it fits MLA's rope layout (Megatron's --no-rope-fusion turns it off)
    use_fused_rope: bool = flag_field(True, "--no-rope-fusion", derived=True)
    # HPU lazy mode: end the accumulated graph after every decoder layer (smaller graphs that
    # compile faster, at the price of more launches); no effect elsewhere
    mark_step_per_layer: bool = flag_field(False, "--mark-step-per-layer")


_RECOMPUTE_GRANULARITY = (None, "full", "selective")
_RECOMPUTE_METHODS = (None, "uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "moe")


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
    modules: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.granularity not in _RECOMPUTE_GRANULARITY:
            raise ValueError(f"--recompute-granularity must be one of full, selective; got {self.granularity!r}")
        if self.method not in _RECOMPUTE_METHODS:
            raise ValueError(f"--recompute-method must be uniform or block, got {self.method!r}")
        if self.granularity == "full":
            if self.method is None or not self.num_layers or self.num_layers < 1:
                raise ValueError(
                    "--recompute-granularity full needs --recompute-method (uniform|block) and --recompute-num-layers >= 1"
                )
            if self.modules:
                raise ValueError("--recompute-modules applies to --recompute-granularity selective only")
        elif self.method is not None or self.num_layers is not None:
            raise ValueError("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only")
        elif self.modules and self.granularity != "selective":
            raise ValueError("--recompute-modules needs --recompute-granularity selective")
        unknown = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        if unknown:
            raise ValueError(f"--recompute-modules {' '.join(unknown)}: not supported; supported: {' '.join(RECOMPUTE_MODULES)}")
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
    """The whole model. Defaults are DeepSeek-V3 671B's sizes (see presets for others).

    `vocab_size` is the tokenizer's vocabulary. The embedding and output layer get
    `padded_vocab_size(tp)` rows (a multiple of `make_vocab_size_divisible_by` x TP, as Megatron
    pads); the padding rows never take part in a result: their logits are excluded from the
    softmax and the loss, and checkpoints store only the real rows.
    """

    vocab_size: int = flag_field(129280, "--vocab-size", derived=True)
    make_vocab_size_divisible_by: int = flag_field(1, "--make-vocab-size-divisible-by")
    hidden_size: int = flag_field(7168, "--hidden-size")
    ffn_hidden_size: int = flag_field(18432, "--ffn-hidden-size", derived=True)  # dense MLP of the first_k_dense layers
    num_layers: int = flag_field(61, "--num-layers")
    first_k_dense: int = flag_field(3, "--moe-layer-freq", derived=True)  # layers [0, first_k_dense) are dense, the rest MoE
    # among layers >= first_k_dense, every moe_layer_freq-th is MoE
    moe_layer_freq: int = flag_field(1, "--moe-layer-freq", derived=True)
    norm_eps: float = flag_field(1e-6, "--norm-epsilon")
    max_position_embeddings: int = flag_field(4096, "--max-position-embeddings", derived=True)
    init_method_std: float = flag_field(0.02, "--init-method-std")
    tie_word_embeddings: bool = flag_field(False, "--untie-embeddings-and-output-weights", derived=True)
    params_dtype: str = flag_field("float32", "--bf16", derived=True)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self) -> None:
        f = lambda name: flag_of(self, name)  # noqa: E731
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{f(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(
                f"{f('first_k_dense')}: {self.first_k_dense} leading dense layers do not fit in {f('num_layers')} {self.num_layers}"
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"{f('moe_layer_freq')} must be >= 1, got {self.moe_layer_freq}")
        if self.norm_eps <= 0:
            raise ValueError(f"{f('norm_eps')} must be positive, got {self.norm_eps}")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params dtype must be one of {_DTYPES}, got {self.params_dtype!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        if layer_idx < self.first_k_dense:
            return False
        return (layer_idx - self.first_k_dense) % self.moe_layer_freq == 0

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Embedding / output rows: vocab_size rounded up to a multiple of divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple
