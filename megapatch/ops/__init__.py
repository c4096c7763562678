"""Patch ops: the patch embedding (mean of K token embeddings) and the patch loss (one
distribution scored against the next patch's K tokens), plus their vocab-parallel forms.

Backends: "reference" (full fp32 logits, the oracle), "torch" (chunked, memory bounded
independently of N·V), "triton" (fused kernels), "auto" (triton for CUDA tensors when
triton imports, else torch).

`run_value_checks` is the ops' rule for checks that read tensor values (a host sync on a
GPU): every call on the CPU or under MEGAPATCH_DEBUG_CHECKS=1, else until a call of the
same signature has passed; callers above the ops (the model) can share it.
"""

from megapatch.ops._checks import BACKENDS, debug_checks, run_value_checks
from megapatch.ops.api import (
    patch_embedding,
    patch_loss,
    vocab_parallel_patch_embedding,
    vocab_parallel_patch_loss,
)

__all__ = [
    "BACKENDS",
    "debug_checks",
    "run_value_checks",
    "patch_embedding",
    "patch_loss",
    "vocab_parallel_patch_embedding",
    "vocab_parallel_patch_loss",
]
