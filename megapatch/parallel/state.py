"""Tensor-parallel x data-parallel process groups, with Megatron-core names.

Ranks are laid out TP-first: with TP size t, ranks [0..t-1] form the first TP group,
[t..2t-1] the second, and so on, so a TP group stays inside a node when t divides the
GPUs per node. Data-parallel groups stride by t: {0, t, 2t, ...}, {1, t+1, ...}.

Before `initialize_model_parallel` the getters answer as if TP=1 and DP=world, so
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


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Create the TP and DP groups. Call on every rank, after torch.distributed is initialized."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed to be initialized")
    if model_parallel_is_initialized():
        raise RuntimeError(
            "model parallel groups are already initialized; call destroy_model_parallel() first"
        )
    world_size = dist.get_world_size()
    tp = tensor_model_parallel_size
    if not isinstance(tp, int) or tp < 1 or world_size % tp != 0:
        raise ConfigError(
            f"tensor_model_parallel_size={tp!r} must be a positive integer dividing the world size {world_size}"
        )
    rank = dist.get_rank()

    # Every rank must create every group, in the same order (new_group is collective).
    for first in range(0, world_size, tp):
        ranks = list(range(first, first + tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS = group, ranks
    for offset in range(tp):
        ranks = list(range(offset, world_size, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = group, ranks
    logger.info("model parallel: TP=%d x DP=%d over %d ranks", tp, world_size // tp, world_size)


def model_parallel_is_initialized() -> bool:
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays up), e.g. between tests."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    for group in (_TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP):
        if group is not None and dist.is_initialized():
            dist.destroy_process_group(group)
    _TENSOR_MODEL_PARALLEL_GROUP = _TENSOR_MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_GROUP = _DATA_PARALLEL_RANKS = None


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
