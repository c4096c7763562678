"""Safety of a run: non-finite losses, preemption signals, pruning, and clear config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.training.conftest import (
    REPO,
    TINY_OVERRIDES,
    metrics,
    run_train,
    train_cmd,
    train_env,
    train_records,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_loss_skips_the_step_and_is_counted(tiny_corpus, tmp_path, zero_stage):
    """Step 3 (0-based 2) gets a NaN loss: its update is skipped, so the weights after it
    equal the weights after step 2 of a clean run (ZeRO skips natively; plain fp32 by us)."""
    import torch

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    common = ["eval.interval=0", f"parallel.zero_stage={zero_stage}"]
    run_train(tiny_corpus, clean, *common, "train.max_steps=2")
    run_train(
        tiny_corpus, faulty, *common, "train.max_steps=3", env={"MEGAPATCH_FAULT_NAN_STEPS": "2"}
    )
    a, b = train_records(clean), train_records(faulty)
    assert b[2]["loss"] == "nan" and b[2]["nonfinite_total"] == 1
    np.testing.assert_array_equal([r["loss"] for r in a], [r["loss"] for r in b[:2]])

    def weights(run_dir, step):
        path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]

    after_clean, after_skip = weights(clean, 2), weights(faulty, 3)
    for name, tensor in after_clean.items():
        assert torch.equal(tensor, after_skip[name]), f"{name} changed in a skipped step"
    summary = json.loads((faulty / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_streak_of_nonfinite_losses_stops_with_a_clear_message(tiny_corpus, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    proc = run_train(
        tiny_corpus,
        run_dir,
        "train.max_nonfinite_steps=3",
        f"parallel.zero_stage={zero_stage}",
        env={"MEGAPATCH_FAULT_NAN_STEPS": "4,5,6"},
        check=False,
    )
    assert proc.returncode == 2
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "3 non-finite losses in a row at step 7" in last_line
    assert "step_00000003" in last_line  # the last good checkpoint, named
    assert "Traceback" not in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000003"
    assert (run_dir / "checkpoints" / latest / "COMPLETE").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_exits_cleanly(tiny_corpus, tmp_path, sig):
    run_dir = tmp_path / "run"
    args = train_cmd(1) + [
        str(REPO / "configs" / "tiny.yaml"),
        *TINY_OVERRIDES,
        f"data.path={tiny_corpus}",
        f"run.dir={run_dir}",
        "train.total_tokens=25600",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    t_signal = time.time()
    proc.send_signal(sig)  # a second signal during the save must not corrupt it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - t_signal < 60
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted"
    step = summary["global_step"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (
        latest == f"step_{step:08d}" and (run_dir / "checkpoints" / latest / "COMPLETE").is_file()
    )
    assert step < 100  # it stopped early, not at the end
    # the requeued job picks up where it stopped
    run_train(tiny_corpus, run_dir, "train.total_tokens=25600", "train.max_steps=" + str(step + 2))
    assert [r["step"] for r in train_records(run_dir)][-3:] == [step, step + 1, step + 2]


def test_keep_last_prunes_old_checkpoints(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_train(
        tiny_corpus, run_dir, "checkpoint.keep_last=2", "checkpoint.interval=2", "eval.interval=0"
    )
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000010", "step_00000012"]


def test_a_finished_run_resumed_again_changes_nothing(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_corpus, run_dir, "eval.interval=0", "eval.at_end=false")
    before = (run_dir / "metrics.jsonl").read_text()
    run_train(tiny_corpus, run_dir, "eval.interval=0", "eval.at_end=false")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert len(metrics(run_dir)) == 12


BAD_CONFIGS = [
    (["patch.sise=4"], "patch.sise", "patch.size"),
    (["patch.fraction=1.0"], "patch.fraction", "[0, 1)"),
    (["patch.size=3"], "train.tokens_per_step", "multiple"),
    (["model.n_heads=3"], "model.n_heads", "d_model"),
    (
        ["parallel.tensor_model_parallel_size=4"],
        "tensor_model_parallel_size=4",
        "divisor of model.n_heads",
    ),
    (["model.vocab_size=100"], "model.vocab_size=100", "400"),
    (["train.micro_batch_size=0"], "train.micro_batch_size", "positive"),
]


@pytest.mark.parametrize("overrides,names,expects", BAD_CONFIGS, ids=[b[0][0] for b in BAD_CONFIGS])
def test_bad_config_is_one_clear_line(tiny_corpus, tmp_path, overrides, names, expects):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_corpus, run_dir, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megapatch train: error:"), last
    assert names in last and expects in last, last
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_resume_into_a_run_dir_of_another_config_is_refused(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_corpus, run_dir, "train.max_steps=1", "eval.interval=0")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train(tiny_corpus, run_dir, "model.d_model=64", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "belongs to a different run" in last and "model.d_model" in last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
