"""One rank's tensor-parallel piece of a full (TP=1, unpadded) tensor: what loading full
weights (full_weights.py) and full optimizer state (zero0.py) into a TP shard share."""

from __future__ import annotations

import torch

from megapatch.model import VOCAB_WEIGHTS
from megapatch.parallel import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


def tensor_parallel_shard(model, name: str, param, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` (TP=1, unpadded) for parameter `name` of `model`: the
    vocabulary rows padded with zeros as the model pads them, then its TP slice. Anything
    shaped as a weight (its Adam moments too) is sliced the same way."""
    if name in VOCAB_WEIGHTS:
        padding = model.padded_vocab_size - full.shape[0]
        full = torch.cat([full, full.new_zeros(padding, *full.shape[1:])])
    dim = getattr(param, "partition_dim", None)
    if dim is not None:
        full = full.chunk(get_tensor_model_parallel_world_size(), dim=dim)[
            get_tensor_model_parallel_rank()
        ]
    return full


__all__ = ["tensor_parallel_shard", "VOCAB_WEIGHTS"]
