"""The config schema: one frozen dataclass per section, and RunConfig holding them all.

Each field's docstring is its user documentation (read once from this source into
FIELD_DOCS); IDENTITY names the fields whose change makes a different run (they enter
`RunConfig.config_hash`). Defaults live here and nowhere else.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from megapatch.config.yamlio import dump_scalar


@dataclass(frozen=True, kw_only=True)
class RunSection:
    IDENTITY: ClassVar = {"seed"}
    dir: str | None = None
    """Run directory (checkpoints, metrics, resolved config). null = runs/<run.name>."""
    seed: int = 1234
    """Seed of model initialisation and of every random stream of the run."""
    name: str | None = None
    """Run name for logs and wandb. null = the config file's name without .yaml."""


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    IDENTITY: ClassVar = {
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "seq_len",
        "rope_theta", "norm_eps", "tie_embeddings", "init_std", "make_vocab_size_divisible_by",
    }  # fmt: skip
    vocab_size: int | Literal["auto"] = "auto"
    """Vocabulary size, or "auto" to take it from the data manifest (the tokenizer)."""
    d_model: int
    """D: width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """H: attention heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide n_heads. null = n_heads."""
    ffn_hidden: int
    """Hidden width of the SwiGLU MLP."""
    seq_len: int
    """L: positions the transformer sees in both phases (L tokens, or L patches of K tokens)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer (the paper does not)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory (same numbers, slower)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP size (padding rows get no mass)."""


@dataclass(frozen=True, kw_only=True)
class ParallelSection:
    IDENTITY: ClassVar = set()
    tensor_model_parallel_size: int = 1
    """TP: tensor-parallel ranks; must divide n_heads and n_kv_heads."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages (DeepSpeed's pipeline engine, 1F1B schedule). Blocks are split so
    stages hold about equal parameters (the embedding on the first, the final norm, output
    layer and loss on the last); every stage must get at least one block. Ranks are laid
    out TP innermost, then DP, then PP: world size = TP x DP x PP. Needs zero_stage 0 or 1
    and untied embeddings."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage over the data-parallel group: 0, 1, 2, or 3 (with any TP size;
    0 or 1 with pipeline parallelism)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1 and model.seq_len divisible by TP): norms, residual adds and the patch embedding's output hold L/TP positions per rank; all-gather before the column-parallel layers, reduce-scatter after the row-parallel ones. Same losses, less activation memory."""
    nodes: int = 1
    """Nodes the job expects (with gpus_per_node: the world size the launcher must start)."""
    gpus_per_node: int | None = None
    """Devices per node the job expects; null = whatever the launcher starts. When set, a
    world size other than nodes x gpus_per_node is refused before training starts."""
    deepspeed: dict = field(default_factory=dict)
    """For experts: a mapping deep-merged into the generated DeepSpeed config (batch sizes
    come from the plan and may not be set here)."""


@dataclass(frozen=True, kw_only=True)
class DataSection:
    IDENTITY: ClassVar = {"path", "blend", "seed"}
    path: str | None = None
    """A `megapatch prep` output directory. Set this or blend."""
    blend: list | None = None
    """Instead of path: a list of {path, weight} prep outputs sampled in proportion to weight."""
    valid_path: str | None = None
    """Prep output whose valid split is used for validation. null = data.path (or the blend)."""
    num_workers: int = 2
    """Background loader workers per rank."""
    prefetch: int = 2
    """Micro-batches prepared ahead per worker."""
    seed: int | None = None
    """Seed of the window order. null = run.seed."""


@dataclass(frozen=True)
class PatchStage:
    """One patch stage of a run, resolved from `patch.stages` or the one-stage shorthand."""

    size: int  # K >= 2
    fraction: float  # share of the run's optimizer steps
    position_weights: tuple[float, ...] | None  # normalised [K]; None = uniform
    reset_optimizer: bool  # at the switch out of this stage
    rewarm: bool  # at the switch out of this stage


@dataclass(frozen=True, kw_only=True)
class PatchSection:
    IDENTITY: ClassVar = {"size", "fraction", "reset_optimizer", "rewarm"}
    # In the identity only when set away from the default: a run that leaves them alone
    # keeps the config hash (and the checkpoints) it had before they existed.
    IDENTITY_IF_SET: ClassVar = {"stages", "batching", "position_weights"}
    size: int = 4
    """K: tokens averaged into one patch. K=1 is ordinary next-token training. With
    patch.fraction, the one-stage shorthand of patch.stages."""
    fraction: float = 2 / 3
    """lambda in [0, 1): share of the budget's steps trained on patches (0.5, "2/3", ...)."""
    stages: list | None = None
    """Several patch stages before the token phase, in order: a list of {size: K,
    fraction: f} (K >= 2; f > 0 the share of the run's optimizer steps; the fractions sum
    to less than 1, the rest is token-level), e.g. [{size: 8, fraction: 0.25}, {size: 4,
    fraction: 0.25}]. A stage may also set position_weights, and reset_optimizer / rewarm
    for the switch at its end. null = the shorthand patch.size + patch.fraction; giving
    both forms is an error (unless patch.stages is a command-line override of a file's
    shorthand). Phases are named patch1, patch2, ... then token (one stage: patch)."""
    batching: Literal["tokens", "sequences"] = "tokens"
    """tokens: every step reads train.tokens_per_step tokens (the paper), so a K-stage step
    takes K times fewer sequences and costs about 1/K of a token step; train.total_tokens
    is a budget of tokens. sequences: every step has the token phase's sequences and
    positions (Token Superposition Training), so a K-stage step reads K times the tokens at
    the same FLOPs; train.total_tokens is then a compute budget in token-step equivalents
    (steps x tokens_per_step) and a stage's fraction is its share of the compute."""
    position_weights: str | list = "uniform"
    """Weights of the K targets of a patch: uniform (the paper), or a list of K
    non-negative numbers, not all zero (normalised; e.g. a power law [1, 0.5, 0.33,
    0.25]). Applies to every stage; a stage's own position_weights wins. Uniform is the
    loss exactly as without weights."""
    reset_optimizer: bool = True
    """Reset Adam's state (moments and step count) at every switch: patch -> patch and
    patch -> token (the paper does, at its one switch). A stage's own key overrides it for
    the switch at that stage's end."""
    rewarm: bool = True
    """Start a new LR curve (warmup, then decay to min_lr) at every switch (the paper
    does); false = the curve runs on across the switch (false everywhere: one curve over
    the whole run). A stage's own key overrides it for the switch at that stage's end."""

    def resolved_stages(self) -> tuple[PatchStage, ...]:
        """The patch stages in order (empty for token-only), with every default applied.
        Assumes a validated section (config.validation checks these keys)."""
        entries = self.stages
        if entries is None:
            entries = [{"size": self.size, "fraction": self.fraction}]
            if self.size < 2 or self.fraction <= 0:
                entries = []
        out = []
        for entry in entries:
            weights = entry.get("position_weights", self.position_weights)
            out.append(
                PatchStage(
                    size=int(entry["size"]),
                    fraction=float(entry["fraction"]),
                    position_weights=normalised_weights(weights),
                    reset_optimizer=bool(entry.get("reset_optimizer", self.reset_optimizer)),
                    rewarm=bool(entry.get("rewarm", self.rewarm)),
                )
            )
        return tuple(out)


def normalised_weights(weights: str | list) -> tuple[float, ...] | None:
    """None for uniform weights (given as "uniform" or all equal), else the weights / sum."""
    if isinstance(weights, str) or len(set(weights)) == 1:
        return None  # all equal is the uniform loss: keep its exact, unweighted path
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    IDENTITY: ClassVar = {"total_tokens", "tokens_per_step"}
    total_tokens: int
    """Token budget of both phases together; rounded down to whole optimizer steps."""
    tokens_per_step: int
    """Tokens per optimizer step, equal in both phases: a multiple of seq_len x patch.size."""
    micro_batch_size: int = 4
    """Sequences per data-parallel rank per micro-step in the token phase."""
    lr: float = 3e-4
    """Peak learning rate of each phase."""
    min_lr: float = 3e-5
    """Learning-rate floor, reached at the last step of each phase's decay."""
    warmup_steps: int | str = 2000
    """Linear warmup steps at the start of each phase, or a percentage of each phase's steps ("5%"); must be fewer than the steps of every phase."""
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision: fp32, bf16 or fp16."""
    resume: str = "auto"
    """"auto": continue from the run directory's latest checkpoint if there is one; "none":
    start fresh and refuse a run directory that has checkpoints; or a checkpoint path."""
    max_nonfinite_steps: int = 5
    """Consecutive non-finite losses (each step skipped) before the run stops."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke tests); the plan itself is unchanged."""
    collective_timeout_s: float = 600.0
    """Seconds any collective (gloo/NCCL, DeepSpeed's own included) waits for the other
    ranks: a rank that died or hangs stops the run after this long. Keep it above the
    longest legitimate wait (a checkpoint write). The environment variable
    MEGAPATCH_COLLECTIVE_TIMEOUT_S, when set, wins over this key (job scripts of cluster
    admins set it)."""
    compile: bool = False
    """torch.compile each transformer block: fuses the norms, rotary embedding and SwiGLU
    (elementwise work that otherwise costs a fifth of a GPU step); the math is unchanged."""
    ops_backend: Literal["auto", "reference", "torch", "triton"] = "auto"
    """Patch embedding and loss kernels: auto (triton on CUDA, else torch), reference,
    torch or triton."""


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    IDENTITY: ClassVar = set()
    interval: int = 1000
    """Save every N optimizer steps; 0 = only at the switch and at the end."""
    keep_last: int | None = 3
    """Keep the newest N checkpoints; null = keep all."""
    at_switch: bool = True
    """Save at the end of every patch stage, right before its switch."""
    max_failed_saves: int | None = 3
    """Periodic saves that may fail in a row (disk full, read-only) while training goes on;
    one more stops the run with its last good checkpoint. A good save resets the count;
    0 = stop at the first failure; null = never stop for this."""
    dir: str | None = None
    """Checkpoint directory. null = <run.dir>/checkpoints."""


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    IDENTITY: ClassVar = set()
    interval: int = 1000
    """Token-level validation loss every N steps; 0 = not during training."""
    max_windows: int | None = None
    """Cap on validation windows per evaluation; null = all."""
    at_end: bool = True
    """Evaluate after the last step."""


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    IDENTITY: ClassVar = set()
    interval: int = 10
    """Log metrics every N optimizer steps."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb: offline, online or disabled."""
    wandb_project: str = "megapatch"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass(frozen=True, kw_only=True)
class InitSection:
    IDENTITY: ClassVar = {"from_hf"}
    from_hf: str | None = None
    """Initialise the weights from a Hugging Face Llama directory; null = random init."""


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "parallel": ParallelSection,
    "data": DataSection,
    "patch": PatchSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "logging": LoggingSection,
    "init": InitSection,
}


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings under each field of a section class (empty if the source is gone)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


FIELD_DOCS: dict[str, str] = {
    f"{name}.{key}": doc for name, cls in SECTIONS.items() for key, doc in _field_docs(cls).items()
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    run: RunSection
    model: ModelSection
    parallel: ParallelSection
    data: DataSection
    patch: PatchSection
    train: TrainSection
    checkpoint: CheckpointSection
    eval: EvalSection
    logging: LoggingSection
    init: InitSection
    # Where the values came from: the top-level file and, per dotted key, the file or
    # override that set it (for error messages only; not part of the config).
    source: str = field(default="<config>", compare=False, repr=False)
    provenance: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {field: value}} of every resolved value (JSON/YAML-able)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def identity(self) -> dict[str, Any]:
        """The values that define the run (model shape, data, patch, budget, seeds)."""
        out = {}
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            for f in fields(cls):
                optional = f.name in getattr(cls, "IDENTITY_IF_SET", ())
                if optional and getattr(section, f.name) == f.default:
                    continue
                if f.name in cls.IDENTITY or optional:
                    out[f"{name}.{f.name}"] = _normalise_identity_value(
                        f"{name}.{f.name}", getattr(section, f.name)
                    )
        return out

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of `identity()`: equal configs give equal hashes in
        any process; logging, checkpoint, eval and parallel settings do not count."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def identity_diff(self, other: RunConfig) -> list[str]:
        """Human-readable 'key: a -> b' lines where the identities of two configs differ."""
        mine, theirs = self.identity(), other.identity()
        return [
            f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}"
            for k in mine
            if mine.get(k) != theirs.get(k)
        ]

    def render_yaml(self, with_docs: bool = True) -> str:
        """The resolved config as YAML, each key preceded by its documentation."""
        lines = [
            f"# megapatch resolved config (from {self.source}); config hash {self.config_hash()}"
        ]
        for name, cls in SECTIONS.items():
            lines.append(f"{name}:")
            section = getattr(self, name)
            for f in fields(cls):
                if with_docs and f"{name}.{f.name}" in FIELD_DOCS:
                    lines.append(f"  # {FIELD_DOCS[f'{name}.{f.name}']}")
                lines.append(f"  {f.name}: {dump_scalar(getattr(section, f.name))}")
        return "\n".join(lines) + "\n"

    def save_resolved(self, run_dir: str | os.PathLike) -> Path:
        """Write run_dir/config.yaml atomically (a failure leaves any existing file intact)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / "config.yaml"
        fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml.tmp", dir=run_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.render_yaml())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # Convenience views the engine needs.
    @property
    def train_data(self) -> str | list[dict]:
        """The `open_corpus` spec of the training data: a path or a blend list."""
        return self.data.path if self.data.path is not None else [dict(e) for e in self.data.blend]

    @property
    def valid_data(self) -> str | list[dict]:
        """The `open_corpus` spec of the validation data (use with split="valid")."""
        return self.data.valid_path if self.data.valid_path is not None else self.train_data


def _normalise_identity_value(key: str, value: Any) -> Any:
    # The same data named as "data/x" or "./data/x/" is the same run.
    if key == "data.path" and value is not None:
        return os.path.normpath(value)
    if key == "data.blend" and value is not None:
        return [{"path": os.path.normpath(e["path"]), "weight": e["weight"]} for e in value]
    return value
