"""Disk trouble in the checkpoint directory: a real tmpfs that fills up or is read-only
where this process may mount one (root), else the same errno injected into every
checkpoint write (MEGAPATCH_FAULT_SAVE_ERROR). A rank-asymmetric full disk in a
2-process run is one of the strikes in test_kill_anywhere."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megapatch.checkpoint.full_weights import read_checkpoint
from tests.hardening.conftest import (
    assert_no_megapatch_traceback,
    error_line,
    latest_tag,
    step_dir,
)
from tests.training.conftest import run_train, train_records

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int, *, read_only: bool = False):
    """Mount a tmpfs of `size_bytes` at `path`; yields False (and mounts nothing) where
    mounting is not allowed, so the caller injects the errno instead."""
    path.mkdir(parents=True)
    options = f"size={size_bytes},mode=0755" + (",ro" if read_only else "")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
    except FileNotFoundError:  # no mount(8)
        mounted = None
    if mounted is None or mounted.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _resize(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_full_disk_keeps_training_then_fails_clearly_and_keeps_the_last_checkpoint(
    tiny_corpus, reference_dp2, tmp_path
):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpt"
    # Room for one checkpoint of this model and a half: step 3 fits, every later one fills it.
    one_checkpoint = _bytes(step_dir(reference_dp2, 3))
    with tmpfs(ckpt_dir, one_checkpoint * 3 // 2 + 128 * 1024) as mounted:
        env = {} if mounted else {"MEGAPATCH_FAULT_SAVE_ERROR": "ENOSPC@6,8,9,12"}
        proc = run_train(tiny_corpus, run_dir, f"checkpoint.dir={ckpt_dir}", env=env, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = error_line(proc)
        assert f"could not write checkpoint {ckpt_dir}/step_00000012 (" in line, line
        assert "No space left on device" in line and "(latest: step_00000003)" in line
        assert "this was the end checkpoint, so training since step_00000003 is lost" in line
        assert f"free space in (or fix) {ckpt_dir}, then rerun with train.resume=auto" in line
        assert_no_megapatch_traceback(proc.stderr)
        # each failed save was said out loud, and training went on to the end in memory
        failed = [
            line for line in proc.stderr.splitlines() if "ERROR could not write checkpoint" in line
        ]
        assert [f"step_{s:08d}" in f for s, f in zip((6, 8, 9), failed)] == [True] * 3, failed
        first_attempt = train_records(run_dir)
        assert [r["step"] for r in first_attempt] == list(range(1, 13))
        # nothing partial left behind; the earlier checkpoint is whole and still the latest
        assert {p.name: (p / "COMPLETE").is_file() for p in ckpt_dir.glob("step_*")} == {
            "step_00000003": True
        }
        assert (ckpt_dir / "latest").read_text().strip() == "step_00000003"
        assert read_checkpoint(ckpt_dir).step == 3

        # free space, as the message says, and rerun: it continues from step 3 exactly
        if mounted:
            _resize(ckpt_dir, one_checkpoint * 8)
        run_train(tiny_corpus, run_dir, f"checkpoint.dir={ckpt_dir}")
        resumed = train_records(run_dir)
        assert [r["step"] for r in resumed] == list(range(1, 13))
        np.testing.assert_allclose(
            [r["loss"] for r in resumed], [r["loss"] for r in first_attempt], rtol=0, atol=1e-6
        )
        assert (ckpt_dir / "latest").read_text().strip() == "step_00000012"


def test_a_read_only_checkpoint_dir_fails_before_training(tiny_corpus, tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpt"
    with tmpfs(ckpt_dir, 1 << 20, read_only=True) as mounted:
        env = {} if mounted else {"MEGAPATCH_FAULT_SAVE_ERROR": "EROFS"}
        proc = run_train(tiny_corpus, run_dir, f"checkpoint.dir={ckpt_dir}", env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"checkpoint directory {ckpt_dir} is not writable (Read-only file system" in line, line
    assert "set checkpoint.dir to a writable directory (nothing was trained)" in line
    assert_no_megapatch_traceback(proc.stderr)
    assert not (run_dir / "metrics.jsonl").exists()
    assert latest_tag(run_dir) is None
