"""The GPT as a sequence of pipeline layers for DeepSpeed's pipeline engine.

    layers: [embedding] [block 0] ... [block n-1] [head]
             first stage        ...           last stage (final norm, output layer, loss)

Layer 0 averages the K token embeddings of each patch (the model's input seam), the
blocks are the GPT's own, and the head's `loss` scores each position against the next
patch's K tokens (the output seam), so the activation between stages is [B, L, D] in both
phases ([B, L/tp, D] under sequence parallelism). The phase's K and target weights are
set on the pipeline (`set_phase`) rather than passed along, since DeepSpeed hands a stage
only the previous stage's output.

Parameter names: DeepSpeed names a layer's parameters "<layer index>.<name in the layer>";
`gpt_parameter_name` maps them to the GPT's ("3.mlp.up_proj.weight" is
"layers.2.mlp.up_proj.weight"), which is what initialisation, `init.from_hf` and the
merged checkpoints use, so a pipeline built from a seed holds the one-process model's
weights, split by stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megapatch.flops import ModelDims, pipeline_layer_parameters
from megapatch.model.config import GPTConfig
from megapatch.model.gpt import check_inputs, init_parameters_, loss_from_hidden
from megapatch.model.transformer import Block, RMSNorm, rotary_cos_sin
from megapatch.parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    pad_vocab_size,
    partition_layers,
    scatter_to_sequence_parallel_region,
)


@dataclass
class PatchPhase:
    """What the first and last stages must know of the current phase."""

    patch_size: int = 1
    position_weights: tuple[float, ...] | None = None


def gpt_parameter_name(pipe_name: str, n_layers: int) -> str:
    """The GPT's name of pipeline parameter `pipe_name` ("<layer index>.<local name>")."""
    index, local = pipe_name.split(".", 1)
    layer = int(index)
    return f"layers.{layer - 1}.{local}" if 1 <= layer <= n_layers else local


def pipe_parameter_name(gpt_name: str, n_layers: int) -> str:
    """The pipeline's name of the GPT's parameter `gpt_name` (gpt_parameter_name's inverse)."""
    if gpt_name.startswith("layers."):
        _, index, local = gpt_name.split(".", 2)
        return f"{int(index) + 1}.{local}"
    return f"0.{gpt_name}" if gpt_name.startswith("embed_tokens.") else f"{n_layers + 1}.{gpt_name}"


def layer_prefix(layer: int, n_layers: int) -> str:
    """What a pipeline layer's local parameter names are prefixed with in the GPT."""
    return f"layers.{layer - 1}." if 1 <= layer <= n_layers else ""


def layer_parameter_counts(cfg: GPTConfig) -> list[int]:
    """Parameters of each pipeline layer, from the shape alone (what the split balances),
    the vocabulary padded as at TP=1 so that every TP size splits alike."""
    dims = ModelDims(
        vocab_size=pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        ffn_hidden=cfg.ffn_hidden,
        seq_len=cfg.seq_len,
    )
    return pipeline_layer_parameters(dims)


def stage_partition(cfg: GPTConfig, stages: int) -> list[int]:
    """Layer boundaries of each stage: [0, b1, ..., n_layers + 2]."""
    return partition_layers(layer_parameter_counts(cfg), stages)


class EmbeddingPipe(nn.Module):
    """Layer 0: token ids [B, K·L] -> patch embeddings [B, L, D] (the K tokens averaged)."""

    def __init__(self, cfg: GPTConfig, phase: PatchPhase):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.embed_tokens = VocabParallelEmbedding(
            padded, cfg.d_model, seed=None, backend=cfg.ops_backend
        )
        self.cfg, self.phase = cfg, phase

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        k = self.phase.patch_size
        check_inputs(self.cfg, input_ids, None, k)
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids.reshape(B, T // k, k))  # [B, L, D]
        if self.cfg.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [B, L/tp, D]
        return x


class BlockPipe(Block):
    """A transformer block that makes its own RoPE tables (a stage receives only x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.shape[1] * (
            get_tensor_model_parallel_world_size() if self.cfg.sequence_parallel else 1
        )
        cos, sin = rotary_cos_sin(
            torch.arange(positions, device=x.device), self.cfg.head_dim, self.cfg.rope_theta
        )
        if self.cfg.activation_checkpointing and self.training:
            return checkpoint(super().forward, x, cos, sin, use_reentrant=False)
        return super().forward(x, cos, sin)


class HeadPipe(nn.Module):
    """The last layer: the final norm; `loss` then scores every position against the next
    patch's K tokens with the output layer."""

    def __init__(self, cfg: GPTConfig, phase: PatchPhase):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, sequence_parallel=cfg.sequence_parallel)
        self.lm_head = ColumnParallelLinear(cfg.d_model, padded, seed=None)
        self.vocab_start = get_tensor_model_parallel_rank() * (padded // tp)
        self.cfg, self.phase = cfg, phase

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.cfg.sequence_parallel:
            # The loss sums over TP itself: keep our slice's grad.
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x  # [B, L, D]

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], targets [B, K·L] (the window shifted by K) -> the scalar loss."""
        k = self.phase.patch_size
        check_inputs(self.cfg, None, targets, k)
        B, L, _ = hidden.shape
        return loss_from_hidden(
            self.cfg,
            hidden.reshape(B * L, -1),
            self.lm_head.weight,
            targets.reshape(B * L, k),
            vocab_start=self.vocab_start,
            position_weights=self.phase.position_weights,
        )


def _pipeline_module_class():
    from deepspeed.pipe import LayerSpec, PipelineModule

    class GPTPipe(PipelineModule):
        """This rank's pipeline stage of the GPT (and its TP shard), built from a seed."""

        def __init__(self, cfg: GPTConfig, seed: int, topology, *, partition: list[int]):
            phase = PatchPhase()
            specs = [
                LayerSpec(EmbeddingPipe, cfg, phase),
                *(LayerSpec(BlockPipe, cfg) for _ in range(cfg.n_layers)),
                LayerSpec(HeadPipe, cfg, phase),
            ]
            self._partition = partition  # read by _partition_layers inside __init__
            super().__init__(specs, topology=topology, partition_method="megapatch")
            self.cfg, self.phase = cfg, phase
            self.padded_vocab_size = pad_vocab_size(
                cfg.vocab_size,
                cfg.make_vocab_size_divisible_by,
                get_tensor_model_parallel_world_size(),
            )
            if self._local_stop == len(specs):
                self.loss_fn = self.forward_funcs[-1].loss
            init_parameters_(self.gpt_named_parameters(), cfg, seed)

        def _partition_layers(self, method: str = "megapatch") -> None:
            self.parts = list(self._partition)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def gpt_named_parameters(self):
            """This stage's (GPT name, parameter) pairs."""
            for name, param in self.named_parameters():
                yield gpt_parameter_name(name, self.cfg.n_layers), param

        def set_phase(self, patch_size: int, position_weights=None) -> None:
            self.phase.patch_size = patch_size
            self.phase.position_weights = (
                tuple(position_weights) if position_weights is not None else None
            )

        def compile_blocks(self, backend: str = "inductor") -> None:
            for layer in self.forward_funcs:
                if isinstance(layer, BlockPipe):
                    layer.compile(backend=backend)

    return GPTPipe


def build_pipeline_model(cfg: GPTConfig, seed: int, topology, stages: int):
    """This rank's stage of the GPT as a DeepSpeed PipelineModule (`GPTPipe`)."""
    cfg.validate(get_tensor_model_parallel_world_size())
    return _pipeline_module_class()(cfg, seed, topology, partition=stage_partition(cfg, stages))


__all__ = [
    "PatchPhase",
    "EmbeddingPipe",
    "BlockPipe",
    "HeadPipe",
    "build_pipeline_model",
    "gpt_parameter_name",
    "pipe_parameter_name",
    "layer_prefix",
    "layer_parameter_counts",
    "stage_partition",
]
