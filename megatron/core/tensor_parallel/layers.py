"""Tensor-parallel linear and embedding layers (Megatron's column / row / vocab split).

Sharding (tp = tensor-parallel group size, r = this rank's index in the group):
- ColumnParallelLinear: weight [out/tp, in] = rows r*out/tp:(r+1)*out/tp of the full [out, in];
  bias [out/tp]. Output features are split, so no communication in forward (unless gathered).
- RowParallelLinear: weight [out, in/tp] = columns of the full weight; bias [out] replicated and
  added once, after the partial products are summed (all-reduce, or reduce-scatter with SP).
- VocabParallelEmbedding: weight [vocab/tp, hidden] = rows of the full table.

Sequence parallelism (SP): activations outside the TP GEMMs are split along the sequence, [s/tp, b, h]
(sequence-first). A column-parallel layer all-gathers its input along the sequence; a row-parallel
layer (and the embedding) reduce-scatters its output along the sequence instead of all-reducing.

Initialisation: a layer used on its own fills its shard from the FULL fp32 weight built on the CPU
with `init_method` (drawing from `generator`, or the global CPU generator), so TP=1 and TP=2 hold the
same full weights for the same seed; `full_init=False` fills the shard directly. `init_method=None`
leaves the weight uninitialised for the caller: the DeepSeek model does that and initialises every
parameter in one place (`megatron.core.models.deepseek.init`).

Parameter attributes read by gradient / checkpoint code:
- ``tensor_model_parallel = True`` and ``partition_dim`` on sharded parameters (their grad-norm
  contributions add over TP ranks; replicated parameters must be counted once);
- ``sequence_parallel = True`` on the row-parallel bias under SP: each rank's grad covers only its
  sequence chunk, so grads of such parameters must be summed over the TP group before the optimizer
  step (`allreduce_sequence_parallel_grads`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from megatron.core import communication as comm
from megatron.core.device import device_of
from torch import Tensor, nn

from megatron.core.tensor_parallel.mappings import (
    Group,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_from_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_region,
    split_along_dim,
)

InitMethod = Callable[[Tensor, Optional[torch.Generator]], None]


def dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, use_onednn: bool = True) -> Tensor:
    """F.linear(x, weight, bias). With `use_onednn`, fp32 GEMMs on CPU run through oneDNN where the
    device layer has it (`megatron.core.onednn`: about 2x torch's default BLAS on the AMD EPYC measured)."""
    gemm = device_of(x).onednn_gemm(x, weight) if use_onednn else None
    if gemm is not None:
        return gemm.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose GEMMs go through `dense_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, use_onednn: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.use_onednn = use_onednn

    def forward(self, x: Tensor) -> Tensor:
        return dense_linear(x, self.weight, self.bias, self.use_onednn)


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std^2) in place (Megatron's default `--init-method-std 0.02`)."""

    def init(weight: Tensor, generator: Optional[torch.Generator] = None) -> None:
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)

    return init


DEFAULT_INIT = normal_init()


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or a ValueError naming both sizes."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def shard_tensor(full: Tensor, dim: int, group: Group) -> Tensor:
    """This rank's slice of a full (unsharded) tensor along `dim`; identity for TP=1.

    Used to copy a single-process model's weights into TP shards (tests, checkpoint conversion).
    Returns a new contiguous tensor (never a view sharing storage with `full`).
    """
    divide(full.shape[dim], group_size(group), f"dim {dim} of a tensor of shape {tuple(full.shape)}")
    return split_along_dim(full, dim, group).clone()


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]


def _init_weight(
    shard_shape: tuple,
    full_shape: tuple,
    dim: int,
    group: Group,
    init_method: Optional[InitMethod],
    generator: Optional[torch.Generator],
    full_init: bool,
    dtype: Optional[torch.dtype],
    device: Optional[torch.device],
) -> nn.Parameter:
    """A weight shard, initialised from the full weight (default), directly, or not at all
    (`init_method` None; see module doc)."""
    if init_method is None:
        return nn.Parameter(torch.empty(shard_shape, dtype=dtype, device=device))
    if full_init:
        full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
        init_method(full, generator)
        shard = shard_tensor(full, dim, group)
        return nn.Parameter(shard.to(dtype=dtype or torch.get_default_dtype(), device=device))
    shard = torch.empty(shard_shape, dtype=dtype, device=device)
    init_method(shard, generator)
    return nn.Parameter(shard)


def _copy_checked(param: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shard shape {tuple(value.shape)} does not match the parameter {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A's output rows split over the TP group.

    Input [s, b, in] ([s/tp, b, in] with sequence_parallel, gathered along `sequence_dim`, 0 by
    default; 1 for batch-first activations), or any [.., in]
    without SP. Output [.., out/tp], or [.., out] with gather_output (not allowed with SP: the next
    layer of a column layer is a row-parallel layer that consumes the split features).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: Group = None,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        init_method: Optional[InitMethod] = DEFAULT_INIT,
        generator: Optional[torch.Generator] = None,
        full_init: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        use_onednn: bool = True,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        self.use_onednn = use_onednn  # `dense_linear`
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output and sequence_parallel cannot both be set")
        self.input_size, self.output_size = input_size, output_size
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.sequence_dim = sequence_dim  # 0 for [s, b, h] activations, 1 for batch-first [b, s, h]
        self.output_size_per_partition = divide(output_size, tp, "ColumnParallelLinear output_size")
        self.weight = _init_weight(
            (self.output_size_per_partition, input_size), (output_size, input_size), 0, group,
            init_method, generator, full_init, dtype, device,
        )
        _mark_sharded(self.weight, 0)
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=self.weight.dtype, device=self.weight.device))
            _mark_sharded(self.bias, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            # [s/tp, b, in] -> [s, b, in] (along sequence_dim); bwd reduce-scatter
            x = gather_from_sequence_parallel_region(x, self.group, self.sequence_dim)
        else:
            x = copy_to_region(x, self.group)  # bwd all-reduce of the partial input grads
        out = dense_linear(x, self.weight, self.bias, self.use_onednn)
        return gather_from_region(out, self.group) if self.gather_output else out

    def load_full_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Copy this rank's rows of a full [out, in] weight (and [out] bias) into the shard."""
        _copy_checked(self.weight, shard_tensor(weight, 0, self.group), "ColumnParallelLinear.weight")
        if bias is not None:
            if self.bias is None:
                raise ValueError("ColumnParallelLinear was built with bias=False but a bias was given")
            _copy_checked(self.bias, shard_tensor(bias, 0, self.group), "ColumnParallelLinear.bias")

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A's input columns split over the TP group.

    Input [.., in/tp] (input_is_parallel, the usual case after a ColumnParallelLinear) or [.., in]
    (split here). Output [.., out] all-reduced; with sequence_parallel the input must be [s, b, in/tp]
    and the output is reduce-scattered along the sequence to [s/tp, b, out]. The bias is added after
    the reduction so it is counted once, not tp times.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: Group = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        init_method: Optional[InitMethod] = DEFAULT_INIT,
        generator: Optional[torch.Generator] = None,
        full_init: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        use_onednn: bool = True,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        self.use_onednn = use_onednn  # `dense_linear`
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.sequence_dim = sequence_dim
        self.input_size_per_partition = divide(input_size, tp, "RowParallelLinear input_size")
        self.weight = _init_weight(
            (output_size, self.input_size_per_partition), (output_size, input_size), 1, group,
            init_method, generator, full_init, dtype, device,
        )
        _mark_sharded(self.weight, 1)
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(output_size, dtype=self.weight.dtype, device=self.weight.device))
            self.bias.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        partial = dense_linear(x, self.weight, None, self.use_onednn)  # this rank's share of X A^T: [.., out]
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.group, self.sequence_dim)
        else:
            out = reduce_from_region(partial, self.group)
        return out if self.bias is None else out + self.bias

    def load_full_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Copy this rank's columns of a full [out, in] weight (and the whole [out] bias)."""
        _copy_checked(self.weight, shard_tensor(weight, 1, self.group), "RowParallelLinear.weight")
        if bias is not None:
            if self.bias is None:
                raise ValueError("RowParallelLinear was built with bias=False but a bias was given")
            _copy_checked(self.bias, bias, "RowParallelLinear.bias")

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table with its vocabulary rows split over the TP group.

    Rank r owns ids [r*V/tp, (r+1)*V/tp). Ids outside that range look up row 0 and are zeroed, and
    the per-rank results are summed (all-reduce), so each token gets exactly its owner's row.
    Input ids [..] -> output [.., hidden]. With sequence_parallel the ids must be sequence-first
    [s, b] and the output is reduce-scattered along the sequence to [s/tp, b, hidden].
    The vocabulary must be divisible by tp (pad it beforehand, as Megatron does).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: Group = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        init_method: Optional[InitMethod] = DEFAULT_INIT,
        generator: Optional[torch.Generator] = None,
        full_init: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group, self.sequence_parallel = group, sequence_parallel
        self.sequence_dim = sequence_dim
        self.num_embeddings_per_partition = divide(num_embeddings, tp, "VocabParallelEmbedding vocabulary size")
        self.vocab_start_index = group_rank(group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _init_weight(
            (self.num_embeddings_per_partition, embedding_dim), (num_embeddings, embedding_dim), 0, group,
            init_method, generator, full_init, dtype, device,
        )
        _mark_sharded(self.weight, 0)

    def forward(self, ids: Tensor) -> Tensor:
        if group_size(self.group) > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local = (ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group, self.sequence_dim)
        return reduce_from_region(out, self.group)

    def load_full_weight(self, weight: Tensor) -> None:
        """Copy this rank's rows of a full [vocab, hidden] table into the shard."""
        _copy_checked(self.weight, shard_tensor(weight, 0, self.group), "VocabParallelEmbedding.weight")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (per rank {self.num_embeddings_per_partition}), {self.embedding_dim}, "
                f"sequence_parallel={self.sequence_parallel}")


def allreduce_sequence_parallel_grads(params: Iterable[nn.Parameter], group: Group) -> None:
    """Sum over the TP group the grads of parameters marked ``sequence_parallel`` (in place).

    Under SP, replicated parameters that act on sequence-split activations (row-parallel biases,
    norms) see only their rank's tokens; the full grad is the sum over the TP ranks. Call after
    backward, before gradient clipping and the optimizer step.
    """
    if group_size(group) == 1:
        return
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
    comm.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
