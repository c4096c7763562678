"""Tensor-parallel layers (Megatron-core names) and TP-independent initialisation.

Initialisation builds each parameter's full ("master") weight on the CPU from its own
seeded generator and keeps this rank's slice, so a TP=n model built from a seed holds
exactly the shards of the TP=1 model built from that seed. Each layer initialises its
weight from `seed` (None leaves it uninitialised for the caller, as GPT does to keep its
whole init policy in one place). Sharded parameters carry the
attributes DeepSpeed's grad-norm clipping looks for (`tensor_model_parallel`), plus
`partition_dim` for checkpoint conversion; replicated parameters carry none.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from megapatch.errors import ConfigError
from megapatch.ops import patch_embedding, vocab_parallel_patch_embedding
from megapatch.parallel.mappings import (
    all_gather_sequence,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_sequence,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megapatch.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int
) -> int:
    """Round the vocabulary up to a multiple of `make_vocab_size_divisible_by * tp`, as Megatron does."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed per (model seed, parameter name): independent of build order and TP."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def set_tensor_model_parallel_attributes(param: nn.Parameter, partition_dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


@torch.no_grad()
def init_weight_shard_(
    weight: torch.Tensor,
    partition_dim: int | None,
    *,
    std: float,
    seed: int,
    init_rows: int | None = None,
) -> None:
    """Fill `weight` with this rank's slice of a N(0, std²) master weight drawn from `seed`.

    `partition_dim` is None for a replicated weight. Rows from `init_rows` on (vocabulary
    padding) are zero, so the real rows do not depend on how much padding TP needs.
    """
    tp = get_tensor_model_parallel_world_size() if partition_dim is not None else 1
    full_shape = list(weight.shape)
    if partition_dim is not None:
        full_shape[partition_dim] *= tp
    rows = full_shape[0] if init_rows is None else init_rows
    generator = torch.Generator().manual_seed(seed)
    master = torch.zeros(full_shape, dtype=torch.float32)
    master[:rows].normal_(0.0, std, generator=generator)
    if partition_dim is not None:
        master = master.chunk(tp, dim=partition_dim)[get_tensor_model_parallel_rank()]
    weight.copy_(master)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ConfigError(
            f"{what}={numerator} is not divisible by the tensor parallel size {denominator}"
        )
    return numerator // denominator


class _SequenceGatherLinear(torch.autograd.Function):
    """y = all_gather_sequence(x)·Aᵀ, keeping only this rank's [B, L/tp, in] for backward,
    where it gathers again (Megatron's choice): saving the gathered input would cost more
    activation memory than sequence parallelism saves."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(all_gather_sequence(x), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = all_gather_sequence(x)  # [B, L, in]
        grad_input = grad @ weight  # [B, L, in]: this rank's partial sum
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ full.reshape(-1, full.shape[-1])
        return reduce_scatter_sequence(grad_input), grad_weight


class ColumnParallelLinear(nn.Module):
    """y = x·Aᵀ with A's output rows split over TP ranks: each rank holds A[out/tp, in].

    The input is replicated, or with `sequence_parallel` this rank's L/tp positions
    [B, L/tp, in], all-gathered here; the output is this rank's slice of the features
    unless `gather_output`. No bias (LLaMA has none).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        seed: int | None = 0,
        init_rows: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _divide(
            output_size, tp, "ColumnParallelLinear output_size"
        )
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(
            torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=device)
        )
        set_tensor_model_parallel_attributes(self.weight, partition_dim=0)
        if seed is not None:
            init_weight_shard_(self.weight, 0, std=init_std, seed=seed, init_rows=init_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # x [B, L/tp, in], gathered to [B, L, in] inside
            y = _SequenceGatherLinear.apply(x, self.weight)
        else:
            y = F.linear(copy_to_tensor_model_parallel_region(x), self.weight)  # [..., out/tp]
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, out_per_rank={self.output_size_per_partition}"


class RowParallelLinear(nn.Module):
    """y = x·Aᵀ with A's input columns split over TP ranks: each rank holds A[out, in/tp].

    The input is this rank's feature slice (`input_is_parallel`, the output of a
    ColumnParallelLinear) or is split here; the partial products are summed over TP, or
    with `sequence_parallel` summed and scattered along the sequence ([B, L/tp, out]).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, tp, "RowParallelLinear input_size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=device)
        )
        set_tensor_model_parallel_attributes(self.weight, partition_dim=1)
        if seed is not None:
            init_weight_shard_(self.weight, 1, std=init_std, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y)
        return reduce_from_tensor_model_parallel_region(y)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, in_per_rank={self.input_size_per_partition}"


class VocabParallelEmbedding(nn.Module):
    """Patch embedding with the vocabulary rows split over TP ranks.

    `forward(ids [..., K]) -> [..., D]`: the mean of the K token embeddings (K=1 is an
    ordinary embedding). `num_embeddings` is the padded vocabulary; rows from
    `init_rows` on are padding and start at zero.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_std: float = 0.02,
        seed: int | None = 0,
        init_rows: int | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = _divide(
            num_embeddings, tp, "VocabParallelEmbedding num_embeddings"
        )
        self.vocab_start_index = (
            get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        )
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition, embedding_dim, dtype=dtype, device=device
            )
        )
        set_tensor_model_parallel_attributes(self.weight, partition_dim=0)
        if seed is not None:
            init_weight_shard_(self.weight, 0, std=init_std, seed=seed, init_rows=init_rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_model_parallel_world_size() == 1:
            return patch_embedding(ids, self.weight, backend=self.backend)
        return vocab_parallel_patch_embedding(
            ids,
            self.weight,
            vocab_start=self.vocab_start_index,
            group=get_tensor_model_parallel_group(),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows_per_rank={self.num_embeddings_per_partition}"
