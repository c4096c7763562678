"""The client-state schema: written in one place, read back once, the same for every reader."""

from __future__ import annotations

import pytest
import torch

from megapatch.checkpoint.client_state import (
    CLIENT_KEY,
    IDENTITY_KEYS,
    ClientState,
    Progress,
    read_client_state,
)
from megapatch.errors import CheckpointError
from tests.checkpoint.helpers import IDENTITY as SHARED_IDENTITY

# a layout other than the defaults, so reading back cannot pass by falling back to them
IDENTITY = {**SHARED_IDENTITY, "tensor_model_parallel_size": 2, "data_parallel_size": 4}


def _state() -> ClientState:
    progress = Progress.start(["patch", "token"])
    progress.global_step, progress.phase_index, progress.step_in_phase = 9, 1, 1
    progress.consumed_windows["patch"], progress.tokens["patch"] = 32, 2048
    return ClientState(
        progress, {"run": {"dir": "runs/x"}, "train": {"precision": "bf16"}}, IDENTITY
    )


def test_progress_starts_at_zero_for_every_phase():
    p = Progress.start(["patch", "token"])
    assert p.global_step == 0 and p.consumed_windows == {"patch": 0, "token": 0}
    assert p.tokens == {"patch": 0, "token": 0} and p.wall_time == {"patch": 0.0, "token": 0.0}
    assert Progress.from_state_dict(p.state_dict()) == p


def test_written_in_the_layout_deepspeed_stores_and_read_back(tmp_path):
    state = _state()
    engine_arg = state.to_engine()
    assert set(engine_arg) == {CLIENT_KEY}
    # the identity sits at the top level of the "megapatch" dict, beside progress and config
    # (pipeline_model_parallel_size only when a pipeline run wrote it)
    expected = {"progress", "config", *IDENTITY_KEYS} - {"pipeline_model_parallel_size"}
    assert set(engine_arg[CLIENT_KEY]) == expected

    # DeepSpeed merges client_state into rank 0's model-states dict
    step_dir = tmp_path / "step_00000009"
    step_dir.mkdir()
    torch.save(
        {"module": {"w": torch.ones(2)}, **engine_arg}, step_dir / "mp_rank_00_model_states.pt"
    )
    back = read_client_state(step_dir)
    assert back == state
    assert back.step == 9 and back.tensor_model_parallel_size == 2
    assert back.zero_stage == 1 and back.data_parallel_size == 4
    assert back.model_config == IDENTITY["model_config"]


def test_the_zero3_file_name_is_found_too(tmp_path):
    torch.save(_state().to_engine(), tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert read_client_state(tmp_path).step == 9


def test_an_older_checkpoint_without_layout_keys_reads_with_defaults(tmp_path):
    old = {CLIENT_KEY: {"progress": {}, "config": {}, "model_config": {"d_model": 8}}}
    torch.save(old, tmp_path / "mp_rank_00_model_states.pt")
    state = read_client_state(tmp_path)
    assert state.tensor_model_parallel_size == 1 and state.zero_stage == 0
    assert state.data_parallel_size == 1 and state.progress == Progress()
    assert state.pipeline_model_parallel_size == 1


def test_missing_files_and_foreign_checkpoints_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no DeepSpeed model states"):
        read_client_state(tmp_path)
    torch.save({"module": {}}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError, match="no megapatch client state; not written by megapatch"
    ):
        read_client_state(tmp_path)
