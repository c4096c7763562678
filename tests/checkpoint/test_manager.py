"""CheckpointManager: tags, COMPLETE and latest, pruning, and a save/load round trip with a
real DeepSpeed engine in real gloo processes."""

from __future__ import annotations

import pytest

from megapatch.checkpoint.manager import COMPLETE, LATEST, CheckpointManager, tag_for_step
from tests.distributed import run_distributed


def _fake(directory, step: int, complete: bool = True):
    path = directory / tag_for_step(step)
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text(f"{step}\n")
    return path


def test_finds_complete_checkpoints_and_trusts_latest_only_when_complete(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.complete_checkpoints() == []
    for step in (3, 6, 9):
        _fake(tmp_path, step)
    _fake(tmp_path, 12, complete=False)
    (tmp_path / "step_junk").mkdir()
    assert [c.step for c in manager.complete_checkpoints()] == [3, 6, 9]
    assert [p.name for p in manager.incomplete_checkpoints()] == ["step_00000012"]
    assert manager.latest().step == 9  # no `latest` file: the newest complete one
    (tmp_path / LATEST).write_text("step_00000006\n")
    assert manager.latest().step == 6
    (tmp_path / LATEST).write_text("step_00000012\n")  # names an incomplete one
    assert manager.latest().step == 9
    manager.remove_incomplete()
    assert not (tmp_path / "step_00000012").exists()
    manager._prune(keep="step_00000009")
    assert [c.step for c in manager.complete_checkpoints()] == [6, 9]


def _round_trip(rank, world_size, directory):
    import deepspeed
    import torch

    from megapatch.model import GPT
    from megapatch.parallel import destroy_model_parallel, initialize_model_parallel, mpu
    from tests.fixtures import tiny_gpt_config

    initialize_model_parallel(1)
    config = {
        "train_batch_size": 2 * world_size,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 2**62,
    }

    def engine():
        model = GPT(tiny_gpt_config(), seed=0)
        return deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config, mpu=mpu
        )[0]

    trained = engine()
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(rank))
    trained.backward(trained(ids[:, :-2], ids[:, 2:], patch_size=2))
    trained.step()
    manager = CheckpointManager(directory, keep_last=0)
    torch.manual_seed(100 + rank)
    path = manager.save(trained, 1, {"megapatch": {"progress": {}}}, rank_state={})
    expected_draw = torch.rand(3)  # the RNG stream right after the save
    again = manager.save(trained, 1, {"megapatch": {"progress": {}}}, rank_state={})  # a no-op

    fresh = engine()
    torch.manual_seed(0)  # overwritten by the checkpoint's RNG
    rank_state = manager.load(fresh, manager.latest())
    same = all(
        torch.equal(a, b)
        for a, b in zip(trained.module.state_dict().values(), fresh.module.state_dict().values())
    )
    moments = fresh.optimizer.optimizer.state  # ZeRO-1's torch AdamW state came back
    out = {
        "path": str(path),
        "again": str(again),
        "same_weights": same,
        "rng_restored": torch.equal(torch.rand(3), expected_draw),
        "rank_state_keys": sorted(rank_state),
        "adam_steps": sorted(int(s["step"]) for s in moments.values()),
    }
    trained.destroy()
    fresh.destroy()
    destroy_model_parallel()
    return out


@pytest.mark.distributed
@pytest.mark.usefixtures("kept_gloo_workers")
def test_save_and_load_round_trip_weights_optimizer_and_rng(tmp_path):
    results = run_distributed(_round_trip, 2, tmp_path, reuse_workers=True)
    step = tmp_path / "step_00000001"
    assert (step / COMPLETE).read_text() == "1\n"
    assert (tmp_path / LATEST).read_text() == "step_00000001\n"
    assert sorted(p.name for p in (step / "megapatch").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]
    for result in results:
        assert result["path"] == result["again"] == str(step)
        assert result["same_weights"] and result["rng_restored"]
        assert result["rank_state_keys"] == ["rng"]
        assert result["adam_steps"] and set(result["adam_steps"]) == {1}
