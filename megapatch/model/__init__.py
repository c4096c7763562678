"""The LLaMA-style GPT, written as plain PyTorch over the tensor-parallel layers."""

from megapatch.model.config import GPTConfig
from megapatch.model.gpt import GPT, IGNORE_INDEX, VOCAB_WEIGHTS
from megapatch.model.kv_cache import KVCache, LayerKVCache
from megapatch.model.transformer import MLP, Attention, Block, RMSNorm, apply_rotary, rotary_cos_sin

__all__ = [
    "GPTConfig",
    "GPT",
    "IGNORE_INDEX",
    "VOCAB_WEIGHTS",
    "KVCache",
    "LayerKVCache",
    "Block",
    "Attention",
    "MLP",
    "RMSNorm",
    "rotary_cos_sin",
    "apply_rotary",
]
