"""Tensor parallelism: TP x DP process groups, the DeepSpeed mpu, autograd mappings and layers."""

from megapatch.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_weight_shard_,
    pad_vocab_size,
    parameter_seed,
    set_tensor_model_parallel_attributes,
)
from megapatch.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megapatch.parallel.mpu import ModelParallelUnit, mpu
from megapatch.parallel.state import (
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_group_ranks,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_ranks,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

__all__ = [
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_ranks",
    "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank",
    "get_data_parallel_group",
    "get_data_parallel_group_ranks",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "mpu",
    "ModelParallelUnit",
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "pad_vocab_size",
    "parameter_seed",
    "init_weight_shard_",
    "set_tensor_model_parallel_attributes",
]
