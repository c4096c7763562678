"""A checkpoint handed over by someone else cannot run code when megapatch reads it: its
files are unpickled with weights_only=True and an allowlist, everything else refused in
one line naming the type and the file, before any of it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megapatch.checkpoint.manager import CheckpointManager
from megapatch.checkpoint.resume import resume_point
from megapatch.checkpoint.safe_load import safe_load
from megapatch.config import load_config
from megapatch.errors import CheckpointError
from tests.checkpoint.helpers import IDENTITY, write_step
from tests.fixtures import REPO

TINY = REPO / "configs" / "tiny.yaml"


class RunsCode:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(root: Path, *, evil_in: str | None, marker: Path) -> Path:
    """A complete checkpoint directory; `evil_in` names the file that carries the payload."""
    payload = {"extra": RunsCode(marker)} if evil_in == "model_states" else {}
    step = write_step(root / "checkpoints", 4, module={"w": torch.zeros(2)}, **payload)
    rank_state = {"rng": {"torch": torch.get_rng_state()}}
    if evil_in == "rank_state":
        rank_state["extra"] = RunsCode(marker)
    (step / "megapatch").mkdir()
    torch.save(rank_state, step / "megapatch" / "rank_00000.pt")
    (root / "checkpoints" / "latest").write_text("step_00000004\n")
    return step


def test_a_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"x": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        safe_load(tmp_path / "evil.pt")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'evil.pt'}: refused: it holds the type posix.system")
    assert not marker.exists()


def test_what_megapatch_and_deepspeed_write_is_read(tmp_path):
    import random

    import numpy as np

    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"rng": rng}, tmp_path / "rank.pt")
    back = safe_load(tmp_path / "rank.pt")
    assert back["rng"]["python"] == rng["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], rng["numpy"][1])


@pytest.mark.parametrize("evil_in", ["model_states", "rank_state"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, evil_in):
    marker = tmp_path / "code-ran"
    step = _checkpoint(tmp_path / "run", evil_in=evil_in, marker=marker)
    cfg = load_config(TINY, ["train.resume=auto", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(CheckpointError) as info:
        resume_point(cfg, CheckpointManager(step.parent), IDENTITY)
    file = "mp_rank_00_model_states.pt" if evil_in == "model_states" else "megapatch/rank_00000.pt"
    assert str(info.value).startswith(f"{step / file}: refused: it holds the type posix.system")
    assert not marker.exists()


def test_a_clean_checkpoint_passes_the_resume_checks(tmp_path):
    step = _checkpoint(tmp_path / "run", evil_in=None, marker=tmp_path / "unused")
    cfg = load_config(TINY, [f"train.resume={step}"])
    resume = resume_point(cfg, CheckpointManager(step.parent), IDENTITY)
    assert resume.checkpoint.path == step and resume.client_state.identity == IDENTITY


@pytest.mark.parametrize("command", ["eval", "export", "generate"])
def test_the_commands_refuse_it_in_one_line(tmp_path, command):
    marker = tmp_path / "code-ran"
    step = _checkpoint(tmp_path / "run", evil_in="model_states", marker=marker)
    extra = {"export": ["--out", str(tmp_path / "hf")], "generate": ["--prompt", "hi"]}
    proc = subprocess.run(
        [sys.executable, "-m", "megapatch", command, str(step), *extra.get(command, [])],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "refused: it holds the type posix.system" in lines[0], proc.stderr
    assert str(step / "mp_rank_00_model_states.pt") in lines[0]
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (tmp_path / "hf").exists()
