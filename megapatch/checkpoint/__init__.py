"""Checkpoints: saving and finding them, what they hold, resuming, reading them as one
model, and the Hugging Face format.

    manager.py       tags, COMPLETE/latest, guarded save/load, pruning, per-rank RNG
    policy.py        when to save, and what a failed save means
    client_state.py  the "megapatch" client state: written in one place, read once
    safe_load.py     torch.load of checkpoint files with only allowlisted types
    resume.py        which checkpoint a run continues, and whether it can
    full_weights.py  one full model from a checkpoint of any TP size / ZeRO stage
    reshard.py       a checkpoint continued in another DP/TP/ZeRO layout (universal form)
    hf.py            Hugging Face Llama export and import
"""

from megapatch.checkpoint.manager import (
    CheckpointInfo,
    CheckpointManager,
    CheckpointWriteError,
)

__all__ = ["CheckpointInfo", "CheckpointManager", "CheckpointWriteError"]
