"""Pipeline parallelism on DeepSpeed's pipeline engine: the topology and the stage split.

The topology is DeepSpeed's `PipeModelDataParallelTopology` with the axes (pipe, data,
model): the tensor-parallel ("model") axis innermost, as megapatch.parallel.state lays
out its own groups, so both agree on every rank's coordinates.

The split is by parameters (DeepSpeed's `partition_balanced` over each layer's count),
from counts worked out from the model's shape: DeepSpeed's own "parameters" method
builds every layer on every rank to count it, which for a large model is the whole model
in each process.
"""

from __future__ import annotations


def pipeline_topology(tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                      data_parallel_size: int):  # fmt: skip
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(
        num_pp=pipeline_model_parallel_size,
        num_mp=tensor_model_parallel_size,
        num_dp=data_parallel_size,
    )


def partition_layers(layer_parameters: list[int], stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., len(layers)] that balance the parameters per stage
    (stage s holds layers parts[s] to parts[s+1]-1)."""
    from deepspeed.runtime.utils import partition_balanced

    return [int(b) for b in partition_balanced(weights=list(layer_parameters), num_parts=stages)]


__all__ = ["pipeline_topology", "partition_layers"]
