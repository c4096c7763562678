"""GPT: a LLaMA-style causal LM that reads K tokens per position in the patch phase.

The two patch-level seams are the input (the K token embeddings of a patch are averaged
into one vector) and the loss (one output distribution scored against all K tokens of
the next patch); the transformer in between only ever sees L positions. With K=1 this
is an ordinary next-token language model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megapatch.errors import ConfigError, DataError
from megapatch.flops import ModelDims, training_flops_per_sequence
from megapatch.model.config import GPTConfig
from megapatch.model.kv_cache import KVCache
from megapatch.model.transformer import (
    RESIDUAL_OUTPUT_WEIGHTS,
    Block,
    RMSNorm,
    residual_init_std,
    rotary_cos_sin,
)
from megapatch.ops import patch_loss, run_value_checks, vocab_parallel_patch_loss
from megapatch.parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_world_size,
    init_weight_shard_,
    pad_vocab_size,
    parameter_seed,
    scatter_to_sequence_parallel_region,
)

IGNORE_INDEX = -100
# Weights whose rows are the vocabulary: padded for TP in a model, unpadded when whole.
VOCAB_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")


class GPT(nn.Module):
    """`GPT(cfg, seed)` builds the TP shard of this rank (TP size from megapatch.parallel).

    A TP=n model built from a seed holds exactly the shards of the TP=1 model built from
    that seed: every weight is drawn whole from its own generator, seeded by (seed, name),
    and sliced.
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.tp_size = get_tensor_model_parallel_world_size()
        cfg.validate(self.tp_size)
        self.cfg = cfg
        self.sequence_parallel = cfg.sequence_parallel
        self.padded_vocab_size = pad_vocab_size(
            cfg.vocab_size, cfg.make_vocab_size_divisible_by, self.tp_size
        )

        self.embed_tokens = VocabParallelEmbedding(
            self.padded_vocab_size, cfg.d_model, seed=None, backend=cfg.ops_backend
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=cfg.sequence_parallel)
        # The output head is [V_pad, D] split by vocabulary rows, like the embedding.
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else ColumnParallelLinear(cfg.d_model, self.padded_vocab_size, seed=None)
        )
        self.init_weights(seed)

    @classmethod
    def skeleton(cls, cfg: GPTConfig) -> GPT:
        """The model on the meta device: every parameter's name, shape and TP split, with
        no memory and no initialisation cost."""
        with torch.device("meta"):
            return cls(cfg)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile every transformer block in place: parameter names (and so
        checkpoints and exports) stay as they are; the embedding and loss keep their own
        kernels."""
        for layer in self.layers:
            layer.compile(backend=backend)

    def init_weights(self, seed: int) -> None:
        init_parameters_(self.named_parameters(), self.cfg, seed)

    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's rows of the output head [V_pad/tp, D]."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        patch_size: int = 1,
        *,
        kv_cache: KVCache | None = None,
        position_weights=None,
    ) -> torch.Tensor:
        """input_ids [B, K·L]; targets [B, K·L] (the window shifted by K) or None.

        With targets: the scalar patch loss (mean over non-ignored targets). Without:
        logits [B, L, vocab_size] of the distribution at each position (for K=1, the
        ordinary next-token logits [B, T, vocab_size]), gathered over TP and unpadded.
        With a `kv_cache` (inference, K=1, no targets): input_ids continue the cached
        positions, which they attend to; their keys and values are appended to the cache.
        `position_weights` (with targets): the K targets' weights, a sequence or tensor [K]
        (non-negative, normalised by the loss); None = uniform, the unweighted loss.
        """
        self._check_inputs(input_ids, targets, patch_size)
        B, T = input_ids.shape
        K = patch_size
        L = T // K
        start = 0
        if kv_cache is not None:
            if targets is not None or K != 1:
                raise ConfigError("a KV cache is for inference: token mode (K=1), no targets")
            if self.sequence_parallel:
                raise ConfigError(
                    "a KV cache is for inference: build the model without sequence_parallel"
                )
            kv_cache.check_room(B, L)
            start = kv_cache.length

        x = self.embed_tokens(input_ids.reshape(B, L, K))  # [B, L, D]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [B, L/tp, D]
        cos, sin = rotary_cos_sin(
            torch.arange(start, start + L, device=x.device), self.cfg.head_dim, self.cfg.rope_theta
        )
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                x = layer(x, cos, sin, kv_cache.layers[i])
            elif self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        x = self.norm(x)  # [B, L, D]
        if self.sequence_parallel:
            # The loss (and the logits' gather) sum over TP themselves: keep our slice's grad.
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)

        if targets is None:
            return self._logits(x)
        return self._loss(x.reshape(B * L, -1), targets.reshape(B * L, K), position_weights)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x)
        logits = x @ self.output_weight.t()  # [B, L, V_pad/tp]
        logits = gather_from_tensor_model_parallel_region(logits)  # [B, L, V_pad]
        return logits[..., : self.cfg.vocab_size]

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, weights=None) -> torch.Tensor:
        return loss_from_hidden(
            self.cfg,
            hidden,
            self.output_weight,
            targets,
            vocab_start=self.embed_tokens.vocab_start_index,
            position_weights=weights,
        )

    def _check_inputs(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None, patch_size: int
    ) -> None:
        check_inputs(self.cfg, input_ids, targets, patch_size)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters of the whole model (all TP shards, no vocabulary padding).

        `non_embedding` leaves out the input embedding (and the tied or untied head), the
        count scaling laws use.
        """
        c = self.cfg
        per_layer = (
            c.d_model * c.n_heads * c.head_dim * 2  # q_proj, o_proj
            + c.d_model * c.kv_heads * c.head_dim * 2  # k_proj, v_proj
            + 3 * c.d_model * c.ffn_hidden  # gate, up, down
            + 2 * c.d_model  # two norms
        )
        total = c.n_layers * per_layer + c.d_model  # + final norm
        if not non_embedding:
            total += c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return total

    def flops_per_token(self, patch_size: int = 1) -> float:
        """Training FLOPs (forward + backward) per token of the input window.

        The count is megapatch.flops' (matmuls at 2 FLOPs per multiply-add, backward twice
        forward, attention over the full L x L square, the padded output head): the
        transformer and the head run once per position and a position reads K tokens, so
        the per-token cost shrinks by K, plus the K-embedding average.
        """
        c = self.cfg
        dims = ModelDims(
            vocab_size=self.padded_vocab_size,
            d_model=c.d_model,
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.kv_heads,
            ffn_hidden=c.ffn_hidden,
            seq_len=c.seq_len,
            tie_embeddings=c.tie_embeddings,
        )
        return training_flops_per_sequence(dims, patch_size) / (patch_size * c.seq_len)


@torch.no_grad()
def init_parameters_(named_parameters, cfg: GPTConfig, seed: int) -> None:
    """Initialise (name, parameter) pairs named as in the whole TP=1 GPT: norms at 1;
    matrices N(0, init_std²), residual outputs N(0, (init_std/√(2·n_layers))²); vocabulary
    padding rows at 0. Each weight is drawn whole from its own (seed, name) generator and
    sliced, so any TP shard or pipeline stage holds exactly the TP=1 model's numbers."""
    for name, param in named_parameters:
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        std = residual_init_std(cfg) if name.endswith(RESIDUAL_OUTPUT_WEIGHTS) else cfg.init_std
        init_rows = cfg.vocab_size if name in VOCAB_WEIGHTS else None
        init_weight_shard_(
            param,
            getattr(param, "partition_dim", None),
            std=std,
            seed=parameter_seed(seed, name),
            init_rows=init_rows,
        )


def loss_from_hidden(
    cfg: GPTConfig,
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    position_weights=None,
) -> torch.Tensor:
    """The patch loss of hidden [N, D] against targets [N, K] with this rank's rows of the
    output head [V_pad/tp, D] (rows from `vocab_start`); the ops never build [N, V] logits
    (except the reference backend)."""
    if position_weights is not None:  # [K]
        position_weights = _weights_on(position_weights, hidden.device)
    if get_tensor_model_parallel_world_size() == 1:
        return patch_loss(
            hidden,
            output_weight,
            targets,
            position_weights=position_weights,
            ignore_index=IGNORE_INDEX,
            vocab_size=cfg.vocab_size,
            backend=cfg.ops_backend,
        )
    return vocab_parallel_patch_loss(
        hidden,
        output_weight,
        targets,
        vocab_start=vocab_start,
        vocab_size=cfg.vocab_size,
        group=get_tensor_model_parallel_group(),
        position_weights=position_weights,
        ignore_index=IGNORE_INDEX,
        backend=cfg.ops_backend,
    )


_WEIGHTS_ON_DEVICE: dict = {}


def _weights_on(weights, device: torch.device) -> torch.Tensor:
    """The K target weights as an fp32 tensor on `device`; a phase's tuple is copied to the
    device once, not at every step (each copy would wait for the stream)."""
    if isinstance(weights, torch.Tensor):
        return weights.to(device=device, dtype=torch.float32)
    key = (tuple(float(w) for w in weights), str(device))
    if key not in _WEIGHTS_ON_DEVICE:
        if len(_WEIGHTS_ON_DEVICE) > 64:
            _WEIGHTS_ON_DEVICE.clear()
        _WEIGHTS_ON_DEVICE[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return _WEIGHTS_ON_DEVICE[key]


def check_inputs(
    cfg: GPTConfig, input_ids: torch.Tensor | None, targets: torch.Tensor | None, patch_size: int
) -> None:
    """Every check of a forward's inputs before any work, each a one-line error naming the
    values. `input_ids` None: only the targets (a pipeline's last stage sees no inputs)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"patch_size={patch_size!r} must be a positive integer")
    ids = input_ids if input_ids is not None else targets
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        name = "input_ids" if input_ids is not None else "targets"
        raise ConfigError(
            f"{name} must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}"
        )
    B, T = ids.shape
    if T % patch_size != 0:
        raise ConfigError(f"sequence length T={T} is not divisible by patch_size K={patch_size}")
    if input_ids is not None and targets is not None and tuple(targets.shape) != (B, T):
        raise ConfigError(
            f"targets must have the shape of input_ids {(B, T)} (the window shifted by K={patch_size}), "
            f"got {tuple(targets.shape)}"
        )
    named = [(n, t) for n, t in (("input_ids", input_ids), ("targets", targets)) if t is not None]
    signature = ("gpt-ids", cfg.vocab_size, *((n, tuple(t.shape)) for n, t in named))
    # A host sync: on a GPU once per shape (ops.run_value_checks); the loader checks every
    # window's ids against the vocabulary anyway, off the training path.
    run_value_checks(signature, ids.device, lambda: _check_ids(named, cfg.vocab_size))


def _check_ids(named: list[tuple[str, torch.Tensor]], vocab_size: int) -> None:
    """Every id in [0, vocab_size), IGNORE_INDEX targets aside: one host sync for all."""
    bounds, names = [], []
    for name, ids in named:
        if ids.numel() == 0:
            continue
        if name == "targets":
            ids = torch.where(ids == IGNORE_INDEX, torch.zeros_like(ids), ids)
        bounds.append(torch.stack(torch.aminmax(ids)))
        names.append(name)
    if not bounds:
        return
    for name, (low, high) in zip(names, torch.stack(bounds).tolist()):
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
