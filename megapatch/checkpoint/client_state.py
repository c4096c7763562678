"""The "megapatch" client state of a checkpoint: defined here, written in one place
(`ClientState.to_engine`), read from disk once (`read_client_state`).

DeepSpeed pickles `client_state` into rank 0's model-states file. megapatch keeps there
what a checkpoint needs beyond weights and optimizer state:

    progress          where the run is (Progress: steps, phase, windows consumed per phase, ...)
    config            the resolved run config, {section: {field: value}}
    identity          what a run must share with the checkpoint to continue it:
                      config_hash, model_config, tokenizer_sha256,
                      tensor_model_parallel_size, zero_stage, data_parallel_size,
                      pipeline_model_parallel_size (pipeline runs only)

The identity keys sit at the top level of the "megapatch" dict (the layout every release
has written), so older checkpoints read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megapatch.checkpoint.safe_load import safe_load
from megapatch.errors import CheckpointError

CLIENT_KEY = "megapatch"
IDENTITY_KEYS = (
    "config_hash",
    "model_config",
    "tokenizer_sha256",
    "tensor_model_parallel_size",
    "zero_stage",
    "data_parallel_size",
    "pipeline_model_parallel_size",  # absent: 1 (written only by pipeline runs)
)
# DeepSpeed's names for TP rank r's model states (ZeRO 0-2, ZeRO-3).
MODEL_STATE_FILES = (
    "mp_rank_{:02d}_model_states.pt",
    "zero_pp_rank_0_mp_rank_{:02d}_model_states.pt",
)


@dataclass
class Progress:
    """Where the run is. Per-phase counts are global (all DP ranks together), so they do
    not depend on the data-parallel size (nanotron keeps consumed samples per stage the
    same way, never derived as steps x batch)."""

    global_step: int = 0
    phase_index: int = 0
    step_in_phase: int = 0
    consumed_windows: dict[str, int] = field(default_factory=dict)  # per phase
    tokens: dict[str, int] = field(default_factory=dict)  # per phase
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    wall_time: dict[str, float] = field(default_factory=dict)  # per phase, seconds of training

    @classmethod
    def start(cls, phase_names: list[str]) -> Progress:
        return cls(
            consumed_windows={name: 0 for name in phase_names},
            tokens={name: 0 for name in phase_names},
            wall_time={name: 0.0 for name in phase_names},
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Progress:
        return cls(**state)


@dataclass
class ClientState:
    progress: Progress
    config: dict[str, Any]
    """The run's resolved config as {section: {field: value}}."""
    identity: dict[str, Any]
    """IDENTITY_KEYS -> value (a key an older checkpoint lacks is absent)."""

    def to_engine(self) -> dict[str, Any]:
        """The `client_state` argument of DeepSpeed's save_checkpoint."""
        return {
            CLIENT_KEY: {
                "progress": self.progress.state_dict(),
                "config": self.config,
                **self.identity,
            }
        }

    @classmethod
    def from_model_states(cls, states: Any, file: Path) -> ClientState:
        """The client state inside a loaded model-states dict (`file` names it in errors)."""
        meta = states.get(CLIENT_KEY) if isinstance(states, dict) else None
        if not isinstance(meta, dict) or "model_config" not in meta:
            raise CheckpointError(f"{file}: no megapatch client state; not written by megapatch")
        return cls(
            progress=Progress.from_state_dict(meta.get("progress", {})),
            config=meta.get("config", {}),
            identity={k: meta[k] for k in IDENTITY_KEYS if k in meta},
        )

    # Views the readers use.
    @property
    def step(self) -> int:
        return self.progress.global_step

    @property
    def tensor_model_parallel_size(self) -> int:
        return int(self.identity.get("tensor_model_parallel_size", 1))

    @property
    def pipeline_model_parallel_size(self) -> int:
        return int(self.identity.get("pipeline_model_parallel_size", 1))

    @property
    def zero_stage(self) -> int:
        return int(self.identity.get("zero_stage", 0))

    @property
    def data_parallel_size(self) -> int:
        return int(self.identity.get("data_parallel_size", 1))

    @property
    def model_config(self) -> dict[str, Any]:
        return self.identity["model_config"]


def run_identity(cfg, model_config, tokenizer_sha256: str, *, dp_size: int) -> dict[str, Any]:
    """What a checkpoint must share with the run `cfg` to be resumed by it: the model, the
    data's tokenizer, the config identity, the parallel layout."""
    from dataclasses import asdict

    par = cfg.parallel
    identity = {
        "config_hash": cfg.config_hash(),
        "model_config": asdict(model_config),
        "tokenizer_sha256": tokenizer_sha256,
        "tensor_model_parallel_size": par.tensor_model_parallel_size,
        "zero_stage": par.zero_stage,
        "data_parallel_size": dp_size,
    }
    if par.pipeline_model_parallel_size > 1:  # absent at PP=1: earlier checkpoints match
        identity["pipeline_model_parallel_size"] = par.pipeline_model_parallel_size
    return identity


def model_states_file(step_dir: Path, tp_rank: int = 0) -> Path:
    """TP rank `tp_rank`'s DeepSpeed model-states file of a checkpoint directory."""
    for pattern in MODEL_STATE_FILES:
        file = step_dir / pattern.format(tp_rank)
        if file.is_file():
            return file
    raise CheckpointError(
        f"{step_dir}: no DeepSpeed model states ({MODEL_STATE_FILES[0].format(tp_rank)}); "
        "not a megapatch checkpoint"
    )


def load_model_states(step_dir: Path, tp_rank: int = 0) -> tuple[dict[str, Any], Path]:
    """TP rank `tp_rank`'s model-states dict, memory-mapped (tensors stay on disk until
    used), read with only allowlisted types; and the file it came from."""
    file = model_states_file(step_dir, tp_rank)
    states = safe_load(file, mmap=True)
    if not isinstance(states, dict):
        raise CheckpointError(f"{file}: not a DeepSpeed model-states dict")
    return states, file


def read_client_state(step_dir: str | Path) -> ClientState:
    """The client state of checkpoint `step_dir`, its weights left on disk."""
    states, file = load_model_states(Path(step_dir))
    return ClientState.from_model_states(states, file)


__all__ = [
    "CLIENT_KEY",
    "IDENTITY_KEYS",
    "ClientState",
    "Progress",
    "load_model_states",
    "model_states_file",
    "read_client_state",
    "run_identity",
]
