"""Multi-stage patch schedules end to end, in real processes: K=4 -> K=2 -> token, a
SIGKILL in every stage, the switches, the weighted targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training.conftest import run_train, train_records

pytestmark = pytest.mark.slow

# TINY_OVERRIDES' 12 steps: 3 at K=4 (4 sequences of 64 tokens), 3 at K=2 (8 of 32), 6
# token steps (16 of 16); warmup 2 < 3. The first stage weights its targets.
STAGES = "patch.stages=[{size: 4, fraction: 0.25, position_weights: [4, 3, 2, 1]}, {size: 2, fraction: 0.25}]"
PHASES = ["patch1"] * 3 + ["patch2"] * 3 + ["token"] * 6


@pytest.fixture(scope="module")
def staged_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged") / "run"
    run_train(tiny_corpus, run_dir, STAGES)
    return run_dir


def test_every_stage_runs_with_its_own_shape_and_validation(staged_run):
    records = train_records(staged_run)
    assert [r["phase"] for r in records] == PHASES
    assert [r["patch_size"] for r in records] == [4] * 3 + [2] * 3 + [1] * 6
    assert np.all(np.diff([0] + [r["tokens"] for r in records]) == 256)
    assert [r["step"] for r in records if r.get("switch")] == [3, 6]
    evals = {r["step"]: r for r in records if "val_loss" in r}
    assert "val_patch_loss" in evals[4] and "val_patch_loss" not in evals[8]  # K=2 stage, token
    ckpts = sorted(p.name for p in (staged_run / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{s:08d}" for s in (3, 6, 9, 12)]  # interval 3 = the switches here
    summary = json.loads((staged_run / "summary.json").read_text())
    assert summary["tokens"] == {"patch1": 768, "patch2": 768, "token": 1536}


def test_killed_in_every_stage_and_resumed_equals_uninterrupted(staged_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    for kill_after in (2, 4, 8):  # in patch1, patch2 and the token phase
        killed = run_train(
            tiny_corpus,
            run_dir,
            STAGES,
            env={"MEGAPATCH_FAULT_KILL_AFTER_STEP": str(kill_after)},
            check=False,
        )
        assert killed.returncode == -9, killed.stderr[-2000:]
    run_train(tiny_corpus, run_dir, STAGES)
    resumed, reference = train_records(run_dir), train_records(staged_run)
    assert [r["phase"] for r in resumed] == PHASES
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=0, atol=1e-6
    )
    assert [r["data_crc"] for r in resumed] == [r["data_crc"] for r in reference]


def test_position_weights_reach_the_loss(staged_run, tiny_corpus, tmp_path):
    # The same first step with uniform targets: same data, same weights, another loss.
    uniform = STAGES.replace(", position_weights: [4, 3, 2, 1]", "")
    run_train(tiny_corpus, tmp_path / "uniform", uniform, "train.max_steps=1", "eval.interval=0")
    first = train_records(tmp_path / "uniform")[0]
    weighted = train_records(staged_run)[0]
    assert first["data_crc"] == weighted["data_crc"]
    assert first["loss"] != pytest.approx(weighted["loss"], rel=1e-4)
