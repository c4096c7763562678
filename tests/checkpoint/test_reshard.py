"""Elastic resume end to end: a checkpoint of one parallel layout continued in another.

One uninterrupted single-process run (30 steps: 20 patch, the switch, 10 token) is the
reference; two cases resume its checkpoint of step 18 (before the switch) as DP2 ZeRO-2
and as TP2 x DP2, and the others resume those runs' checkpoints at the switch (20) and
after it (21) in further layouts. Each runs 9 or 10 steps and must match the reference: losses (1e-4 relative), the data checksums and LR of every step, and the full
optimizer state at the end (Adam step, both moments, master weights, per parameter).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megapatch.checkpoint.reshard import convert, universal_dir
from tests.training.conftest import run_train, train_records

# The cases resume each other's runs, in file order: one xdist worker runs them all.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.xdist_group("reshard")]

LONGER = ["train.total_tokens=7680", "eval.interval=0"]  # 20 patch + 10 token steps
SWITCH = 20

TP2 = "parallel.tensor_model_parallel_size=2"
PP2 = "parallel.pipeline_model_parallel_size=2"
Z = "parallel.zero_stage={}".format


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reshard-ref") / "run"
    run_train(tiny_corpus, run_dir, *LONGER)
    return run_dir


@pytest.fixture(scope="module")
def sources(reference) -> dict[str, Path]:
    return {"ref": reference}


def _universal_state(step_dir: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{param: {fp32, exp_avg, exp_avg_sq, step}} of any checkpoint, through the converter
    (from ZeRO-3 it writes bare flat tensors and keeps the step in the common state)."""
    from megapatch.checkpoint.client_state import read_client_state

    config = read_client_state(step_dir).model_config
    convert(step_dir, out, step=int(step_dir.name.split("_")[1]), model_config=config)
    common = torch.load(out / "zero" / "optimizer_state.pt", weights_only=False)
    state = {}
    # by the GPT's names (each folder also answers to its pipeline name)
    for param_dir in sorted(
        p for p in (out / "zero").iterdir() if p.is_dir() and not p.name[0].isdigit()
    ):
        entry = {}
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            saved = torch.load(param_dir / f"{key}.pt", weights_only=False)
            entry[key] = (saved["param"] if isinstance(saved, dict) else saved).detach()
        if (param_dir / "step.pt").is_file():
            entry["step"] = float(torch.load(param_dir / "step.pt", weights_only=False))
        else:
            entry["step"] = float(common["optimizer_state_dict"]["state"][0]["step"])
        state[param_dir.name] = entry
    return state


def _stale(step_dir: Path) -> list[Path]:
    return sorted(step_dir.parent.glob(f".{step_dir.name}.universal.tmp-*"))


def test_a_reshard_that_fails_midway_keeps_the_original(sources, tmp_path, capsys, monkeypatch):
    import os
    import subprocess
    import sys

    from megapatch.checkpoint.full_weights import read_checkpoint
    from tests.fixtures import REPO, run_cli, spawned_training_env

    original = _step_dir(sources["ref"], 18)
    before = _digest(original)
    # Killed once it wrote its data, before it is complete: a partial folder under a
    # temporary name, which nothing loads (the next resume removes it).
    killed = subprocess.run(
        [sys.executable, "-m", "megapatch", "checkpoint", "reshard", str(original)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=spawned_training_env(MEGAPATCH_FAULT_KILL_IN_RESHARD="18"),
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _stale(original) and not universal_dir(original).exists()
    # A full disk before it completes: one line, exit 2, nothing kept.
    out = tmp_path / "full.universal"
    monkeypatch.setenv("MEGAPATCH_FAULT_SAVE_ERROR", "ENOSPC@18")
    assert run_cli("checkpoint", "reshard", original, "--out", out, "--dp", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("megapatch checkpoint: error: could not reshard"), err
    assert (
        "No space left on device" in err
        and "the original checkpoint is intact and resumable" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".full.universal.tmp-*"))
    monkeypatch.delenv("MEGAPATCH_FAULT_SAVE_ERROR")
    assert _digest(original) == before
    read_checkpoint(original)  # still whole
    assert os.listdir(original)


# name: (source, its checkpoint, target overrides, nproc, last step). A source that is a
# case is that case's resumed run: "dp2-z2" and "tp2-dp2" (both from the reference at step
# 18, before the switch) are the sources of the cases after them, at the switch (20) and
# after it (21); "dp2z2-dp1z3@20" (ZeRO-3) is the source of "z3-dp2z1@21", "dp2-z0"
# (ZeRO-0: megapatch's own conversion, checkpoint/zero0.py) of "z0dp2-tp2z1@21"; "pp2" (PP=2,
# from the reference at 18) is the source of "pp2-pp1@21".
CASES = {
    "dp2-z2": ("ref", 18, [Z(2)], 2, 27),  # DP1 ZeRO-1 -> DP2 ZeRO-2
    "dp2z2-dp1z3@20": ("dp2-z2", 20, [Z(3)], 1, 30),  # DP2 ZeRO-2 -> DP1 ZeRO-3
    "dp2z2-dp1z2@21": ("dp2-z2", 21, [Z(2)], 1, 30),  # DP2 -> DP1 under ZeRO-2
    "tp2-dp2": ("ref", 18, [TP2], 4, 27),  # TP1 -> TP2 and DP1 -> DP2 under ZeRO-1
    "tp2dp2-tp1dp1@20": ("tp2-dp2", 20, [], 1, 30),  # TP2 -> TP1 and DP2 -> DP1 under ZeRO-1
    "tp2dp2-tp1dp4@21": ("tp2-dp2", 21, [], 4, 30),  # TP2 x DP2 -> TP1 x DP4
    "tp2dp2-tp2z3@21": ("tp2-dp2", 21, [TP2, Z(3)], 2, 30),  # ZeRO-1 DP2 -> ZeRO-3 DP1 at TP2
    "z3-dp2z1@21": ("dp2z2-dp1z3@20", 21, [Z(1)], 2, 30),  # DP1 ZeRO-3 -> DP2 ZeRO-1
    "dp2-z0": ("ref", 18, [Z(0)], 2, 27),  # DP1 ZeRO-1 -> DP2 ZeRO-0 (megapatch loads it)
    "z0dp2-tp2z1@21": ("dp2-z0", 21, [TP2, Z(1)], 2, 30),  # DP2 ZeRO-0 -> TP2 ZeRO-1
    "pp2": ("ref", 18, [PP2], 2, 27),  # PP1 -> PP2 under ZeRO-1
    "pp2-pp1@21": ("pp2", 21, [], 1, 30),  # PP2 -> PP1 under ZeRO-1, after the switch
}
_RESUMED: dict[str, dict] = {}


def _resume(case, sources, tiny_corpus, tmp_path_factory) -> dict:
    """Run `case` once per process (its source case first, if it has one), whatever order
    the tests run in; returns what its test checks."""
    if case in _RESUMED:
        return _RESUMED[case]
    source, step, target, nproc, end = CASES[case]
    if source in CASES:
        source_dir = _resume(source, sources, tiny_corpus, tmp_path_factory)["run_dir"]
    else:
        source_dir = sources[source]
    original = _step_dir(source_dir, step)
    before = _digest(original)
    stale = _stale(original)  # a killed reshard's (test_a_reshard_that_fails_midway...)
    run_dir = tmp_path_factory.mktemp(case) / "run"
    proc = run_train(
        tiny_corpus,
        run_dir,
        *LONGER,
        *target,
        f"train.resume={original}",
        f"train.max_steps={end}",
        nproc=nproc,
    )
    _RESUMED[case] = dict(run_dir=run_dir, proc=proc, original=original, before=before, stale=stale)
    return _RESUMED[case]


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout_continues_exactly(
    sources, reference, tiny_corpus, tmp_path_factory, case
):
    source, step, target, nproc, end = CASES[case]
    run = _resume(case, sources, tiny_corpus, tmp_path_factory)
    run_dir, proc, original, stale = run["run_dir"], run["proc"], run["original"], run["stale"]
    tmp_path = run_dir.parent
    assert _digest(original) == run["before"], "the original checkpoint was modified"
    assert (universal_dir(original) / "COMPLETE").is_file()
    assert "resharded" in proc.stderr or "reusing" in proc.stderr, proc.stderr[-3000:]
    assert not any(p.exists() for p in stale) and not _stale(original)

    resumed = train_records(run_dir)
    expected = [r for r in train_records(reference) if step < r["step"] <= end]
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert len(resumed) >= 8 and resumed[0]["phase"] == ("patch" if step < SWITCH else "token")
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in expected], rtol=1e-4
    )
    # the same windows step by step (the checksum of the global batch, at any DP size)
    assert [r["data_crc"] for r in resumed] == [r["data_crc"] for r in expected]
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in expected], rel=1e-12)

    # The whole optimizer state carried over: at the end, equal to the reference's.
    got = _universal_state(_step_dir(run_dir, end), tmp_path / "got.universal")
    want = _universal_state(_step_dir(reference, end), tmp_path / "want.universal")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name]["step"] == want[name]["step"], name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            a, b = got[name][key], want[name][key]
            assert a.numel() == b.numel(), (name, key)
            assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-3), (name, key)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] in ("completed", "max_steps")


def test_reshard_command_refuses_first_and_writes_a_checkpoint_every_reader_takes(
    sources, tiny_corpus, tmp_path_factory, tmp_path, capsys
):
    from megapatch.checkpoint.full_weights import read_checkpoint
    from tests.fixtures import run_cli

    source = _resume("tp2-dp2", sources, tiny_corpus, tmp_path_factory)["run_dir"]
    original = _step_dir(source, 24)
    out = tmp_path / "resharded"
    # TP=4 does not divide the 2 heads: refused before any work.
    assert run_cli("checkpoint", "reshard", original, "--out", out, "--tp", "4") == 2
    err = capsys.readouterr().err.strip()
    assert "parallel.tensor_model_parallel_size=4, expected a divisor of model.n_heads=2" in err
    assert "\n" not in err and not out.exists()

    assert run_cli("checkpoint", "reshard", original, "--out", out, "--tp", "1", "--dp", "4") == 0
    said = capsys.readouterr().out
    assert "(TP=2 x DP=2, ZeRO-1) for TP=1 x DP=4, ZeRO-1" in said and f"train.resume={out}" in said
    # eval / export / generate read it as the same model
    a, b = read_checkpoint(original), read_checkpoint(out)
    assert a.step == b.step == 24 and a.state_dict.keys() == b.state_dict.keys()
    for name, weight in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[name], weight, rtol=0, atol=0)
    assert run_cli("checkpoint", "reshard", original, "--out", out) == 0  # reused
    assert "nothing to do" in capsys.readouterr().out
