"""Process-group layout, getter defaults and the DeepSpeed mpu."""

import pytest
import torch.distributed as dist

from megapatch.errors import ConfigError
from megapatch.parallel import (
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
    mpu,
)
from tests.distributed import run_distributed

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")


def test_defaults_without_distributed_are_tp1_dp1():
    assert not model_parallel_is_initialized()
    assert get_tensor_model_parallel_world_size() == 1
    assert get_tensor_model_parallel_rank() == 0
    assert get_tensor_model_parallel_group() is None
    assert get_data_parallel_world_size() == 1
    assert get_data_parallel_rank() == 0
    assert get_data_parallel_group() is None


def test_mpu_refuses_to_answer_before_initialization():
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        mpu.get_model_parallel_group()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        mpu.get_data_parallel_world_size()


def _layout(rank, world_size, tp):
    # Before initialization: TP=1, DP = the whole world.
    defaults = (
        get_tensor_model_parallel_world_size(),
        get_data_parallel_world_size(),
        get_data_parallel_rank(),
        get_data_parallel_group() is dist.group.WORLD,
    )
    initialize_model_parallel(tp)
    tp_group, dp_group = get_tensor_model_parallel_group(), get_data_parallel_group()
    out = {
        "defaults": defaults,
        "tp_ranks": get_tensor_model_parallel_ranks(),
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "tp_src": get_tensor_model_parallel_src_rank(),
        "dp_ranks": get_data_parallel_group_ranks(),
        "dp_rank": get_data_parallel_rank(),
        "dp_size": get_data_parallel_world_size(),
        # The groups are real: their sizes and this rank's place in them agree.
        "tp_group": (dist.get_world_size(tp_group), dist.get_rank(tp_group)),
        "dp_group": (dist.get_world_size(dp_group), dist.get_rank(dp_group)),
        "mpu": (
            mpu.get_model_parallel_rank(),
            mpu.get_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_rank(),
            mpu.get_tensor_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_src_rank(),
            mpu.get_data_parallel_rank(),
            mpu.get_data_parallel_world_size(),
            mpu.get_data_parallel_group_ranks(),
            mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_model_parallel_group() is tp_group,
            mpu.get_tensor_model_parallel_group() is tp_group,
            mpu.get_data_parallel_group() is dp_group,
            hasattr(mpu, "initialize_sequence_parallel"),
        ),
    }
    try:
        initialize_model_parallel(tp)
        out["double_init"] = "allowed"
    except RuntimeError:
        out["double_init"] = "refused"
    destroy_model_parallel()
    try:
        initialize_model_parallel(3)
        out["tp3_error"] = None
    except ConfigError as e:
        out["tp3_error"] = str(e)
    out["after_destroy"] = (model_parallel_is_initialized(), get_tensor_model_parallel_world_size())
    return out


@pytest.mark.distributed
def test_tp_ranks_are_adjacent_and_dp_groups_stride_by_tp():
    results = run_distributed(_layout, 4, 2, reuse_workers=True)
    for rank, r in enumerate(results):
        assert r["defaults"] == (1, 4, rank, True)
        tp_first = rank // 2 * 2
        assert r["tp_ranks"] == [tp_first, tp_first + 1]
        assert r["tp_rank"] == rank % 2 and r["tp_size"] == 2 and r["tp_src"] == tp_first
        assert r["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert r["dp_rank"] == rank // 2 and r["dp_size"] == 2
        assert r["tp_group"] == (2, rank % 2)
        assert r["dp_group"] == (2, rank // 2)
        assert r["mpu"] == (
            rank % 2,
            2,
            rank % 2,
            2,
            tp_first,
            rank // 2,
            2,
            [rank % 2, rank % 2 + 2],
            1,
            True,
            True,
            True,
            False,  # its presence would make ZeRO ignore the model-parallel group
        )
        assert r["double_init"] == "refused"
        assert r["after_destroy"] == (False, 1)
        assert r["tp3_error"] == (
            "tensor_model_parallel_size=3 x pipeline_model_parallel_size=1 must divide the "
            "world size 4"
        )


def _pipeline_layout(rank, world_size, tp, pp):
    from megapatch import parallel

    parallel.initialize_model_parallel(tp, pp)
    try:
        topology = parallel.pipeline_topology(tp, pp, world_size // (tp * pp))
        coord = topology.get_coord(rank)

        def group_of(axis):
            return next(g for g in topology.get_axis_comm_lists(axis) if rank in g)

        return {
            "ours": (
                parallel.get_tensor_model_parallel_ranks(),
                parallel.get_data_parallel_group_ranks(),
                parallel.get_pipeline_model_parallel_ranks(),
                (
                    parallel.get_tensor_model_parallel_rank(),
                    parallel.get_data_parallel_rank(),
                    parallel.get_pipeline_model_parallel_rank(),
                ),
                (parallel.is_pipeline_first_stage(), parallel.is_pipeline_last_stage()),
            ),
            "deepspeed": (
                group_of("model") if tp > 1 else [rank],
                group_of("data"),
                group_of("pipe"),
                (coord.model, coord.data, coord.pipe),
                (coord.pipe == 0, coord.pipe == pp - 1),
            ),
        }
    finally:
        parallel.destroy_model_parallel()


@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp", [(2, 2), (1, 2)])
def test_pipeline_groups_are_deepspeeds_topology_tp_innermost_then_dp_then_pp(tp, pp):
    results = run_distributed(_pipeline_layout, 4, tp, pp, reuse_workers=True)
    for rank, r in enumerate(results):
        assert r["ours"] == r["deepspeed"], rank
        dp = 4 // (tp * pp)
        assert r["ours"][3] == (rank % tp, rank // tp % dp, rank // (tp * dp))
