"""The transformer block: pre-RMSNorm, RoPE attention (optionally grouped-query), SwiGLU.

Conventions follow Hugging Face's LlamaForCausalLM exactly (half-split `rotate_half` RoPE,
fp32 RMSNorm, separate q/k/v/o and gate/up/down projections with the same names), so the
weights export 1:1 with no permutation. Everything here is K-agnostic: in the patch phase
it simply runs over L patches instead of L tokens.

Under tensor parallelism each rank holds n_heads/tp query heads, n_kv_heads/tp key/value
heads and ffn_hidden/tp SwiGLU channels; the projections do the collectives. With
sequence parallelism the residual stream between them holds L/tp positions per rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megapatch.model.config import GPTConfig
from megapatch.model.kv_cache import LayerKVCache
from megapatch.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    get_tensor_model_parallel_world_size,
)


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps), computed in fp32, cast back, then scaled by `weight`.

    With `sequence_parallel` each TP rank normalises its own L/tp positions with the same
    (replicated) weight, so the weight's gradient is the sum over the TP ranks."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if self.sequence_parallel:
            weight = copy_to_tensor_model_parallel_region(weight)  # backward: all-reduce over TP
        return weight * x32.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [L, head_dim] for the given positions, in fp32.

    Computed per call rather than held in a buffer: a buffer would be cast to bf16 along
    with the weights, and the table is tiny next to the attention itself.
    """
    exponents = (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    inv_freq = 1.0 / (theta**exponents)  # [head_dim/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [L, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, head_dim]: the half-split layout
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, head_dim] by position; cos, sin [L, head_dim]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention; with n_kv_heads < n_heads each K/V head serves a group of
    consecutive query heads (query head h reads K/V head h // (n_heads / n_kv_heads))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = cfg.head_dim
        self.n_local_heads = cfg.n_heads // tp
        self.n_local_kv_heads = cfg.kv_heads // tp
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        # seed=None: GPT initialises every weight in one place.
        sp = cfg.sequence_parallel
        self.q_proj = ColumnParallelLinear(cfg.d_model, q_size, sequence_parallel=sp, seed=None)
        self.k_proj = ColumnParallelLinear(cfg.d_model, kv_size, sequence_parallel=sp, seed=None)
        self.v_proj = ColumnParallelLinear(cfg.d_model, kv_size, sequence_parallel=sp, seed=None)
        self.o_proj = RowParallelLinear(q_size, cfg.d_model, sequence_parallel=sp, seed=None)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [B, L, D] (under sequence parallelism [B, L/tp, D]: the projections gather the
        sequence, o_proj scatters it back); with a `cache` (inference), the L positions
        follow the cached ones and attend to them too."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, L, H·hd / tp]
        B, L = q.shape[:2]
        q = q.view(B, L, self.n_local_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = k.view(B, L, self.n_local_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = v.view(B, L, self.n_local_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_local_kv_heads != self.n_local_heads
        if cache is None:  # training and plain inference: [B, H, L, hd]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            start = cache.length
            k, v = cache.append(k, v)  # [B, Hkv, start + L, hd]
            # Query i sits at position start + i and sees keys 0 .. start + i.
            visible = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, L, self.n_local_heads * self.head_dim)  # [B, L, H·hd]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        sp = cfg.sequence_parallel
        self.gate_proj = ColumnParallelLinear(
            cfg.d_model, cfg.ffn_hidden, sequence_parallel=sp, seed=None
        )
        self.up_proj = ColumnParallelLinear(
            cfg.d_model, cfg.ffn_hidden, sequence_parallel=sp, seed=None
        )
        self.down_proj = RowParallelLinear(
            cfg.ffn_hidden, cfg.d_model, sequence_parallel=sp, seed=None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        sp = cfg.sequence_parallel
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=sp)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=sp)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# Weights whose output adds straight into the residual stream get the smaller, depth-scaled
# init (GPT-2 / Megatron "scaled init"), so the residual's variance does not grow with depth.
RESIDUAL_OUTPUT_WEIGHTS = ("o_proj.weight", "down_proj.weight")


def residual_init_std(cfg: GPTConfig) -> float:
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)
