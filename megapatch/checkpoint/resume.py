"""Which checkpoint a run continues from, and whether it can.

`train.resume` picks the checkpoint ("auto": the latest complete one, or a path); before
DeepSpeed reads it, its client state (read once, `client_state.read_client_state`) is
compared with this run, so a mismatch is one line that says what differs and how to get
on (DeepSpeed's own error would be a tensor shape deep in the optimizer state), and every
file DeepSpeed will unpickle is checked to hold only allowlisted types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapatch.checkpoint.client_state import ClientState, read_client_state
from megapatch.checkpoint.manager import CheckpointInfo, CheckpointManager, _from_rank0, _is_rank0
from megapatch.checkpoint.reshard import (
    Layout,
    check_can_reshard,
    is_universal,
    needs_reshard,
    reshard_for_resume,
)
from megapatch.checkpoint.safe_load import check_files
from megapatch.config import RunConfig
from megapatch.errors import CheckpointError, DataError
from megapatch.logging_utils import get_logger

log = get_logger("resume")


def checkpoint_to_resume(cfg: RunConfig, ckpt: CheckpointManager) -> CheckpointInfo | None:
    """The checkpoint `train.resume` names: none, the latest complete one, or a path (a run
    directory, its checkpoints directory or a step directory)."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        ckpt.remove_incomplete()
        info = ckpt.latest()
        if info is None:
            log.info("train.resume=auto: no checkpoint in %s, starting fresh", ckpt.dir)
        return info
    from megapatch.checkpoint.full_weights import find_checkpoint

    try:
        path = find_checkpoint(resume)
    except CheckpointError as exc:
        raise CheckpointError(f"train.resume={resume}: {exc}") from None
    step = int(path.name.split("_")[-1]) if path.name.startswith("step_") else -1
    return CheckpointInfo(path.name, step, path)


# Model settings that only change how the same weights are computed, not what they are.
_RUNTIME_MODEL_SETTINGS = {"activation_checkpointing", "ops_backend", "sequence_parallel"}


@dataclass
class Resume:
    """The checkpoint a run continues from, and its client state (read once)."""

    checkpoint: CheckpointInfo
    client_state: ClientState
    universal: bool = False
    """`checkpoint` is a universal checkpoint (another layout's, resharded): the engine
    must be built with DeepSpeed's `checkpoint.load_universal`."""


def resume_point(
    cfg: RunConfig, ckpt: CheckpointManager, identity: dict[str, Any]
) -> Resume | None:
    """The checkpoint this run continues from (None: start fresh), checked against this
    run's `identity` (client_state.IDENTITY_KEYS) and for safe files, before any of it is
    loaded into an engine; a checkpoint of another parallel layout is resharded (once,
    beside it: `reshard.py`)."""
    info = checkpoint_to_resume(cfg, ckpt)
    if info is None:
        return None
    saved = read_client_state(info.path)
    reshard = check_resumable(info.path, saved.identity, identity)
    if reshard or is_universal(info.path):
        path = info.path
        if not is_universal(path):
            path = reshard_for_resume(info.path, saved, Layout.of(identity))
        _check_files_once(sorted(path.glob("*.pt")) + sorted(path.glob("zero/**/*.pt")))
        return Resume(CheckpointInfo(path.name, saved.step, path), saved, universal=True)
    # DeepSpeed unpickles these without restrictions; refuse any with foreign types first.
    _check_files_once(
        sorted(info.path.glob("*.pt")) + sorted((info.path / "megapatch").glob("*.pt"))
    )
    return Resume(info, saved)


def _check_files_once(files: list[Path]) -> None:
    """`check_files` on rank 0 alone, its verdict on every rank: the checkpoint directory is
    shared, and every rank reading every rank's files would be world x files reads."""
    error = None
    if _is_rank0():
        try:
            check_files(files)
        except CheckpointError as exc:
            error = str(exc)
    error = _from_rank0(error)
    if error:
        raise CheckpointError(error)


def check_resumable(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Refuse, with the reason and the way out, a checkpoint this run cannot continue;
    True if it can once resharded into this run's layout (another TP or DP size, ZeRO stage).

    `saved` is the checkpoint's identity (client_state.IDENTITY_KEYS), `current` this
    run's: model_config, tokenizer_sha256, config_hash, tensor_model_parallel_size,
    data_parallel_size, zero_stage.
    """
    theirs, mine = saved["model_config"], current["model_config"]
    diff = [
        f"model.{k}={theirs.get(k)!r} there, {mine.get(k)!r} here"
        for k in mine
        if k not in _RUNTIME_MODEL_SETTINGS and k in theirs and theirs[k] != mine[k]
    ]
    if diff:
        hint = ""
        if theirs.get("vocab_size") != mine.get("vocab_size"):
            hint = " (the vocabulary differs: was the data re-prepped with another tokenizer?)"
        raise CheckpointError(
            f"checkpoint {path} holds a different model: {'; '.join(diff[:4])}{hint}; resume it "
            "with the config it was trained with, or choose another run.dir"
        )
    if saved.get("tokenizer_sha256") and saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        raise DataError(
            f"checkpoint {path} was trained on data of tokenizer sha256 {saved['tokenizer_sha256'][:12]}…, "
            f"the configured data has {current['tokenizer_sha256'][:12]}…: the data was re-prepped with "
            "another tokenizer; point data.path at the original data or choose another run.dir"
        )
    if saved["config_hash"] != current["config_hash"]:
        raise CheckpointError(
            f"{path} belongs to a run with config hash {saved['config_hash']}, "
            f"this config's is {current['config_hash']}; choose another run.dir or checkpoint"
        )
    theirs_layout, mine_layout = Layout.of(saved), Layout.of(current)
    if not needs_reshard(theirs_layout, mine_layout):
        return False
    check_can_reshard(path, theirs_layout, mine_layout, theirs)
    return True
