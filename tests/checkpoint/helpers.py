"""What the checkpoint tests share: a run identity and a hand-made checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from megapatch.checkpoint.client_state import ClientState, Progress

IDENTITY = {
    "config_hash": "0123456789abcdef",
    "model_config": {"vocab_size": 250, "d_model": 32},
    "tokenizer_sha256": "ab" * 32,
    "tensor_model_parallel_size": 1,
    "zero_stage": 1,
    "data_parallel_size": 1,
}


def write_step(checkpoints: Path, step: int, *, complete: bool = True, **model_states) -> Path:
    """checkpoints/step_XXXXXXXX with rank 0's model states holding a megapatch client
    state at `step` (plus `model_states`), and COMPLETE when `complete`."""
    path = checkpoints / f"step_{step:08d}"
    path.mkdir(parents=True)
    progress = Progress.start(["token"])
    progress.global_step = step
    states = {**ClientState(progress, {}, IDENTITY).to_engine(), **model_states}
    torch.save(states, path / "mp_rank_00_model_states.pt")
    if complete:
        (path / "COMPLETE").write_text(f"{step}\n")
    return path
