"""The training engine end to end, in real processes: phases, switch, resume, parallelism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megapatch.config import load_config
from megapatch.training.schedule import StagePlan
from tests.training.conftest import REPO, TINY_OVERRIDES, metrics, run_train, train_records

pytestmark = pytest.mark.slow

PATCH_STEPS, TOKEN_STEPS = 8, 4


def _losses(run_dir):
    return np.array([r["loss"] for r in train_records(run_dir)])


def test_runs_both_phases_with_equal_tokens_per_step(reference_run):
    records = train_records(reference_run)
    assert [r["step"] for r in records] == list(range(1, PATCH_STEPS + TOKEN_STEPS + 1))
    assert [r["phase"] for r in records] == ["patch"] * PATCH_STEPS + ["token"] * TOKEN_STEPS
    assert [r["patch_size"] for r in records] == [4] * PATCH_STEPS + [1] * TOKEN_STEPS
    tokens = [r["tokens"] for r in records]
    assert np.all(np.diff([0] + tokens) == 256), (
        "tokens per optimizer step must not change at the switch"
    )
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] is not None for r in records)
    # the token phase starts where the patch phase left off: its loss is far below log(V)
    assert records[-1]["loss"] < np.log(400)

    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["tokens"] == {"patch": PATCH_STEPS * 256, "token": TOKEN_STEPS * 256}
    assert summary["val_loss"] > 0 and summary["val_ppl"] > 1
    final = metrics(reference_run)[-1]
    assert final.get("final") and final["val_loss"] == pytest.approx(summary["val_loss"])


def test_zero0_fp32_logs_the_true_grad_norm(tiny_corpus, tmp_path, reference_run):
    # DeepSpeed clips without keeping the norm in plain fp32 without ZeRO; megapatch
    # computes it, and it is the norm ZeRO-1 reports for the same steps.
    run_train(tiny_corpus, tmp_path / "zero0", "parallel.zero_stage=0", "train.max_steps=10")
    zero0 = [r["grad_norm"] for r in train_records(tmp_path / "zero0")]
    zero1 = [r["grad_norm"] for r in train_records(reference_run)][:10]
    assert all(isinstance(n, float) and n > 0 for n in zero0), zero0
    np.testing.assert_allclose(zero0, zero1, rtol=1e-4)


def test_lr_follows_the_plan_and_rewarms_at_the_switch(reference_run):
    cfg = load_config(REPO / "configs" / "tiny.yaml", TINY_OVERRIDES)
    plan = StagePlan.from_config(cfg, dp_size=1)
    records = train_records(reference_run)
    for r in records:
        assert r["lr"] == pytest.approx(plan.lr(r["step"] - 1), rel=1e-12)
    lrs = [r["lr"] for r in records]
    # warmup (2 steps) to the peak in each phase: the first token step is back at the bottom
    assert lrs[0] == pytest.approx(3e-3 / 2)
    assert lrs[1] == pytest.approx(3e-3)
    assert lrs[PATCH_STEPS] == pytest.approx(3e-3 / 2)
    assert lrs[PATCH_STEPS - 1] == pytest.approx(3e-4)  # floor at the end of the patch phase


def test_checkpoints_at_interval_switch_and_end(reference_run):
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{s:08d}" for s in (3, 6, 8, 9, 12)]
    assert all((reference_run / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (reference_run / "tokenizer.model").is_file()
    assert (reference_run / "config.yaml").is_file()


@pytest.mark.parametrize("kill_after", [7, 9], ids=["before-switch", "after-switch"])
def test_killed_and_resumed_run_equals_uninterrupted(
    reference_run, tiny_corpus, tmp_path, kill_after
):
    run_dir = tmp_path / "run"
    killed = run_train(
        tiny_corpus, run_dir, env={"MEGAPATCH_FAULT_KILL_AFTER_STEP": str(kill_after)}, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    steps_before = [r["step"] for r in train_records(run_dir)]
    assert steps_before[-1] == kill_after
    run_train(tiny_corpus, run_dir)  # train.resume=auto is the default
    resumed, reference = train_records(run_dir), train_records(reference_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=0, atol=1e-6
    )
    assert [r["data_crc"] for r in resumed] == [r["data_crc"] for r in reference]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_optimizer_state_is_reset_at_the_switch_unless_disabled(tiny_corpus, tmp_path):
    reset_dir, keep_dir = tmp_path / "reset", tmp_path / "keep"
    common = [f"train.max_steps={PATCH_STEPS + 1}", "eval.interval=0"]
    run_train(tiny_corpus, reset_dir, *common)
    run_train(tiny_corpus, keep_dir, *common, "patch.reset_optimizer=false")
    import torch

    def adam_steps(run_dir):
        step_dir = run_dir / "checkpoints" / f"step_{PATCH_STEPS + 1:08d}"
        optim = torch.load(
            next(step_dir.glob("*optim_states.pt")), map_location="cpu", weights_only=False
        )
        state = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
        return {int(s["step"]) for s in state.values()}

    assert adam_steps(reset_dir) == {1}, "Adam restarts at the switch (bias correction from step 1)"
    assert adam_steps(keep_dir) == {PATCH_STEPS + 1}


def test_k1_run_equals_plain_token_run(tiny_corpus, tmp_path):
    k1, token = tmp_path / "k1", tmp_path / "token"
    run_train(tiny_corpus, k1, "patch.size=1", "eval.interval=0", "train.max_steps=4")
    run_train(tiny_corpus, token, "patch.fraction=0", "eval.interval=0", "train.max_steps=4")
    assert all(r["phase"] == "token" for r in train_records(k1))
    np.testing.assert_array_equal(_losses(k1), _losses(token))


@pytest.mark.distributed
def test_dp2_zero2_matches_one_process(reference_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "dp2"
    run_train(tiny_corpus, run_dir, "parallel.zero_stage=2", nproc=2)
    np.testing.assert_allclose(_losses(run_dir), _losses(reference_run), rtol=2e-5, atol=2e-5)


@pytest.mark.distributed
def test_tp2_matches_one_process(reference_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "tp2"
    run_train(tiny_corpus, run_dir, "parallel.tensor_model_parallel_size=2", nproc=2)
    np.testing.assert_allclose(_losses(run_dir), _losses(reference_run), rtol=2e-5, atol=2e-5)


@pytest.mark.distributed
def test_tp2_bf16_without_zero_clips_by_the_whole_models_gradient_norm(tiny_corpus, tmp_path):
    # DeepSpeed's unfused bf16 optimizer would leave TP rank 1's shards out of the norm
    # (engine._mark_tensor_parallel_gradients); clipping at 0.5 makes that change the losses.
    common = ("parallel.zero_stage=0", "train.precision=bf16", "train.grad_clip=0.5")
    common += ("train.max_steps=3", "eval.interval=0", "checkpoint.interval=0")
    run_train(tiny_corpus, tmp_path / "tp1", *common)
    run_train(
        tiny_corpus, tmp_path / "tp2", *common, "parallel.tensor_model_parallel_size=2", nproc=2
    )
    tp1, tp2 = train_records(tmp_path / "tp1"), train_records(tmp_path / "tp2")
    np.testing.assert_allclose(
        [r["grad_norm"] for r in tp2], [r["grad_norm"] for r in tp1], rtol=5e-3
    )
    np.testing.assert_allclose([r["loss"] for r in tp2], [r["loss"] for r in tp1], rtol=2e-4)


@pytest.mark.distributed
def test_tp2_with_sequence_parallelism_matches_one_process(reference_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "tp2sp"
    run_train(
        tiny_corpus,
        run_dir,
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        nproc=2,
    )  # both phases, the switch, and validation under SP
    np.testing.assert_allclose(_losses(run_dir), _losses(reference_run), rtol=2e-5, atol=2e-5)
    records = metrics(run_dir)
    expected = {r["step"]: r for r in metrics(reference_run) if "val_loss" in r}
    for r in (r for r in records if "val_loss" in r):
        assert r["val_loss"] == pytest.approx(expected[r["step"]]["val_loss"], rel=2e-5)


@pytest.mark.distributed
def test_tp2_zero3_matches_one_process_resumes_reads_back_and_reshards(
    reference_run, tiny_corpus, tmp_path
):
    # ZeRO-3 partitions each TP shard over DP (here DP=1: still ZeRO-3's code paths).
    import torch

    from megapatch.checkpoint.full_weights import read_checkpoint

    run_dir = tmp_path / "tp2zero3"
    layout = ("parallel.tensor_model_parallel_size=2", "parallel.zero_stage=3")
    run_train(tiny_corpus, run_dir, *layout, "train.max_steps=6", nproc=2)
    run_train(tiny_corpus, run_dir, *layout, nproc=2)  # resumed at step 6, across the switch
    np.testing.assert_allclose(_losses(run_dir), _losses(reference_run), rtol=2e-5, atol=2e-5)
    ours, theirs = read_checkpoint(run_dir), read_checkpoint(reference_run)
    assert ours.client_state.zero_stage == 3 and ours.client_state.tensor_model_parallel_size == 2
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    for name, weight in theirs.state_dict.items():
        torch.testing.assert_close(ours.state_dict[name], weight, rtol=0, atol=2e-5, msg=name)
    # its step-6 checkpoint resharded into one process under ZeRO-1 continues the same run
    resumed = tmp_path / "tp1zero1"
    step_6 = run_dir / "checkpoints" / "step_00000006"
    run_train(tiny_corpus, resumed, f"train.resume={step_6}", "parallel.zero_stage=1")
    records = train_records(resumed)
    assert [r["step"] for r in records] == list(range(7, 13))
    expected = train_records(reference_run)[6:]
    np.testing.assert_allclose(
        [r["loss"] for r in records], [r["loss"] for r in expected], rtol=1e-4
    )
    assert [r["data_crc"] for r in records] == [r["data_crc"] for r in expected]


@pytest.mark.distributed
def test_tp2_dp2_matches_one_process(reference_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "tp2dp2"
    run_train(
        tiny_corpus, run_dir, "parallel.tensor_model_parallel_size=2", "train.max_steps=10", nproc=4
    )
    np.testing.assert_allclose(_losses(run_dir), _losses(reference_run)[:10], rtol=2e-5, atol=2e-5)
