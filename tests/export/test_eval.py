"""`megapatch eval`: the engine's own validation loss, recomputed from a checkpoint of any
layout, and bad input (no checkpoint, data of another tokenizer)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megapatch.checkpoint.full_weights import build_model, read_checkpoint
from megapatch.data import eval_windows, open_corpus
from tests.export.conftest import EVAL_WINDOWS, REPO, one_error_line


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp2_run", "zero3_run"])
@pytest.mark.usefixtures("tp2_run", "zero3_run")  # named, so xdist runs this beside the others
def test_eval_reproduces_the_engines_final_validation_loss(run, request, tmp_path, capsys, cli):
    """The engine evaluated the TP-sharded (or ZeRO-3 partitioned) model on the same
    windows with windowed_loss at the end of training; eval reads the merged checkpoint."""
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "eval.json"
    args = ("--max-windows", EVAL_WINDOWS, "--out", out)
    assert cli("eval", run_dir, *args) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    engine = json.loads((run_dir / "summary.json").read_text())
    assert result["loss"] == pytest.approx(engine["val_loss"], abs=1e-5)
    assert result["ppl"] == pytest.approx(engine["val_ppl"], rel=1e-5)
    assert (result["windows"], result["tokens"]) == (EVAL_WINDOWS, EVAL_WINDOWS * 16)


@pytest.mark.slow
def test_eval_equals_cross_entropy_of_the_full_logits(tp2_run, tiny_corpus, cli):
    """Every window of the valid split (the default), against plain F.cross_entropy."""
    assert cli("eval", tp2_run) == 0
    ckpt = read_checkpoint(tp2_run)
    result = json.loads((tp2_run / "eval" / f"{ckpt.path.name}.valid.json").read_text())
    windows = torch.from_numpy(eval_windows(open_corpus(tiny_corpus, "valid"), 16))  # [n, L+1]
    with torch.no_grad():
        logits = build_model(ckpt)(windows[:, :-1])  # [n, L, V]
    expected = F.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten())
    assert result["windows"] == len(windows) > EVAL_WINDOWS
    assert result["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert result["ppl"] == pytest.approx(float(np.exp(float(expected))), rel=1e-5)


@pytest.mark.slow
def test_a_model_with_more_vocabulary_rows_than_its_tokenizer_is_evaluated(
    tiny_corpus, tmp_path, cli
):
    """model.vocab_size above the tokenizer's (as the paper configs set 32,000) trains, so
    eval must take the same data: the tokenizer file decides, not the row count."""
    from tests.export.conftest import train

    run_dir = train(
        tiny_corpus, tmp_path / "wide", "model.vocab_size=512", "train.max_steps=1", nproc=1
    )
    assert read_checkpoint(run_dir).model_config.vocab_size == 512
    out = tmp_path / "eval.json"
    assert cli("eval", run_dir, "--max-windows", 4, "--out", out) == 0
    assert np.isfinite(json.loads(out.read_text())["loss"])


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "export", "generate"])
def test_a_directory_without_a_checkpoint_is_one_clear_line(command, tmp_path, capsys, cli):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    extra = {"eval": [], "export": ["--out", tmp_path / "hf"], "generate": ["--prompt", "the"]}
    assert cli(command, run_dir, *extra[command]) == 2
    one_error_line(capsys.readouterr().err, command, "no complete checkpoint")


def test_an_interrupted_checkpoint_is_refused(tmp_path, capsys, cli):
    # A copy of the model states without the COMPLETE marker, as a killed save leaves it.
    step = tmp_path / "step_00000009"
    step.mkdir()
    (step / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert cli("eval", step) == 2
    one_error_line(capsys.readouterr().err, "eval", "without a COMPLETE marker")
    assert cli("eval", tmp_path / "nowhere") == 2
    one_error_line(capsys.readouterr().err, "eval", "no such directory")


@pytest.mark.slow
def test_eval_on_data_of_another_tokenizer_fails(tp2_run, other_corpus, capsys, cli):
    assert cli("eval", tp2_run, "--data", other_corpus) == 2
    one_error_line(capsys.readouterr().err, "eval", "vocabulary of 450", "has 400")


@pytest.mark.slow
def test_the_cli_exits_with_code_2(tmp_path):
    """The real process: one line on stderr, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "megapatch", "eval", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "megapatch eval" in line]
    assert lines == [f"megapatch eval: error: {tmp_path}: no complete checkpoint in {tmp_path}; "
                     "expected a run directory, its checkpoints directory, or a step_XXXXXXXX "
                     "checkpoint"]  # fmt: skip
