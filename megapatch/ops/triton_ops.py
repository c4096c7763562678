"""Placeholder: routes to the reference implementation until the real backend lands."""

from megapatch.ops.reference import patch_embedding, patch_loss

__all__ = ["patch_embedding", "patch_loss"]
