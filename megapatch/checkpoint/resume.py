"""Which checkpoint a run continues from, and whether it can.

A run directory belongs to one config identity; `train.resume` picks the checkpoint
("auto": the latest complete one, or a path); and before DeepSpeed reads it, its client
state is compared with this run, so a mismatch is one line that says what differs and how
to get on (DeepSpeed's own error would be a tensor shape deep in the optimizer state).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from megapatch.checkpoint import CheckpointInfo, CheckpointManager
from megapatch.config import RunConfig, load_config
from megapatch.errors import CheckpointError, ConfigError, DataError
from megapatch.logging_utils import get_logger

log = get_logger("resume")


def check_run_dir(cfg: RunConfig, run_dir: Path, ckpt: CheckpointManager) -> None:
    """Refuse to mix runs: a run dir belongs to one config identity."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = load_config(saved)
        except ConfigError as exc:
            raise ConfigError(
                f"{saved} is not a readable megapatch config ({exc}); choose another run.dir"
            ) from exc
        if previous.config_hash() != cfg.config_hash():
            diff = "; ".join(cfg.identity_diff(previous)[:3])
            raise ConfigError(
                f"run.dir {run_dir} belongs to a different run (config hash {previous.config_hash()} "
                f"vs {cfg.config_hash()}: {diff}); choose another run.dir"
            )
    if cfg.train.resume == "none" and ckpt.complete_checkpoints():
        raise ConfigError(
            f"run.dir {run_dir} already has checkpoints in {ckpt.dir}: pass train.resume=auto to "
            "continue that run, or choose another run.dir (nothing was overwritten)"
        )


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
    from megapatch.checkpoint_io import find_checkpoint

    try:
        path = find_checkpoint(resume)
    except CheckpointError as exc:
        raise CheckpointError(f"train.resume={resume}: {exc}") from None
    step = int(path.name.split("_")[-1]) if path.name.startswith("step_") else -1
    return CheckpointInfo(path.name, step, path)


MODEL_STATE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Model settings that only change how the same weights are computed, not what they are.
_RUNTIME_MODEL_SETTINGS = {"activation_checkpointing", "ops_backend"}


def read_client_state(path: Path) -> dict[str, Any]:
    """The megapatch client state of checkpoint `path`, read without loading its tensors."""
    file = next((path / name for name in MODEL_STATE_FILES if (path / name).is_file()), None)
    if file is None:
        raise CheckpointError(
            f"{path}: no DeepSpeed model states ({MODEL_STATE_FILES[0]}); not a megapatch checkpoint"
        )
    try:
        try:  # mmap: the weights stay on disk, only the pickled metadata is read
            states = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            states = torch.load(file, map_location="cpu", weights_only=False)  # legacy format
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{file}: unreadable ({first})") from exc
    meta = states.get("megapatch") if isinstance(states, dict) else None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{file}: no megapatch client state; not written by megapatch")
    return meta


def check_resumable(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse, with the reason and the way out, a checkpoint this run cannot continue.

    `saved` is the checkpoint's client state, `current` the same keys for this run:
    model_config, tokenizer_sha256, config_hash, tensor_model_parallel_size,
    data_parallel_size, zero_stage.
    """
    convert = (
        f"to start from its weights instead, convert it: `megapatch export {path} --out HF_DIR`, "
        "then train a new run.dir with init.from_hf=HF_DIR (optimizer state and data position restart)"
    )
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
    tp = int(saved.get("tensor_model_parallel_size", 1))
    my_tp = current["tensor_model_parallel_size"]
    if tp != my_tp:
        raise CheckpointError(
            f"checkpoint {path} was written with tensor_model_parallel_size={tp}, this run has "
            f"{my_tp}; DeepSpeed checkpoints do not reshard across TP sizes: relaunch with "
            f"parallel.tensor_model_parallel_size={tp}, or {convert}"
        )
    stage, my_stage = int(saved.get("zero_stage", 0)), current["zero_stage"]
    if stage != my_stage and not {stage, my_stage} <= {1, 2}:  # ZeRO-1 and 2 share a format
        raise CheckpointError(
            f"checkpoint {path} was written with ZeRO stage {stage}, this run uses {my_stage}: "
            f"set parallel.zero_stage={stage} to resume it, or {convert}"
        )
    dp, my_dp = int(saved.get("data_parallel_size", 1)), current["data_parallel_size"]
    if dp != my_dp and my_stage > 0:
        raise CheckpointError(
            f"checkpoint {path} was written by {dp} data-parallel ranks with ZeRO-{stage}, this run "
            f"has {my_dp}; ZeRO's optimizer shards do not re-partition: relaunch with {dp * my_tp} "
            f"ranks, or {convert}"
        )
