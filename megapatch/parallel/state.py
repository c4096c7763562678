"""Tensor-, data- and pipeline-parallel process groups, with Megatron-core names.

Ranks are laid out TP innermost, then DP, then PP (as Megatron-DeepSpeed lays out
DeepSpeed's pipeline topology): rank = pp * (DP * TP) + dp * TP + tp. With TP size t,
ranks [0..t-1] form the first TP group, so a TP group stays inside a node when t divides
the GPUs per node; data-parallel groups stride by t inside one pipeline stage, and a
pipeline runs over ranks DP x TP apart.

Before `initialize_model_parallel` the getters answer as if TP=1, PP=1 and DP=world, so
single-process code (tests, export, generation) needs no setup.
"""

from __future__ import annotations

import torch.distributed as dist

from megapatch.errors import ConfigError
from megapatch.logging_utils import get_logger

logger = get_logger("parallel")

_TENSOR_MODEL_PARALLEL_GROUP = None
_TENSOR_MODEL_PARALLEL_RANKS: list[int] | None = None
_DATA_PARALLEL_GROUP = None
_DATA_PARALLEL_RANKS: list[int] | None = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_RANKS: list[int] | None = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> None:
    """Create the TP, DP and PP groups. Call on every rank, after torch.distributed is
    initialized."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    global _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed to be initialized")
    if model_parallel_is_initialized():
        raise RuntimeError(
            "model parallel groups are already initialized; call destroy_model_parallel() first"
        )
    world_size = dist.get_world_size()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for name, size in (("tensor", tp), ("pipeline", pp)):
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name}_model_parallel_size={size!r} must be a positive integer")
    if world_size % (tp * pp):
        raise ConfigError(
            f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} must divide "
            f"the world size {world_size}"
        )
    dp = world_size // (tp * pp)
    rank = dist.get_rank()

    def layout(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    def own_group(all_ranks: list[list[int]]):
        """Create every group of one kind (new_group is collective: every rank creates
        every group, in the same order); return this rank's (group, ranks)."""
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = (group, ranks)
        return mine

    P, D, T = range(pp), range(dp), range(tp)
    _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS = own_group(
        [[layout(p, d, t) for t in T] for p in P for d in D]
    )
    _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = own_group(
        [[layout(p, d, t) for d in D] for p in P for t in T]
    )
    _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS = own_group(
        [[layout(p, d, t) for p in P] for d in D for t in T]
    )
    pipeline = f" x PP={pp}" if pp > 1 else ""
    logger.info("model parallel: TP=%d x DP=%d%s over %d ranks", tp, dp, pipeline, world_size)


def model_parallel_is_initialized() -> bool:
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays up), e.g. between tests."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    global _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS
    for group in (
        _TENSOR_MODEL_PARALLEL_GROUP,
        _DATA_PARALLEL_GROUP,
        _PIPELINE_MODEL_PARALLEL_GROUP,
    ):
        if group is not None and dist.is_initialized():
            dist.destroy_process_group(group)
    _TENSOR_MODEL_PARALLEL_GROUP = _TENSOR_MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_GROUP = _DATA_PARALLEL_RANKS = None
    _PIPELINE_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_RANKS = None


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _global_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# Tensor model parallel. Uninitialized: TP=1 and there is no group (TP=1 needs no collectives).


def get_tensor_model_parallel_group():
    return _TENSOR_MODEL_PARALLEL_GROUP


def get_tensor_model_parallel_ranks() -> list[int]:
    return _TENSOR_MODEL_PARALLEL_RANKS or [_global_rank()]


def get_tensor_model_parallel_world_size() -> int:
    return len(_TENSOR_MODEL_PARALLEL_RANKS) if _TENSOR_MODEL_PARALLEL_RANKS else 1


def get_tensor_model_parallel_rank() -> int:
    return get_tensor_model_parallel_ranks().index(_global_rank())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the broadcast source)."""
    return get_tensor_model_parallel_ranks()[0]


# Data parallel. Uninitialized: every rank is a DP rank of the whole world.


def get_data_parallel_group():
    if _DATA_PARALLEL_GROUP is not None:
        return _DATA_PARALLEL_GROUP
    return dist.group.WORLD if dist.is_initialized() else None


def get_data_parallel_group_ranks() -> list[int]:
    return _DATA_PARALLEL_RANKS or list(range(_global_world_size()))


def get_data_parallel_world_size() -> int:
    return len(get_data_parallel_group_ranks())


def get_data_parallel_rank() -> int:
    return get_data_parallel_group_ranks().index(_global_rank())


# Pipeline model parallel. Uninitialized: one stage.


def get_pipeline_model_parallel_group():
    return _PIPELINE_MODEL_PARALLEL_GROUP


def get_pipeline_model_parallel_ranks() -> list[int]:
    return _PIPELINE_MODEL_PARALLEL_RANKS or [_global_rank()]


def get_pipeline_model_parallel_world_size() -> int:
    return len(get_pipeline_model_parallel_ranks())


def get_pipeline_model_parallel_rank() -> int:
    return get_pipeline_model_parallel_ranks().index(_global_rank())


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1
