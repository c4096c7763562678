"""Per-GPU memory of a training layout, estimated from the model's dimensions. Pure Python.

`estimate_memory(dims, layout)` is a function of the model (ModelDims: D, layers, heads,
KV heads, FFN, padded V) and a `Layout` (TP, PP, DP, ZeRO stage, precision, micro-batch,
micro-batches per step, L, K, sequence parallelism, activation checkpointing, ops
backend). It returns bytes per term for one GPU: the DP rank and pipeline stage that hold
the most; `estimate_stages` gives every pipeline stage's.

Model state is what DeepSpeed 0.19 allocates with torch's AdamW (engine.py's config),
counted tensor by tensor (tests/training/test_memory.py checks it to the byte against a
real engine on CPU). N is this rank's parameter count, a the bytes of the model dtype
(2 for bf16/fp16, 4 for fp32), groups the two weight-decay groups (matrices, vectors):

    ZeRO-0 fp32        torch AdamW on the module: params 4N, grads 4N, Adam 8N + a 4-byte
                       step tensor per parameter; no master copy.
    ZeRO-0 bf16/fp16   DeepSpeed's FP16_UnfusedOptimizer: params aN, grads aN, fp32 master
                       copies 4N (plus their fp32 grads 4N during the step), Adam 8N.
    ZeRO-1/2           every group flattened in the model dtype, padded to a multiple of
                       2*DP: params a*A; master and Adam partitioned, 4*A/DP and 8*A/DP,
                       in fp32 even for fp32 runs (the master is then a second fp32 copy);
                       after backward the gradients of the parameters overlapping this
                       rank's partition (whole parameters, model dtype) and of the
                       padding in it. Stages 1 and 2 hold the same tensors here
                       (contiguous_gradients).
    ZeRO-3             each parameter split into ceil(n/DP) per rank: params, master, Adam
                       and a flat gradient partition all partitioned; parameters of at most
                       stage3_param_persistence_threshold elements (norms) also stay whole
                       on every rank; a reduce bucket of reduce_bucket_size elements lives
                       for the whole run.

Activations are what autograd saves in one micro-batch's forward for backward, per layer
and position (bytes; t = TP, a as above, Dq = H*hd = D, Dkv = Hkv*hd):

    2 RMSNorms         2 * (4*D + 2*a*D + 4)   fp32 copy of the input (pow and the scale
                                               read it; in fp32 the input itself), the
                                               normalised x before the gain, the output
                                               (the projections read it), fp32 rsqrt
    attention          a*(2*Dq + 2*Dkv) / t    q and k after RoPE, v, the attention output
                                               (flash/efficient kernels keep no L x L
                                               matrix; RoPE multiplies by constant tables
                                               and saves only those)
                       + 4*H / t               fp32 logsumexp per head
    SwiGLU MLP         4*a*F / t               gate, up, silu(gate), silu(gate)*up
    residual adds, o_proj, down_proj: nothing (an add saves no input; no dropout, no biases)

With sequence parallelism the norms' tensors are split over the sequence (divided by t)
and the column-parallel layers save their sharded input (Megatron's scheme), so every
term is divided by t. With activation checkpointing each block keeps only its input
(a*D, /t under SP) and backward recomputes one block at a time (its full activations,
once). Per sequence, outside the blocks: the int64 ids and targets of K*L tokens, the
final norm, RoPE's cos/sin tables (fp32 and cast copies).

Loss, per micro-batch (N = micro-batch * L rows, Vs = V/t rows of the head):
`reference` keeps two fp32 [N, Vs] tensors (the logits, their exp) and builds a third in
backward; `torch` holds one fp32 chunk of at most 2^23 logits; `triton` materialises none.
All backends hold fp32 gradients of the hidden states and the head (4*(N*D + Vs*D)) from
the loss to its backward, and `reference`/`torch` a fp32 copy of a 16-bit head.

During the optimizer step DeepSpeed also holds fp32 gradients for the masters (ZeRO-0
16-bit: all of them, 4N; ZeRO-1/2: the group being stepped, 4*A_g/DP, beside the
backward's gradients; checked to the byte; ZeRO-3: one group's partition, an upper bound).
Transient buffers, not checked to the byte: ZeRO-1/2's reduce bucket during backward
(reduce_bucket_size elements of the model dtype; two with overlap_comm, as on CUDA) and
ZeRO-3's gathered parameters (the module computing, whole, and up to the prefetch bucket
of the next).

Pipeline parallelism (P stages, DeepSpeed's PipelineEngine, 1F1B over m micro-batches per
step): stage s holds the layers of DeepSpeed's parameter-balanced split of [embedding,
block 0 .. n-1, head] (`pipeline_stage_bounds`, the same split megapatch.model.pipeline
makes) and keeps up to min(P - s, m) micro-batches in flight. Its model state differs
from the flat engine's (checked to the byte on CPU):

    ZeRO-1             gradients are reduced only in the step's last micro-batch: the
                       stage's accumulate whole (a*N) until then, with the reduce
                       bucket at the end; the partition's (as above) are what is left
                       at the optimizer step.
    ZeRO-0 bf16        DeepSpeed's BF16_Optimizer: flat groups padded to 2*DP as in ZeRO-1,
                       fp32 master and Adam partitioned over DP, a flat gradient
                       accumulator in the model dtype (a*A) for the whole run, the per-
                       parameter gradients a*N, and at the step every group's fp32
                       partition gradient (4*A/DP).
    ZeRO-0 fp32/fp16   as without a pipeline.

Stage-boundary buffers (`pipeline_buffer_bytes`; E = micro-batch * L * D / t elements
when t > 1, the 1/TP slice DeepSpeed sends, or the L/TP positions under SP): one receive
buffer, shared with the gradient receive buffer (a*E); per micro-batch in flight, the
received input (whole: a*micro-batch*L*D, or a*E under SP) on stages after the first and
the sent output (a*E) on stages before the last; max(2, in flight) buffers of input ids on
the first stage and of labels and head outputs on the last, which stay after the step.

The peak is model state and gradients plus the larger of the step's fp32 gradients and
the backward's working set: reduce buckets, the activations of the micro-batches in
flight (one without PP; up to min(P - s, m) on stage s under 1F1B), the stage-boundary
buffers and the loss. Allocator fragmentation and the CUDA context (~0.5-1 GiB) are not
included.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from megapatch.errors import ConfigError
from megapatch.flops import ModelDims, pipeline_layer_parameters

__all__ = [
    "Layout",
    "ZeroOptions",
    "MemoryEstimate",
    "estimate_memory",
    "estimate_stages",
    "parameter_groups",
    "pipeline_layer_parameters",
    "pipeline_stage_bounds",
    "pipeline_buffer_bytes",
    "stage_layers",
    "model_state_bytes",
    "activation_bytes",
    "loss_bytes",
    "parse_size",
    "format_gib",
]

BACKENDS = ("reference", "torch", "triton")
# megapatch.ops.chunked.LOGITS_PER_CHUNK: fp32 logits alive per chunk (not imported: torch).
LOGITS_PER_CHUNK = 1 << 23
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE: elements per flattened all-reduce.
_ALLREDUCE_CHUNK = 500_000_000


@dataclass(frozen=True)
class ZeroOptions:
    """DeepSpeed's defaults for the ZeRO knobs that size buffers (its config keys)."""

    reduce_bucket_size: int = 500_000_000
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size
    overlap_comm: bool = True  # ZeRO-1/2: engine.py turns it on on CUDA (two reduce buckets)

    @classmethod
    def from_deepspeed(cls, overrides: dict | None) -> ZeroOptions:
        """The options a DeepSpeed config override (parallel.deepspeed) sets."""
        zero = (overrides or {}).get("zero_optimization") or {}
        return cls(
            reduce_bucket_size=int(zero.get("reduce_bucket_size", cls.reduce_bucket_size)),
            param_persistence_threshold=int(
                zero.get("stage3_param_persistence_threshold", cls.param_persistence_threshold)
            ),
            prefetch_bucket_size=int(
                zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket_size)
            ),
            overlap_comm=bool(zero.get("overlap_comm", cls.overlap_comm)),
        )


@dataclass(frozen=True)
class Layout:
    """How a model is trained: parallel sizes, precision and the batch shape of a phase."""

    micro_batch: int
    seq_len: int  # L
    patch_size: int = 1  # K
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    precision: str = "bf16"
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    backend: str = "triton"  # what "auto" resolves to on CUDA
    zero: ZeroOptions = field(default_factory=ZeroOptions)
    micro_batches: int = 1  # m: micro-batches per optimizer step (the phase's grad_accum)
    # The pipeline's layer boundaries [0, b1, ..., n_layers + 2] over [embedding, blocks,
    # head]; None: pipeline_stage_bounds(dims, pp) (the split of dims' own vocabulary).
    stage_bounds: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.precision not in _DTYPE_BYTES:
            raise ConfigError(f"precision {self.precision!r}: expected fp32, bf16 or fp16")
        if self.backend not in BACKENDS:
            raise ConfigError(f"ops backend {self.backend!r}: expected one of {BACKENDS}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage {self.zero_stage}: expected 0, 1, 2 or 3")
        for name in ("micro_batch", "seq_len", "patch_size", "tp", "pp", "dp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"ZeRO stage {self.zero_stage} with pipeline size {self.pp}: expected 0 or 1 "
                "(DeepSpeed's pipeline engine shards no gradients or weights)"
            )
        if self.stage_bounds is not None and len(self.stage_bounds) != self.pp + 1:
            raise ConfigError(
                f"stage_bounds {self.stage_bounds}: expected {self.pp + 1} boundaries for "
                f"pipeline size {self.pp}"
            )

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.precision]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU. `params`, `master`, `adam` and `gradients` are exact for the
    DeepSpeed version documented above; the rest are estimates."""

    params: int  # weights in the model dtype (ZeRO-3: partition + persistent whole ones)
    master: int  # fp32 master copies
    adam: int  # moments, step counters, DeepSpeed's norm scalars
    gradients: int  # held at the end of backward (ZeRO-3: the flat partition)
    zero3_bucket: int  # ZeRO-3's reduce bucket, allocated once
    step_buffers: int  # transient fp32 gradients during the optimizer step
    comm_buffers: int  # transient: ZeRO-1/2 reduce bucket, ZeRO-3 gathered parameters
    activations: int  # saved for backward, all micro-batches in flight
    logits: int  # the loss's [N, V] logits (or chunk of them)
    loss_buffers: int  # fp32 gradients of hidden and head, fp32 head copy
    stage: int = 0  # pipeline stage
    dp_rank: int = 0
    # Pipelines only (0 / equal to `gradients` without one):
    grad_buffer: int = 0  # a flat gradient accumulator kept all run (BF16_Optimizer's)
    step_gradients: int | None = None  # held at the optimizer step (default: `gradients`)
    pipe_buffers: int = 0  # stage-boundary buffers at the 1F1B peak
    pipe_persistent: int = 0  # the part of pipe_buffers that stays through the step
    layers: tuple[int, int] = (0, 0)  # the stage's pipeline layers [start, stop)
    in_flight: int = 1  # micro-batches whose activations the stage holds at once

    def __post_init__(self):
        if self.step_gradients is None:
            object.__setattr__(self, "step_gradients", self.gradients)

    @property
    def optimizer(self) -> int:
        return self.master + self.adam

    @property
    def buffers(self) -> int:
        """Held during backward besides activations and logits."""
        return self.zero3_bucket + self.comm_buffers + self.loss_buffers

    @property
    def backward(self) -> int:
        """Held at the backward's peak besides params, optimizer and grad_buffer."""
        return self.gradients + self.buffers + self.activations + self.logits + self.pipe_buffers

    @property
    def step(self) -> int:
        """Held during the optimizer step besides params, optimizer and grad_buffer."""
        return self.step_gradients + self.zero3_bucket + self.step_buffers + self.pipe_persistent

    @property
    def total(self) -> int:
        """Peak estimate: model state, plus the larger of the backward's working set
        (gradients, activations, loss, reduce buckets, stage-boundary buffers) and the
        step's (its gradients and fp32 gradients)."""
        return self.params + self.optimizer + self.grad_buffer + max(self.backward, self.step)

    def as_dict(self) -> dict[str, int]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(optimizer=self.optimizer, buffers=self.buffers, total=self.total)
        return out


def pipeline_stage_bounds(layer_parameters: list[int], stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., len(layers)] exactly as DeepSpeed's
    `partition_balanced` draws them (the split megapatch.parallel.partition_layers asks
    it for), in pure Python so that the plan needs no torch: the linear-partition dynamic
    programme over contiguous parts that keeps, for the first i layers in j parts, the
    split with the smallest (largest part - smallest part), the last such split point
    winning a tie."""
    n = len(layer_parameters)
    if n <= stages:
        return [min(p, n) for p in range(stages + 1)]
    prefix = [0]
    for w in layer_parameters:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    # state[j][i] = (cost, largest part, smallest part, split point) of i layers in j parts
    state = [[(inf, inf, inf, 0)] * (n + 1) for _ in range(stages + 1)]
    state[0][0] = (0, 0, inf, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, stages) + 1):
            best = state[j][i]
            for k in range(i):
                _, hi, lo, _ = state[j - 1][k]
                part = prefix[i] - prefix[k]
                hi, lo = max(hi, part), min(lo, part)
                if hi - lo <= best[0]:
                    best = (hi - lo, hi, lo, k)
            state[j][i] = best
    bounds = [n]
    for j in range(stages, 0, -1):
        bounds.append(state[j][bounds[-1]][3])
    return bounds[::-1]


def _stage_bounds(dims: ModelDims, layout: Layout) -> tuple[int, ...]:
    if layout.stage_bounds is not None:
        bounds = tuple(layout.stage_bounds)
    else:
        bounds = tuple(pipeline_stage_bounds(pipeline_layer_parameters(dims), layout.pp))
    if bounds[0] != 0 or bounds[-1] != dims.n_layers + 2 or list(bounds) != sorted(bounds):
        raise ConfigError(
            f"stage_bounds {bounds}: expected 0 ... {dims.n_layers + 2} in order "
            "(embedding, blocks, head)"
        )
    for stage, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        if max(start, 1) >= min(stop, dims.n_layers + 1):
            raise ConfigError(
                f"pipeline size {layout.pp}: split by parameters, stage {stage} of the "
                f"{dims.n_layers} blocks and the embedding and output layers holds no block "
                "(use fewer stages)"
            )
    return bounds


def stage_layers(start: int, stop: int, n_layers: int) -> str:
    """Pipeline layers [start, stop) in words: 'embed + blocks 0-11', 'blocks 12-23 + head'."""
    words = ["embed"] if start == 0 else []
    first, last = max(start, 1) - 1, min(stop, n_layers + 1) - 2
    if first <= last:
        words.append(f"block {first}" if first == last else f"blocks {first}-{last}")
    if stop == n_layers + 2:
        words.append("head")
    return " + ".join(words)


def parameter_groups(
    dims: ModelDims, tp: int = 1, pp: int = 1, stage: int = 0, bounds=None
) -> tuple[list[int], list[int]]:
    """This TP rank's parameter sizes on pipeline `stage`, in the module's order, split into
    the optimizer's two groups (engine.param_groups): ([matrix numels], [vector numels]).
    `bounds`: the pipeline's layer boundaries (default: pipeline_stage_bounds of dims)."""
    D, F, V = dims.d_model, dims.ffn_hidden, dims.vocab_size
    q, kv = D, dims.kv_dim
    if pp == 1:
        bounds = (0, dims.n_layers + 2)
    elif bounds is None:
        bounds = pipeline_stage_bounds(pipeline_layer_parameters(dims), pp)
    start, stop = bounds[stage], bounds[stage + 1]
    matrices, vectors = [], []
    if start == 0:
        matrices.append(V // tp * D)  # embed_tokens
    for _ in range(max(start, 1), min(stop, dims.n_layers + 1)):
        vectors.append(D)  # input_layernorm
        matrices += [q // tp * D, kv // tp * D, kv // tp * D, D * q // tp]  # q, k, v, o
        vectors.append(D)  # post_attention_layernorm
        matrices += [F // tp * D, F // tp * D, D * F // tp]  # gate, up, down
    if stop == dims.n_layers + 2:
        vectors.append(D)  # final norm
        if not dims.tie_embeddings:
            matrices.append(V // tp * D)  # lm_head
    return matrices, vectors


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _partition_gradients(sizes: list[int], partition: int, rank: int) -> int:
    """Gradient elements ZeRO-1/2 holds after backward for rank's slice of a flat group:
    the whole parameters overlapping it (copied into one buffer, `grads_in_partition`) and
    a zero tensor for the alignment padding that falls in the slice."""
    lo, hi, start, total = rank * partition, (rank + 1) * partition, 0, 0
    for n in sizes:
        if start < hi and start + n > lo:
            total += n
        start += n
    return total + max(0, hi - max(lo, start))


def model_state_bytes(
    groups, layout: Layout, dp_rank: int = 0, largest_module: int = 0
) -> dict[str, int]:
    """params, master, adam, gradients, zero3_bucket, step_buffers and comm_buffers of one
    rank holding the parameter `groups` (lists of numels), per the table in the module doc,
    and under a pipeline grad_buffer or step_gradients where they differ from 0 and
    gradients; `largest_module`: the elements ZeRO-3 gathers at once (a block's matrices)."""
    a, dp, opts = layout.dtype_bytes, layout.dp, layout.zero
    groups = [g for g in groups if g]
    n = sum(sum(g) for g in groups)
    tensors = sum(len(g) for g in groups)
    out = dict(
        params=0, master=0, adam=0, gradients=0, zero3_bucket=0, step_buffers=0, comm_buffers=0
    )
    if layout.pp > 1 and layout.zero_stage == 0 and layout.precision == "bf16":
        # DeepSpeed picks its BF16_Optimizer for pipelines: ZeRO-1's flat groups and
        # partitions, plus a flat gradient accumulator in the model dtype.
        aligned = [_ceil_to(sum(g), 2 * dp) for g in groups]
        parts = [x // dp for x in aligned]
        chunks, chunk = [], 0  # its DP all-reduce flattens groups up to 5e8 elements at once
        for x in aligned:
            chunk += x
            if chunk > _ALLREDUCE_CHUNK:
                chunks, chunk = [*chunks, chunk], 0
        out.update(
            params=a * sum(aligned),
            master=4 * sum(parts),
            adam=8 * sum(parts) + 4 * len(groups) + 4,  # + the fp32 global grad norm
            gradients=a * n,  # the parameters' own, cleared after each micro-batch
            grad_buffer=a * sum(aligned),
            step_buffers=4 * sum(parts),  # every group's fp32 partition gradient at once
            comm_buffers=a * max([*chunks, chunk]),
        )
        return out
    if layout.zero_stage == 0:
        out.update(params=a * n, gradients=a * n, adam=8 * n + 4 * tensors)
        if a != 4:
            out.update(master=4 * n, step_buffers=4 * n)
        return out
    if layout.zero_stage in (1, 2):
        aligned = [_ceil_to(sum(g), 2 * dp) for g in groups]
        parts = [s // dp for s in aligned]
        out.update(
            params=a * sum(aligned),
            master=4 * sum(parts),
            adam=8 * sum(parts) + 4 * len(groups) + 4,  # + the fp32 global grad norm
            gradients=a * sum(_partition_gradients(g, p, dp_rank) for g, p in zip(groups, parts)),
            # the fp32 gradient of the group being stepped (flattened, cast), while the
            # backward's gradients are still held
            step_buffers=4 * max(parts),
            comm_buffers=a * opts.reduce_bucket_size * (2 if opts.overlap_comm else 1),
        )
        if layout.pp > 1:
            # The pipeline engine reduces only at the step's end: every micro-batch's
            # gradients accumulate whole until then; the partition's are left at the step.
            out.update(gradients=a * n, step_gradients=out["gradients"])
        return out
    parts = [sum(-(-x // dp) for x in g) for g in groups]
    persistent = sum(x for g in groups for x in g if x <= opts.param_persistence_threshold)
    out.update(
        params=a * (sum(parts) + persistent),
        master=4 * sum(parts),
        adam=8 * sum(parts) + 4 * len(groups) + 8 + 1,  # + fp64 grad norm, bool overflow flag
        gradients=a * sum(parts),
        zero3_bucket=a * opts.reduce_bucket_size,
        step_buffers=4 * max(parts),
        # the module computing, whole, and what is prefetched for the next one
        comm_buffers=a * (largest_module + min(largest_module, opts.prefetch_bucket_size)),
    )
    return out


def activation_bytes(dims: ModelDims, layout: Layout, layers: int | None = None) -> dict[str, int]:
    """Bytes autograd saves for one micro-batch in `layers` blocks (default all), by term,
    per the per-layer formula in the module docstring."""
    a, t = layout.dtype_bytes, layout.tp
    D, F, H = dims.d_model, dims.ffn_hidden, dims.n_heads
    hd, kv = D // H, dims.kv_dim
    positions = layout.micro_batch * layout.seq_len  # b*L
    sp = t if layout.sequence_parallel else 1
    layers = dims.n_layers if layers is None else layers

    norms = 2 * ((4 + 2 * a) * D + 4) // sp
    attention = (a * (2 * D + 2 * kv) + 4 * H) // t
    mlp = 4 * a * F // t
    per_layer = positions * (norms + attention + mlp)
    block_input = positions * a * D // sp
    if layout.activation_checkpointing:
        blocks = layers * block_input + per_layer  # + the block being recomputed
    else:
        blocks = layers * per_layer
    tokens = layout.micro_batch * layout.seq_len * layout.patch_size
    # cos/sin [L, hd] in fp32, and per block the copies cast for q and k
    rope = 2 * 4 * layout.seq_len * hd + (layers * 4 * a * layout.seq_len * hd if a != 4 else 0)
    return {
        "per_layer": per_layer,
        "blocks": blocks,
        "final_norm": positions * ((4 + 2 * a) * D + 4) // sp,
        "ids": 2 * 8 * tokens,  # int64 inputs (embedding) and targets (loss)
        "rope": rope,
    }


def loss_bytes(dims: ModelDims, layout: Layout) -> dict[str, int]:
    """The loss of one micro-batch: its logits and its fp32 buffers (module docstring)."""
    n = layout.micro_batch * layout.seq_len
    vs, D, a = dims.vocab_size // layout.tp, dims.d_model, layout.dtype_bytes
    grads = 4 * (n * D + vs * D)
    head_copy = 4 * vs * D if a != 4 and layout.backend != "triton" else 0
    if layout.backend == "reference":
        logits = 3 * 4 * n * vs
    elif layout.backend == "torch":
        logits = 4 * vs * max(1, min(n, LOGITS_PER_CHUNK // vs))
    else:
        logits = 0
    return {"logits": logits, "loss_buffers": grads + head_copy}


def pipeline_buffer_bytes(dims: ModelDims, layout: Layout, stage: int) -> dict[str, int]:
    """Stage `stage`'s buffers at the pipeline's boundaries (module docstring), bytes:
    {"peak": held at the 1F1B peak beyond the activations, "persistent": kept through the
    optimizer step (DeepSpeed's receive buffer, the first stage's ids, the last stage's
    labels and outputs)}. Zero without a pipeline."""
    p, s = layout.pp, stage
    if p == 1:
        return {"peak": 0, "persistent": 0}
    a, t, b, L, K = (
        layout.dtype_bytes,
        layout.tp,
        layout.micro_batch,
        layout.seq_len,
        layout.patch_size,
    )
    whole = b * L * dims.d_model
    # What crosses a boundary: 1/TP slices (DeepSpeed's pipe partitioning) or, under SP,
    # each rank's L/TP positions; the receiver rebuilds the whole tensor unless SP.
    sent = whole // t
    received = sent if layout.sequence_parallel else whole
    in_flight = min(p - s, layout.micro_batches)
    slots = max(2, in_flight)  # DeepSpeed's TrainSchedule.num_pipe_buffers
    persistent = a * sent  # one receive buffer, shared with the gradient receive buffer
    peak = persistent
    if s > 0:
        peak += in_flight * a * received  # held until its gradient is sent back
    if s < p - 1:
        peak += in_flight * a * sent  # the output, held for the backward
    if s == 0:
        ids = slots * 8 * b * K * L  # the loaded input ids (the embedding saves a copy)
        persistent += ids
        peak += ids
    if s == p - 1:
        # labels (views of the [b, K*L + K] window) and the head's [b, L, D] outputs; the
        # current micro-batch's are counted as the loss's inputs in the activations
        kept = 8 * b * K * (L + 1) + a * whole
        persistent += slots * kept
        peak += (slots - 1) * kept
    return {"peak": peak, "persistent": persistent}


def _stage_activations(dims: ModelDims, layout: Layout, stage: int, bounds) -> tuple[int, int]:
    """(activations, in-flight micro-batches) of pipeline `stage` at its 1F1B peak."""
    p, n = layout.pp, dims.n_layers
    start, stop = bounds[stage], bounds[stage + 1]
    blocks = max(0, min(stop, n + 1) - max(start, 1))
    acts = activation_bytes(dims, layout, layers=blocks)
    in_flight = 1 if p == 1 else min(p - stage, layout.micro_batches)
    if layout.activation_checkpointing and blocks:
        # block inputs for every micro-batch in flight, one block recomputed at a time
        recompute = acts["per_layer"]
        activations = in_flight * (acts["blocks"] - recompute) + recompute
    else:
        activations = in_flight * acts["blocks"]
    # RoPE tables: one set without a pipeline, each pipeline block makes its own
    rope = acts["rope"] if p == 1 else blocks * activation_bytes(dims, layout, layers=1)["rope"]
    activations += in_flight * rope
    if start == 0:
        activations += in_flight * acts["ids"] // 2  # the input ids, saved by the embedding
    if stop == n + 2:
        activations += acts["final_norm"] + acts["ids"] // 2  # targets, saved by the loss
    return activations, in_flight


def estimate_stages(dims: ModelDims, layout: Layout) -> list[MemoryEstimate]:
    """The per-GPU estimate of each pipeline stage (one without a pipeline), each for the
    DP rank of that stage with the largest total."""
    bounds = _stage_bounds(dims, layout) if layout.pp > 1 else (0, dims.n_layers + 2)
    t, D = layout.tp, dims.d_model
    block = 2 * (D // t * D) + 2 * (dims.kv_dim // t * D) + 3 * (dims.ffn_hidden // t * D)
    largest = max(block, dims.vocab_size // t * D)  # a block's matrices, or a vocab matrix
    stages = []
    for stage in range(layout.pp):
        activations, in_flight = _stage_activations(dims, layout, stage, bounds)
        loss = {"logits": 0, "loss_buffers": 0}
        if stage == layout.pp - 1:
            loss = loss_bytes(dims, layout)
        pipe = pipeline_buffer_bytes(dims, layout, stage)
        groups = parameter_groups(dims, layout.tp, layout.pp, stage, bounds)
        # Ranks differ only by where ZeRO-1/2 partition boundaries cut parameters.
        ranks = range(layout.dp) if layout.zero_stage in (1, 2) else (0,)
        best = None
        for rank in ranks:
            state = model_state_bytes(groups, layout, rank, largest)
            est = MemoryEstimate(
                **state,
                activations=activations,
                **loss,
                stage=stage,
                dp_rank=rank,
                pipe_buffers=pipe["peak"],
                pipe_persistent=pipe["persistent"],
                layers=(bounds[stage], bounds[stage + 1]),
                in_flight=in_flight,
            )
            if best is None or est.total > best.total:
                best = est
        stages.append(best)
    return stages


def estimate_memory(dims: ModelDims, layout: Layout) -> MemoryEstimate:
    """The per-GPU estimate of the stage and DP rank with the largest total."""
    return max(estimate_stages(dims, layout), key=lambda est: est.total)


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """'80GiB', '141 GB', '96e9B' -> bytes; one-line ConfigError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]+)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or not math.isfinite(float(m.group(1))):
        raise ConfigError(
            f"{what} {text!r}: expected a size with a unit, e.g. 80GiB or 141GB "
            f"(units: {', '.join(u.upper().replace('I', 'i') for u in _UNITS)})"
        )
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConfigError(f"{what} {text!r}: expected a positive size")
    return size


def format_gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
