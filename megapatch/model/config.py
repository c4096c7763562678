"""The model's hyperparameters and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from megapatch.errors import ConfigError
from megapatch.ops import BACKENDS


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
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"model.d_model / model.n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.kv_heads}"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError(
                f"model.rope_theta={self.rope_theta}, model.norm_eps={self.norm_eps} and "
                f"model.init_std={self.init_std} must all be positive"
            )
        if self.ops_backend not in BACKENDS:
            raise ConfigError(
                f"model.ops_backend={self.ops_backend!r} must be one of {', '.join(BACKENDS)}"
            )
        tp = tensor_parallel_size
        for name, value in (
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.kv_heads),
            ("ffn_hidden", self.ffn_hidden),
        ):
            if value % tp != 0:
                raise ConfigError(
                    f"model.{name}={value} is not divisible by the tensor parallel size {tp}"
                )


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r} must be a positive integer")
