"""Patch ops: the patch embedding (mean of K token embeddings) and the patch loss (one
distribution scored against the next patch's K tokens), plus their vocab-parallel forms.

Backends: "reference" (full fp32 logits, the oracle), "torch" (chunked, memory bounded
independently of N·V), "triton" (fused kernels), "auto" (triton for CUDA tensors when
triton imports, else torch).
"""

from megapatch.ops._checks import BACKENDS
from megapatch.ops.api import (
    patch_embedding,
    patch_loss,
    vocab_parallel_patch_embedding,
    vocab_parallel_patch_loss,
)

__all__ = [
    "BACKENDS",
    "patch_embedding",
    "patch_loss",
    "vocab_parallel_patch_embedding",
    "vocab_parallel_patch_loss",
]
