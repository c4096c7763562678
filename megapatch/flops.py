"""Training FLOPs counted from the model's dimensions, per phase, and the cost of a plan
relative to token-only training. Pure Python.

What is counted: every matmul, at 2 FLOPs per multiply-add, forward and backward
(backward = 2x forward, so training = 3x forward; activation recomputation is not model
FLOPs and is not counted). Per position and layer, forward:

    attention projections   2*D*(D + 2*D_kv)  (Q, K, V)  +  2*D*D  (output)
    attention scores/values 2*L*D  +  2*L*D   (Q.K^T over L keys, then A.V; the full
                            L x L square, as Megatron, PaLM and nanoGPT count it --
                            a causal kernel skips about half)
    SwiGLU MLP              3 * 2*D*F
and once per position the output layer 2*D*V (V padded). Norms, RoPE, softmax and the
embedding gather are elementwise and left out, as usual.

The patch phase runs the same transformer and output layer over the same L positions
per sequence, but a sequence holds K*L tokens: every term above -- attention's L^2 and
the output layer included -- shrinks by exactly K per token. The only patch-specific
work is averaging K embeddings per position (K*D forward, K*D backward). So the precise
cost ratio differs from lambda/K + 1 - lambda only through that average and the rounding
of lambda to whole steps; both are shown.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ModelDims",
    "padded_vocab_size",
    "forward_flops_per_position",
    "training_flops_per_sequence",
    "PhaseFlops",
    "PlanFlops",
    "plan_flops",
]


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int  # V as computed by the output layer (padded)
    d_model: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int
    ffn_hidden: int  # F
    seq_len: int  # L
    tie_embeddings: bool = False

    @classmethod
    def from_config(
        cls, cfg, vocab_size: int, tensor_parallel_size: int | None = None
    ) -> ModelDims:
        """Dims of a RunConfig's model; `vocab_size` is the resolved (unpadded) vocabulary."""
        m = cfg.model
        tp = tensor_parallel_size or cfg.parallel.tensor_model_parallel_size
        return cls(
            vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by * tp),
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads,
            ffn_hidden=m.ffn_hidden,
            seq_len=m.seq_len,
            tie_embeddings=m.tie_embeddings,
        )

    @property
    def kv_dim(self) -> int:
        return self.d_model // self.n_heads * self.n_kv_heads

    def parameters(self) -> dict[str, int]:
        """Parameter counts: embedding, transformer (blocks and final norm), output layer."""
        D, F = self.d_model, self.ffn_hidden
        attention = D * (D + 2 * self.kv_dim) + D * D
        block = attention + 3 * D * F + 2 * D  # + two RMSNorm weights
        return {
            "embedding": self.vocab_size * D,
            "transformer": self.n_layers * block + D,
            "output": 0 if self.tie_embeddings else self.vocab_size * D,
        }


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def pipeline_layer_parameters(dims: ModelDims, vocab_size: int | None = None) -> list[int]:
    """Parameters of each pipeline layer [embedding, block 0 .. n-1, head]: what the stage
    split balances (megapatch.model.pipeline, and the plan's torch-free copy of the split in
    training/memory.py). The split pads the vocabulary as for TP=1, so pass that one
    (`vocab_size`; default dims' own)."""
    D, V = dims.d_model, dims.vocab_size if vocab_size is None else vocab_size
    block = 2 * D * D + 2 * D * dims.kv_dim + 3 * D * dims.ffn_hidden + 2 * D
    return [V * D, *[block] * dims.n_layers, V * D + D]


def forward_flops_per_position(dims: ModelDims) -> dict[str, int]:
    """Forward matmul FLOPs for one position of a length-L sequence, by component."""
    D, L = dims.d_model, dims.seq_len
    return {
        "attention_projections": dims.n_layers * (2 * D * (D + 2 * dims.kv_dim) + 2 * D * D),
        "attention_scores": dims.n_layers * (2 * L * D + 2 * L * D),
        "mlp": dims.n_layers * 3 * 2 * D * dims.ffn_hidden,
        "output": 2 * D * dims.vocab_size,
    }


def training_flops_per_sequence(dims: ModelDims, patch_size: int) -> int:
    """Forward + backward FLOPs for one sequence of L positions (K*L tokens)."""
    per_position = 3 * sum(forward_flops_per_position(dims).values())
    if patch_size > 1:
        per_position += 2 * patch_size * dims.d_model  # average K embeddings, and its backward
    return dims.seq_len * per_position


@dataclass(frozen=True)
class PhaseFlops:
    name: str
    patch_size: int
    per_token: float  # training FLOPs per token of the window
    per_step: int
    total: int


@dataclass(frozen=True)
class PlanFlops:
    phases: tuple[PhaseFlops, ...]
    total: int
    token_only_total: int  # the same model trained token-only on the same steps and tokens
    simple_ratio: float  # sum of lambda_i/K_i + 1 - sum of lambda_i, configured lambdas
    precise_ratio: float  # total / token_only_total
    token_only_per_token: float


def plan_flops(dims: ModelDims, plan) -> PlanFlops:
    """FLOPs of every phase of a StagePlan, and its cost relative to token-only training."""
    phases = []
    for ph in plan.phases:
        per_step = ph.sequences_per_step * training_flops_per_sequence(dims, ph.patch_size)
        phases.append(
            PhaseFlops(
                ph.name, ph.patch_size, per_step / ph.tokens_per_step, per_step, per_step * ph.steps
            )
        )
    total = sum(ph.total for ph in phases)
    token_sequences = plan.tokens_per_step // plan.seq_len
    token_only = plan.total_steps * token_sequences * training_flops_per_sequence(dims, 1)
    simple = plan.simple_cost_ratio
    per_token = token_only / plan.total_tokens
    return PlanFlops(tuple(phases), total, token_only, simple, total / token_only, per_token)
