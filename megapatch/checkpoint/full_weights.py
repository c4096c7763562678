"""Read a megapatch checkpoint, saved with any TP size and ZeRO stage (or resharded into
DeepSpeed's universal form), as one full model.

    ckpt = read_checkpoint("runs/tiny")        # a run dir, its checkpoints/ dir, or a step dir
    ckpt.model_config, ckpt.state_dict          # GPTConfig; full fp32 weights, TP=1 names
    model = build_model(ckpt)                   # a TP=1 GPT in eval mode (eval, generate)
    load_full_state_dict(model, state, source=...)   # full weights into any TP shard

The full state dict is the canonical form every consumer shares: Hugging Face Llama's
parameter names without the `model.` prefix, each weight whole (TP shards concatenated
along their `partition_dim`), the vocabulary rows cut to the real vocabulary (TP padding
dropped), fp32.

Which weights: the ones the model computed with. For ZeRO 0/1/2 that is DeepSpeed's
"module" state dict of each TP rank (bf16 for a bf16 run, exactly representable in fp32).
ZeRO-3 partitions those, so the fp32 master partitions are gathered with DeepSpeed's
zero_to_fp32 and, for a bf16/fp16 run, rounded to that dtype as the engine rounds them
after every step; every stage therefore reads the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapatch.checkpoint.client_state import ClientState, load_model_states
from megapatch.checkpoint.manager import COMPLETE, CheckpointManager
from megapatch.checkpoint.reshard import is_universal, read_universal_weights
from megapatch.checkpoint.safe_load import check_files, safe_load
from megapatch.checkpoint.tp_shards import tensor_parallel_shard
from megapatch.errors import CheckpointError, ConfigError
from megapatch.logging_utils import get_logger
from megapatch.model import GPT, VOCAB_WEIGHTS, GPTConfig
from megapatch.parallel import get_tensor_model_parallel_world_size

log = get_logger("checkpoint")


_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedCheckpoint:
    path: Path
    """The step directory read."""
    step: int
    model_config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    """Full TP=1 weights in fp32, vocabulary rows unpadded."""
    client_state: ClientState
    """What megapatch saved beside the weights: progress, config, identity."""
    run_dir: Path | None
    """The run directory the checkpoint belongs to, where it can be found."""

    @property
    def run_config(self) -> dict[str, Any]:
        """The run's resolved config as {section: {field: value}}."""
        return self.client_state.config

    def tokenizer_path(self) -> Path | None:
        """The run's tokenizer: the copy in the run directory, else the training data's."""
        for name in ("tokenizer.json", "tokenizer.model"):
            if self.run_dir is not None and (self.run_dir / name).is_file():
                return self.run_dir / name
        data = self.run_config.get("data", {})
        prep_dir = data.get("path") or (data.get("blend") or [{}])[0].get("path")
        if prep_dir:
            from megapatch.data import MANIFEST_NAME, read_manifest

            if (Path(prep_dir) / MANIFEST_NAME).is_file():
                candidate = Path(prep_dir) / read_manifest(prep_dir)["tokenizer"]["file"]
                if candidate.is_file():
                    return candidate
        return None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory `path` names: a complete step directory itself, or the latest
    complete checkpoint of a run directory or of a checkpoints directory."""
    path = Path(path)
    expected = "a run directory, its checkpoints directory, or a step_XXXXXXXX checkpoint"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected {expected})")
    if (path / COMPLETE).is_file():
        return path
    if any(path.glob("*model_states.pt")):
        raise CheckpointError(
            f"{path}: checkpoint without a {COMPLETE} marker (its save was interrupted); "
            "use an earlier checkpoint"
        )
    checkpoints_dir = _checkpoints_dir_of_run(path) or path
    manager = CheckpointManager(checkpoints_dir)
    latest = manager.latest()
    if latest is None:
        incomplete = len(manager.incomplete_checkpoints())
        note = f" ({incomplete} incomplete: saves were interrupted)" if incomplete else ""
        raise CheckpointError(
            f"{path}: no complete checkpoint in {checkpoints_dir}{note}; expected {expected}"
        )
    return latest.path


def _checkpoints_dir_of_run(run_dir: Path) -> Path | None:
    """The checkpoints directory a run directory's config names (default run_dir/checkpoints)."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        from megapatch.config import load_config

        try:
            configured = load_config(saved).checkpoint.dir
        except ConfigError:
            configured = None
        if configured and Path(configured).is_dir():
            return Path(configured)
    return run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else None


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Find (see find_checkpoint) and read a checkpoint into full TP=1 fp32 weights."""
    step_dir = find_checkpoint(path)
    state0, file = load_model_states(step_dir)
    client = ClientState.from_model_states(state0, file)
    model_config = _model_config(client.model_config, step_dir)
    if is_universal(step_dir):  # resharded (reshard.py): whole fp32 weights, one file each
        state = _as_trained(read_universal_weights(step_dir), client)
    elif client.zero_stage == 3:
        state = _gather_zero3(step_dir, client, model_config)
    elif client.pipeline_model_parallel_size > 1:  # one file per pipeline layer and TP rank
        shards = [
            _pipeline_shard(step_dir, rank, model_config, client.pipeline_model_parallel_size)
            for rank in range(client.tensor_model_parallel_size)
        ]
        state = merge_tensor_parallel_shards(shards, partition_dims(model_config), step_dir)
    else:
        shards = [state0["module"]]
        for rank in range(1, client.tensor_model_parallel_size):
            try:
                shards.append(load_model_states(step_dir, rank)[0]["module"])
            except CheckpointError as exc:
                if "no DeepSpeed model states" not in str(exc):
                    raise
                raise CheckpointError(
                    f"{step_dir}: saved with TP={client.tensor_model_parallel_size} but "
                    f"mp_rank_{rank:02d}_model_states.pt is missing"
                ) from None
        state = merge_tensor_parallel_shards(shards, partition_dims(model_config), step_dir)
    state = {
        name: (w[: model_config.vocab_size] if name in VOCAB_WEIGHTS else w).float()
        for name, w in state.items()
    }
    run_dir = step_dir.parent.parent if (step_dir.parent.parent / "config.yaml").is_file() else None
    if run_dir is None and client.config.get("run", {}).get("dir"):
        configured = Path(client.config["run"]["dir"])
        run_dir = configured if configured.is_dir() else None
    log.info(
        "read %s (step %d, TP=%d, PP=%d, ZeRO-%d)",
        step_dir,
        client.step,
        client.tensor_model_parallel_size,
        client.pipeline_model_parallel_size,
        client.zero_stage,
    )
    return LoadedCheckpoint(step_dir, client.step, model_config, state, client, run_dir)


def _model_config(saved: dict[str, Any], where: Path) -> GPTConfig:
    cfg = GPTConfig.from_saved(saved)
    # The kernels are chosen for this machine, not the one that trained.
    cfg.ops_backend = "auto"
    cfg.activation_checkpointing = False
    try:
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: its saved model config is invalid ({exc})") from exc
    return cfg


def partition_dims(cfg: GPTConfig) -> dict[str, int | None]:
    """Each parameter's TP split dimension (None: replicated), as the model declares it."""
    return {n: getattr(p, "partition_dim", None) for n, p in GPT.skeleton(cfg).named_parameters()}


def merge_tensor_parallel_shards(
    shards: list[dict[str, torch.Tensor]], dims: dict[str, int | None], where: Path
) -> dict[str, torch.Tensor]:
    """Concatenate each TP-split weight along its partition dimension (in TP rank order)."""
    names = set(dims)
    for rank, shard in enumerate(shards):
        if set(shard) != names:
            odd = sorted(set(shard) ^ names)[:3]
            raise CheckpointError(
                f"{where}: TP rank {rank}'s weights do not match the saved model config "
                f"(differing names: {', '.join(odd)})"
            )
    merged = {}
    for name, dim in dims.items():
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def _pipeline_shard(
    step_dir: Path, tp_rank: int, model_config: GPTConfig, stages: int
) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s weights of a pipeline checkpoint, every stage's layers together,
    under the GPT's names (DeepSpeed writes one file per pipeline layer and TP rank)."""
    from megapatch.model.pipeline import layer_prefix

    n = model_config.n_layers
    state: dict[str, torch.Tensor] = {}
    for layer in range(n + 2):  # embedding, the blocks, the head
        file = step_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"
        if not file.is_file():
            raise CheckpointError(
                f"{step_dir}: saved with PP={stages} but {file.name} (pipeline layer {layer}, "
                f"TP rank {tp_rank}) is missing"
            )
        weights = safe_load(file, mmap=True)
        if not isinstance(weights, dict):
            raise CheckpointError(f"{file}: not a layer state dict")
        prefix = layer_prefix(layer, n)
        state.update({prefix + name: w for name, w in weights.items()})
    return state


def _gather_zero3(step_dir: Path, client: ClientState, model_config: GPTConfig):
    """Full weights of a ZeRO-3 checkpoint: each TP rank's fp32 master partitions gathered
    over DP (DeepSpeed's zero_to_fp32), then the TP shards merged."""
    tp = client.tensor_model_parallel_size
    shards = []
    with tempfile.TemporaryDirectory(prefix="megapatch-zero3-") as scratch:
        for rank in range(tp):
            files = sorted(step_dir.glob(f"zero_pp_rank_*_mp_rank_{rank:02d}_*_states.pt"))
            if not files:
                raise CheckpointError(
                    f"{step_dir}: saved with TP={tp} but TP rank {rank}'s ZeRO-3 partitions are missing"
                )
            # zero_to_fp32 reads every partition file of a directory: give it one TP rank's.
            view = Path(scratch) / f"tp{rank}" / step_dir.name
            view.mkdir(parents=True)
            for file in files:
                (view / file.name).symlink_to(file.resolve())
            shards.append(_zero_to_fp32(view, step_dir))
    state = (
        shards[0]
        if tp == 1
        else merge_tensor_parallel_shards(shards, partition_dims(model_config), step_dir)
    )
    return _as_trained(state, client)


def _as_trained(state: dict[str, torch.Tensor], client: ClientState) -> dict[str, torch.Tensor]:
    """fp32 master weights rounded as the engine rounds them after every step of a
    bf16/fp16 run, so every layout reads the numbers the model computed with."""
    precision = client.config.get("train", {}).get("precision", "fp32")
    dtype = _PRECISION_DTYPES.get(precision)
    if dtype is not None:
        state = {name: w.to(dtype) for name, w in state.items()}
    return state


def _zero_to_fp32(view: Path, step_dir: Path) -> dict[str, torch.Tensor]:
    # DeepSpeed logs to stdout on import and zero_to_fp32 prints its progress and bars:
    # keep the command's output its own.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            # zero_to_fp32 unpickles every partition without restrictions: check them first.
            check_files(sorted(view.glob("*.pt")))
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(view.parent), tag=view.name)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{step_dir}: cannot gather the ZeRO-3 partitions ({exc})") from exc
    log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    return dict(state)


@torch.no_grad()
def load_full_state_dict(model, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy full (TP=1, unpadded) weights into `model` (a GPT, or one pipeline stage of
    it), taking this rank's TP shard of each.

    Every parameter must be present with its full shape; `source` names the weights in
    the one-line CheckpointError otherwise.
    """
    tp = get_tensor_model_parallel_world_size()
    if hasattr(model, "gpt_named_parameters"):  # one pipeline stage: its share of the names
        params = dict(model.gpt_named_parameters())
        known = set(partition_dims(model.cfg))
    else:
        params = dict(model.named_parameters())
        known = set(params)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - known)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{source}: weights do not fit the model ({'; '.join(parts)})")
    for name, param in params.items():
        full = state[name]
        dim = getattr(param, "partition_dim", None)
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= tp
        if name in VOCAB_WEIGHTS:
            expected[0] = model.cfg.vocab_size  # the model's rows past this are padding
        if list(full.shape) != expected:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(full.shape)}, the model expects "
                f"{tuple(expected)}"
            )
        param.copy_(tensor_parallel_shard(model, name, param, full))


def build_model(ckpt: LoadedCheckpoint, device: torch.device | str = "cpu") -> GPT:
    """A TP=1 GPT holding the checkpoint's weights, in eval mode, for inference."""
    with torch.device("meta"):
        model = GPT(ckpt.model_config)
    model = model.to_empty(device=device)
    load_full_state_dict(model, ckpt.state_dict, source=str(ckpt.path))
    return model.eval()


__all__ = [
    "LoadedCheckpoint",
    "find_checkpoint",
    "read_checkpoint",
    "build_model",
    "load_full_state_dict",
    "merge_tensor_parallel_shards",
    "partition_dims",
    "VOCAB_WEIGHTS",
]
