"""Keys and values of the positions already seen, kept for incremental decoding.

    cache = KVCache.for_model(model, batch_size=1, max_len=cfg.seq_len)
    logits = model(prompt_ids, kv_cache=cache)      # prefill: [B, P, V]; cache.length == P
    logits = model(next_id[:, None], kv_cache=cache)  # one step: [B, 1, V]; cache.length == P + 1

Training never uses a cache; inference only (token mode, K=1).
"""

from __future__ import annotations

import torch

from megapatch.errors import ConfigError


class LayerKVCache:
    """One attention layer's keys and values, preallocated to `max_len` positions."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device):
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, max_len, hd]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, max_len, hd]
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, L, hd] after the cached positions; return all of them
        [B, Hkv, length + L, hd]."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """A LayerKVCache per transformer block; `length` is the number of cached positions."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.batch_size = batch_size
        self.layers = [LayerKVCache(shape, dtype, device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache matching `model` (this rank's heads, its dtype and device); `max_len`
        defaults to the trained context seq_len."""
        weight = next(model.parameters())
        attention = model.layers[0].self_attn
        return cls(
            n_layers=len(model.layers),
            batch_size=batch_size,
            max_len=model.cfg.seq_len if max_len is None else max_len,
            n_kv_heads=attention.n_local_kv_heads,
            head_dim=attention.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    @property
    def length(self) -> int:
        return self.layers[0].length

    def check_room(self, batch_size: int, new_positions: int) -> None:
        """Raise ConfigError unless `new_positions` more positions of this batch size fit."""
        if batch_size != self.batch_size:
            raise ConfigError(
                f"the KV cache holds a batch of {self.batch_size}, the input has {batch_size}"
            )
        if self.length + new_positions > self.max_len:
            raise ConfigError(
                f"the KV cache holds {self.max_len} positions: {self.length} cached + "
                f"{new_positions} new do not fit"
            )
