"""Which checkpoint `train.resume` continues, and the identity check before any loading."""

from __future__ import annotations

import pytest

from megapatch.checkpoint.manager import CheckpointManager
from megapatch.checkpoint.resume import checkpoint_to_resume, resume_point
from megapatch.config import load_config
from megapatch.errors import CheckpointError
from tests.checkpoint.helpers import IDENTITY, write_step
from tests.fixtures import REPO

TINY = REPO / "configs" / "tiny.yaml"


def test_none_auto_and_a_path(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(checkpoints)
    cfg = lambda resume: load_config(TINY, [f"train.resume={resume}"])  # noqa: E731
    assert checkpoint_to_resume(cfg("none"), manager) is None
    assert checkpoint_to_resume(cfg("auto"), manager) is None  # nothing yet: start fresh

    write_step(checkpoints, 4)
    write_step(checkpoints, 8)
    interrupted = write_step(checkpoints, 12, complete=False)
    latest = checkpoint_to_resume(cfg("auto"), manager)
    assert latest.step == 8 and not interrupted.exists()  # auto clears an interrupted save
    assert checkpoint_to_resume(cfg(checkpoints / "step_00000004"), manager).step == 4
    assert checkpoint_to_resume(cfg(checkpoints), manager).step == 8
    with pytest.raises(CheckpointError, match=r"^train.resume=.*nowhere: no such directory"):
        checkpoint_to_resume(cfg(tmp_path / "nowhere"), manager)


def test_resume_point_reads_the_client_state_once_and_checks_it(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_step(checkpoints, 6)
    manager = CheckpointManager(checkpoints)
    cfg = load_config(TINY, ["train.resume=auto"])
    resume = resume_point(cfg, manager, IDENTITY)
    assert resume.checkpoint.step == 6 and resume.client_state.progress.global_step == 6

    other_model = {**IDENTITY, "model_config": {**IDENTITY["model_config"], "d_model": 64}}
    with pytest.raises(
        CheckpointError, match="holds a different model: model.d_model=32 there, 64 here"
    ):
        resume_point(cfg, manager, other_model)
    other_config = {**IDENTITY, "config_hash": "fedcba9876543210"}
    with pytest.raises(CheckpointError, match="belongs to a run with config hash 0123456789abcdef"):
        resume_point(cfg, manager, other_config)
