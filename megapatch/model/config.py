"""The model's hyperparameters and their checks."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from megapatch.config.validation import model_shape_problems, sequence_parallel_problems
from megapatch.errors import ConfigError
from megapatch.ops import BACKENDS

if TYPE_CHECKING:
    from megapatch.config import RunConfig


@dataclass
class GPTConfig:
    """A LLaMA-style decoder. Field names match the `model` section of a run config."""

    vocab_size: int
    """Real vocabulary size (the tokenizer's); the embedding is padded past it for TP."""
    d_model: int
    """Model width D."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads; the head dimension is d_model / n_heads."""
    ffn_hidden: int
    """SwiGLU hidden width."""
    seq_len: int
    """Positions L the transformer is trained on (patches in the patch phase)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head)."""
    rope_theta: float = 10000.0
    """RoPE base: inv_freq = 1 / theta^(2i / head_dim)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (the paper keeps them untied)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * n_layers)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the TP size."""
    ops_backend: str = "auto"
    """Backend of the patch embedding and patch loss: auto, reference, torch or triton."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism under TP: norms and residual adds on L/tp positions."""

    @classmethod
    def from_run_config(cls, cfg: RunConfig, vocab_size: int) -> GPTConfig:
        """The model of a run config; `vocab_size` resolved from the data when the config
        says "auto" (config.resolve_vocab_size)."""
        m = cfg.model
        return cls(
            vocab_size=vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads,
            ffn_hidden=m.ffn_hidden,
            seq_len=m.seq_len,
            rope_theta=m.rope_theta,
            norm_eps=m.norm_eps,
            tie_embeddings=m.tie_embeddings,
            init_std=m.init_std,
            activation_checkpointing=m.activation_checkpointing,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            ops_backend=cfg.train.ops_backend,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )

    @classmethod
    def from_saved(cls, saved: dict) -> GPTConfig:
        """The model config a checkpoint saved (unknown keys ignored), as one TP=1 model:
        without sequence parallelism, which has nothing to shard there."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in saved.items() if k in known})
        cfg.sequence_parallel = False
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ConfigError naming the first field that cannot work (with this TP size)."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "seq_len"):
            _positive_int(name, getattr(self, name))
        _positive_int("make_vocab_size_divisible_by", self.make_vocab_size_divisible_by)
        if self.n_kv_heads is not None:
            _positive_int("n_kv_heads", self.n_kv_heads)
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError(
                f"model.rope_theta={self.rope_theta}, model.norm_eps={self.norm_eps} and "
                f"model.init_std={self.init_std} must all be positive"
            )
        if self.ops_backend not in BACKENDS:
            raise ConfigError(
                f"model.ops_backend={self.ops_backend!r} must be one of {', '.join(BACKENDS)}"
            )
        for key, value, expected in model_shape_problems(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn_hidden,
            tensor_parallel_size=tensor_parallel_size,
        ):
            raise ConfigError(f"{key}={value}: expected {expected}")
        if self.sequence_parallel:
            for key, value, expected in sequence_parallel_problems(
                tensor_parallel_size=tensor_parallel_size, seq_len=self.seq_len
            ):
                raise ConfigError(f"{key}={value}: expected {expected}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r} must be a positive integer")
