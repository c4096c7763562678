"""Hugging Face Llama checkpoints: export a megapatch checkpoint, and start a run from one.

    export_hf(read_checkpoint("runs/tiny"), "hf/tiny")   # LlamaForCausalLM directory
    load_hf_into_model(model, "hf/tiny")                  # any TP size: this rank's shards

megapatch's GPT follows LlamaForCausalLM's conventions exactly (parameter names without
the `model.` prefix, half-split RoPE, RMSNorm, SwiGLU, no biases), so conversion is a
renaming, with no permutation. An export holds config.json, model.safetensors (or shards
with model.safetensors.index.json), the run's tokenizer in its own form (a sentencepiece
tokenizer.model with a tokenizer_config.json for `AutoTokenizer`: no BOS is added,
megapatch trains without one and documents end with EOS; or the tokenizer.json and its
config files as prep read them), and megapatch.json naming the source checkpoint. Writing needs
`safetensors` (and `huggingface_hub` to shard); reading the export back needs neither
transformers nor a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from megapatch.checkpoint.full_weights import LoadedCheckpoint, load_full_state_dict
from megapatch.errors import CheckpointError, ConfigError
from megapatch.logging_utils import get_logger
from megapatch.model import GPT, GPTConfig

log = get_logger("hf")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_INDEX = "model.safetensors.index.json"

# (GPTConfig field, config.json key) pairs a run must match to load a Hugging Face model.
_MATCHED_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("kv_heads", "num_key_value_heads"),
    ("ffn_hidden", "intermediate_size"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
)


# -- names ------------------------------------------------------------------------------
def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megapatch full weights → LlamaForCausalLM names (`model.` prefix, `lm_head` outside)."""
    return {(n if n == "lm_head.weight" else f"model.{n}"): w for n, w in state.items()}


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], tie_embeddings: bool
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights → megapatch names; rotary buffers and a tied head dropped."""
    state = {}
    for name, weight in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older exports carry
            continue
        if name == "lm_head.weight" and tie_embeddings:
            continue
        state[name.removeprefix("model.")] = weight
    return state


# -- export -----------------------------------------------------------------------------
def hf_config(cfg: GPTConfig, special_ids: dict[str, int], dtype: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM equivalent to `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, 5 reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def export_hf(
    ckpt: LoadedCheckpoint,
    out: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write `ckpt` as a LlamaForCausalLM directory at `out`; returns its path.

    The directory is built next to `out` and moved into place only when complete, so a
    failure leaves an existing `out` untouched. A non-empty `out` is refused unless
    `overwrite`.
    """
    from megapatch.data import Tokenizer

    out = Path(out)
    check_out_dir(out, overwrite)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tokenizer_path = tokenizer_path or ckpt.tokenizer_path()
    if tokenizer_path is None:
        raise CheckpointError(
            f"{ckpt.path}: no tokenizer found (run dir or training data); pass --tokenizer"
        )
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_tokenizer_matches(tokenizer, ckpt.model_config.vocab_size, ckpt.path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights = {
            name: w.to(DTYPES[dtype]).contiguous()
            for name, w in to_hf_state_dict(ckpt.state_dict).items()
        }
        _save_weights(weights, tmp, max_shard_size)
        special = {
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
            "unk": tokenizer.unk_id,
        }
        special = {k: v for k, v in special.items() if v >= 0}
        _write_json(tmp / "config.json", hf_config(ckpt.model_config, special, dtype))
        _write_tokenizer(tokenizer, special, ckpt.model_config.seq_len, tmp)
        _write_json(
            tmp / "megapatch.json",
            {
                "source_checkpoint": str(ckpt.path),
                "step": ckpt.step,
                "config_hash": ckpt.client_state.identity.get("config_hash"),
                "tensor_model_parallel_size": ckpt.client_state.tensor_model_parallel_size,
                "zero_stage": ckpt.client_state.zero_stage,
                "tokens": ckpt.client_state.progress.tokens,
                "dtype": dtype,
            },
        )
        _apply_umask(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s", ckpt.path, ckpt.step, out)
    return out


def check_tokenizer_matches(tokenizer, vocab_size: int, checkpoint: Path | str) -> None:
    """A tokenizer's ids must all be rows of the model (one line error otherwise); the model
    may have more rows than the tokenizer has pieces (model.vocab_size set above it)."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but checkpoint "
            f"{checkpoint} has a vocabulary of {vocab_size}: use the tokenizer the model was "
            "trained with"
        )


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an export target that is a file, or a non-empty directory without overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty; pass --overwrite to replace it (nothing was written)"
        )


def _apply_umask(directory: Path) -> None:
    """Give the export the modes of any directory and file the user creates: mkdtemp made
    it 0700, which a team on a shared cluster could not read."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with two renames; the old contents go only after success."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_weights(weights: dict[str, torch.Tensor], directory: Path, max_shard_size) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ConfigError("export needs safetensors: pip install 'megapatch[export]'") from exc
    metadata = {"format": "pt"}
    total = sum(w.numel() * w.element_size() for w in weights.values())
    if total <= _bytes(max_shard_size):
        save_file(weights, directory / "model.safetensors", metadata=metadata)
        return
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError as exc:
        raise ConfigError(
            "a sharded export needs huggingface_hub: pip install 'megapatch[export]'"
        ) from exc
    split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({n: weights[n] for n in names}, directory / file, metadata=metadata)
    index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
    _write_json(directory / WEIGHT_INDEX, index)


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--max-shard-size {size!r}: expected bytes or a size like 500MB or 5GB"
        ) from None


def _write_tokenizer(tokenizer, special: dict[str, int], seq_len: int, directory: Path) -> None:
    """The sentencepiece model plus the settings under which AutoTokenizer encodes exactly
    as megapatch does: no BOS/EOS added, no dummy prefix, no legacy space handling. A
    Hugging Face tokenizer goes as its own files, byte for byte."""
    if tokenizer.kind != "sentencepiece":
        tokenizer.save(directory)
        return
    (directory / "tokenizer.model").write_bytes(tokenizer.model_proto)
    piece = tokenizer.processor.id_to_piece
    tokens = {f"{name}_token": piece(i) for name, i in special.items()}
    _write_json(directory / "special_tokens_map.json", tokens)
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": seq_len,
            **tokens,
        },
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# -- import -----------------------------------------------------------------------------
def read_hf(directory: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A LlamaForCausalLM directory as (GPTConfig, full megapatch weights in fp32)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{directory}: no config.json (expected a Hugging Face Llama model directory)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from exc
    cfg = _gpt_config_from_hf(config, config_file)
    hf_state = _read_weights(directory)
    state = from_hf_state_dict(hf_state, cfg.tie_embeddings)
    return cfg, {name: w.float() for name, w in state.items()}


def _gpt_config_from_hf(config: dict[str, Any], where: Path) -> GPTConfig:
    def need(key: str):
        if key not in config:
            raise CheckpointError(f"{where}: missing {key!r}")
        return config[key]

    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"{where}: model_type={model_type!r}; only Llama models (model_type 'llama') load"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "rope type": (rope_type, "default"),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise CheckpointError(f"{where}: {key}={value!r} is not supported (need {wanted!r})")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(
            f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
            "megapatch needs head_dim = hidden_size / num_attention_heads"
        )
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    try:
        cfg = GPTConfig(
            vocab_size=need("vocab_size"),
            d_model=hidden,
            n_layers=need("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            ffn_hidden=need("intermediate_size"),
            seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return cfg


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    index = directory / WEIGHT_INDEX
    bin_single = directory / "pytorch_model.bin"
    bin_index = directory / "pytorch_model.bin.index.json"
    if single.is_file() or index.is_file():
        from safetensors.torch import load_file

        files = [single] if single.is_file() else _index_files(index)
        load = load_file
    elif bin_single.is_file() or bin_index.is_file():
        files = [bin_single] if bin_single.is_file() else _index_files(bin_index)

        def load(file):
            return torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(
            f"{directory}: no weights (model.safetensors, {WEIGHT_INDEX} or pytorch_model.bin)"
        )
    state = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (named by the weight index)")
        try:
            state.update(load(file))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: unreadable ({exc})") from exc
    return state


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{index}: not a weight index ({exc})") from exc
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def load_hf_into_model(model: GPT, hf_dir: str | os.PathLike) -> None:
    """Initialise `model` (any TP size: each rank takes its shards) from a Llama directory.

    The architecture must match the model config exactly, field by field; the context
    length may differ (RoPE has no learned positions). Raises CheckpointError naming the
    first mismatch.
    """
    source = f"init.from_hf={hf_dir}"
    hf_cfg, state = read_hf(hf_dir)
    for field, key in _MATCHED_FIELDS:
        theirs, ours = getattr(hf_cfg, field), getattr(model.cfg, field)
        if theirs == ours:
            continue
        if field == "vocab_size":
            raise CheckpointError(
                f"{source}: vocab_size={theirs} but the run's vocabulary is {ours}: the data "
                f"was tokenized with another tokenizer (prep it with --tokenizer {hf_dir})"
            )
        run_key = "n_kv_heads" if field == "kv_heads" else field
        raise CheckpointError(
            f"{source}: config.json {key}={theirs} but model.{run_key}={ours}; set "
            f"model.{run_key}={theirs}"
        )
    if hf_cfg.seq_len != model.cfg.seq_len:
        log.info(
            "%s: trained with %d positions, continuing with model.seq_len=%d",
            source,
            hf_cfg.seq_len,
            model.cfg.seq_len,
        )
    load_full_state_dict(model, state, source=source)
    log.info("initialised the model from %s", hf_dir)


__all__ = [
    "export_hf",
    "load_hf_into_model",
    "read_hf",
    "hf_config",
    "to_hf_state_dict",
    "from_hf_state_dict",
    "check_out_dir",
    "check_tokenizer_matches",
]
