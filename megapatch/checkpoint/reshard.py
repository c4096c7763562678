"""Elastic resume: continue a checkpoint in another parallel layout (DP size, TP size, ZeRO stage).

DeepSpeed cannot load ZeRO's optimizer partitions into another DP size, nor TP shards into
another TP size. Its *universal checkpoint* can: `ds_to_universal` turns a ZeRO-1/2/3
checkpoint into one folder per parameter holding the whole fp32 master weight, both Adam
moments and the step (TP shards merged, vocabulary padding stripped), and an engine built
with `checkpoint.load_universal` re-slices those for its own TP rank and ZeRO partition.
megapatch uses the library for both halves and adds what it lacks:

- the TP layout of every parameter (`universal_checkpoint_info`, from each parameter's
  `partition_dim`), stored in every checkpoint so the converter knows how to merge TP shards;
- doing it once, atomically, next to the original, which is never modified:
  `step_XXXXXXXX.universal/` is written under a temporary name, marked complete, renamed,
  and reused by later resumes into any layout (the universal form does not depend on it);
- the refusals that need the model or the run: a layout the model cannot take, ZeRO-0
  (its plain torch optimizer has no universal form in DeepSpeed), a failure midway.

The client state (progress, config, identity) and everything else of the run is read
from the original checkpoint, as for any resume; Progress counts windows globally, so the
data position does not depend on the layout.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapatch import faults
from megapatch.checkpoint.client_state import ClientState
from megapatch.checkpoint.safe_load import check_files
from megapatch.errors import CheckpointError
from megapatch.logging_utils import get_logger
from megapatch.model import VOCAB_WEIGHTS  # unpadded in a universal checkpoint

log = get_logger("reshard")

UNIVERSAL_SUFFIX = ".universal"
UNIVERSAL_MARKER = (
    "UNIVERSAL"  # in a converted folder, beside COMPLETE: which checkpoint it came from
)
_TMP_PREFIX = "."  # a conversion in progress: ".step_X.universal.tmp-PID", never loaded
_WAIT_POLL_S = 0.5


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero: int
    pp: int = 1

    @classmethod
    def of(cls, identity: dict[str, Any]) -> Layout:
        return cls(
            int(identity.get("tensor_model_parallel_size", 1)),
            int(identity.get("data_parallel_size", 1)),
            int(identity.get("zero_stage", 0)),
            int(identity.get("pipeline_model_parallel_size", 1)),
        )

    def __str__(self) -> str:
        pp = f" x PP={self.pp}" if self.pp > 1 else ""
        return f"TP={self.tp}{pp} x DP={self.dp}, ZeRO-{self.zero}"

    @property
    def tag(self) -> str:
        pp = f"-pp{self.pp}" if self.pp > 1 else ""
        return f"tp{self.tp}{pp}-dp{self.dp}-z{self.zero}"


def needs_reshard(saved: Layout, target: Layout) -> bool:
    """Whether DeepSpeed's own loader cannot take `saved` into `target`."""
    if saved.tp != target.tp or saved.pp != target.pp:
        return True
    if saved.zero != target.zero and not {saved.zero, target.zero} <= {1, 2}:
        return True  # ZeRO-1 and 2 share a format; the others do not
    return saved.dp != target.dp and target.zero > 0  # ZeRO partitions follow DP


def check_can_reshard(where: Path, saved: Layout, target: Layout, model_config: dict) -> None:
    """Refuse, before any work, a reshard that cannot succeed (one line, the way out)."""
    from megapatch.config.validation import model_shape_problems, pipeline_problems

    problems = model_shape_problems(
        d_model=model_config["d_model"],
        n_heads=model_config["n_heads"],
        n_kv_heads=model_config.get("n_kv_heads"),
        ffn_hidden=model_config["ffn_hidden"],
        tensor_parallel_size=target.tp,
    ) + pipeline_problems(
        pipeline_size=target.pp,
        zero_stage=target.zero,
        n_layers=model_config["n_layers"],
        tie_embeddings=bool(model_config.get("tie_embeddings", False)),
    )
    if problems:
        key, value, expected = problems[0]
        pp = f"parallel.pipeline_model_parallel_size={saved.pp}, " if saved.pp > 1 else ""
        raise CheckpointError(
            f"checkpoint {where} ({saved}) cannot be resharded to {target}: {key}={value}, "
            f"expected {expected}; resume it as it was written "
            f"(parallel.tensor_model_parallel_size={saved.tp}, {pp}"
            f"parallel.zero_stage={saved.zero}, {saved.tp * saved.pp * saved.dp} ranks)"
        )


# -- the TP layout DeepSpeed's converter needs -------------------------------------------------
def universal_checkpoint_info(model: torch.nn.Module) -> dict[str, Any]:
    """How each parameter is split over TP, in the form `ds_to_universal` reads (the
    module attribute `universal_checkpoint_info`, saved in every model-states file):
    replicated, split along rows (dim 0, the converter's default), along columns (dim 1),
    and the vocabulary weights whose TP padding the converter strips. For a pipeline stage
    it names every stage's parameters (the converter reads one rank's copy), as the
    pipeline names them."""
    from deepspeed.checkpoint import constants as c

    from megapatch.model import GPT
    from megapatch.model.pipeline import pipe_parameter_name

    pipelined = hasattr(model, "gpt_named_parameters")  # the whole model's names and splits
    named = (GPT.skeleton(model.cfg) if pipelined else model).named_parameters()
    replicated, columns, vocabulary = [], [], []
    for gpt_name, param in named:
        name = pipe_parameter_name(gpt_name, model.cfg.n_layers) if pipelined else gpt_name
        pattern = f"^{re.escape(name)}$"
        dim = getattr(param, "partition_dim", None)
        if dim is None:
            replicated.append(pattern)
        elif dim == 1:
            columns.append(pattern)
        elif dim != 0:
            raise ValueError(f"{name}: partition_dim {dim} has no universal-checkpoint form")
        if gpt_name in VOCAB_WEIGHTS:
            vocabulary.append(pattern)
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: columns,  # DeepSpeed's name: cat along dim 1
        c.VOCABULARY_PARAMETER_PATTERNS: vocabulary,
        c.ORIGINAL_VOCAB_SIZE: model.cfg.vocab_size,
    }


def _name_parameters_for_every_layout(zero: Path, n_layers: int) -> None:
    """A universal checkpoint keeps one folder per parameter, named as the saving model
    named it; DeepSpeed's loader looks a parameter up by the loading model's name. A
    pipeline names a parameter "<layer>.<local name>", the GPT by its module path: give each
    folder the other layout's name too (a relative symlink), so any layout loads it."""
    from megapatch.model.pipeline import gpt_parameter_name, pipe_parameter_name

    for folder in sorted(p for p in zero.iterdir() if p.is_dir() and not p.is_symlink()):
        name = folder.name
        other = (
            gpt_parameter_name(name, n_layers)
            if name[0].isdigit()
            else pipe_parameter_name(name, n_layers)
        )
        alias = zero / other
        if not alias.exists():
            alias.symlink_to(name, target_is_directory=True)


def slice_for_zero3_tensor_parallelism(engine) -> None:
    """DeepSpeed's ZeRO-3 loader of a universal checkpoint takes a parameter's TP slice only
    by its AutoTP metadata (Megatron-style layers have none), so at TP>1 it would hand each
    rank the DP partition of the *whole* weight. For TP-split parameters, take this rank's
    TP slice first (vocabulary rows padded as the model pads them), then the DP partition
    as DeepSpeed cuts it; the rest goes through DeepSpeed's own path."""
    from deepspeed.checkpoint import constants as c

    from megapatch.checkpoint.safe_load import safe_load
    from megapatch.checkpoint.tp_shards import tensor_parallel_shard

    optimizer, model = engine.optimizer, engine.module
    own = optimizer.load_hp_checkpoint_state

    def load(folder, key, param=None):
        if param is None or getattr(param, "partition_dim", None) is None:
            return own(folder, key, param=param)
        saved = safe_load(Path(folder) / f"{key}.pt")
        full = saved[c.PARAM] if isinstance(saved, dict) else saved
        flat = tensor_parallel_shard(model, Path(folder).name, param, full).reshape(-1)
        group = optimizer._get_param_partition_group(param)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        part = -(-flat.numel() // world)
        flat = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
        return flat.narrow(0, rank * part, part)

    optimizer.load_hp_checkpoint_state = load


# -- where the converted checkpoint lives ------------------------------------------------------
def universal_dir(step_dir: Path) -> Path:
    return step_dir.with_name(step_dir.name + UNIVERSAL_SUFFIX)


def is_universal(step_dir: Path) -> bool:
    return (step_dir / UNIVERSAL_MARKER).is_file() and (step_dir / "zero").is_dir()


def is_complete(out: Path) -> bool:
    return (out / "COMPLETE").is_file() and is_universal(out)


def remove_stale(directory: Path) -> None:
    """Delete conversions a killed process left behind (their names say they are partial)."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name.startswith(_TMP_PREFIX) and ".universal.tmp-" in child.name:
            log.warning("removing the interrupted reshard %s", child)
            shutil.rmtree(child, ignore_errors=True)


@dataclass
class ReshardResult:
    out: Path
    seconds: float
    bytes: int
    reused: bool


def _tree_bytes(path: Path) -> int:
    """Bytes on disk under `path`, each hard-linked file once."""
    sizes = {}
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


class _Progress(io.TextIOBase):
    """The converter's own output (stage lines, tqdm bars): on a terminal as it is, off a
    terminal its stage lines only, as plain log lines."""

    def __init__(self, where: str):
        self.where, self.buf = where, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = re.split(r"[\r\n]", self.buf)
        for line in lines:
            if line.startswith("***"):
                log.info("reshard %s: %s", self.where, line.strip("* ").strip())
        return len(text)


def convert(
    step_dir: Path,
    out: Path,
    *,
    step: int,
    model_config: dict[str, Any],
    workers: int = 1,
    bar: bool = False,
) -> ReshardResult:
    """Write the universal form of checkpoint `step_dir` to `out`, atomically: under a
    temporary name beside `out`, renamed once complete. `step_dir` is only read. A complete
    `out` is reused. CheckpointError (one line) on failure, with nothing of `out` left."""
    if is_complete(out):
        return ReshardResult(out, 0.0, _tree_bytes(out), reused=True)
    if out.exists():
        raise CheckpointError(
            f"{out} exists and is not a complete universal checkpoint; remove it or choose another --out"
        )
    # ds_to_universal unpickles every file without restrictions: refuse foreign types first.
    check_files(sorted(step_dir.glob("*.pt")))
    tmp = out.with_name(f"{_TMP_PREFIX}{out.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    # The converter writes `latest_universal` beside its output folder: nest the output
    # in our temporary folder, so nothing is written beside the original.
    data = tmp / "universal"
    try:
        tmp.mkdir(parents=True)
        from megapatch.checkpoint import zero0
        from megapatch.checkpoint.client_state import read_client_state

        client = read_client_state(step_dir)
        if client.zero_stage == 0 and zero0.is_plain_zero0(step_dir):
            zero0.to_universal(step_dir, data, client)  # DeepSpeed converts ZeRO only
        else:
            _run_converter(step_dir, data, workers=workers, bar=bar)
        faults.maybe_kill_in_reshard(step)
        _name_model_states_for_every_stage(data)
        _zero3_in_the_common_form(data / "zero", model_config)
        _name_parameters_for_every_layout(data / "zero", int(model_config["n_layers"]))
        _add_stage3_common_state(data)
        if (step_dir / "megapatch").is_dir():  # per-rank RNG: kept for the ranks that remain
            shutil.copytree(step_dir / "megapatch", data / "megapatch")
        faults.check_write(data / "COMPLETE", step)
        (data / UNIVERSAL_MARKER).write_text(f"{step_dir.resolve()}\n")
        (data / "COMPLETE").write_text(f"{step}\n")
        os.replace(data, out)
        shutil.rmtree(tmp)
    except (OSError, RuntimeError, AssertionError, ValueError, KeyError, IndexError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not reshard {step_dir} into {out} ({_reason(exc)}); the original checkpoint is "
            "intact and resumable in its own layout, and nothing of the reshard was kept"
        ) from exc
    return ReshardResult(out, time.perf_counter() - t0, _tree_bytes(out), reused=False)


def _name_model_states_for_every_stage(folder: Path) -> None:
    """DeepSpeed looks for a universal checkpoint's model states under the names of the
    *loading* engine's ZeRO stage (ZeRO-3: zero_pp_rank_0_mp_rank_XX_model_states.pt,
    others: mp_rank_XX_model_states.pt); the converter keeps the saving stage's names.
    Give TP rank r's file both names (a hard link where the filesystem allows)."""
    for src in sorted(folder.glob("*model_states.pt")):
        m = re.fullmatch(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt", src.name)
        if m is None or (m.group(1) not in (None, "0")):
            continue
        tp = m.group(2)
        for name in (
            f"mp_rank_{tp}_model_states.pt",
            f"zero_pp_rank_0_mp_rank_{tp}_model_states.pt",
        ):
            dst = folder / name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)


def _zero3_in_the_common_form(zero: Path, model_config: dict[str, Any]) -> None:
    """DeepSpeed 0.19 converts a ZeRO-3 checkpoint without an Adam step per parameter or a
    DeepSpeed version in the common state, and at TP=1 into bare flat tensors with the
    vocabulary padding kept (at TP>1 its shard merge writes the shaped form); its ZeRO-1/2
    loader needs the form a ZeRO-1/2 conversion writes.
    Rewrite a ZeRO-3 conversion into that form (which the ZeRO-3 loader reads as well):
    each state shaped as the parameter, its TP split dimension, the vocabulary rows cut
    to the real vocabulary and marked, the step beside it. A flat tensor comes from a TP=1
    source, so its shape is the whole model's."""
    import deepspeed
    from deepspeed.checkpoint import constants as c

    from megapatch.checkpoint.safe_load import safe_load
    from megapatch.model import GPT, GPTConfig

    common_file = zero / "optimizer_state.pt"
    common = safe_load(common_file)
    if int(common.get("zero_stage", 0)) != 3:
        return
    cfg = GPTConfig.from_saved(model_config)
    skeleton = GPT.skeleton(cfg)
    state = common[c.OPTIMIZER_STATE_DICT]["state"]
    step = next(iter(state.values()))["step"]
    for name, param in skeleton.named_parameters():
        folder = zero / name
        dim = getattr(param, "partition_dim", None)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            saved = safe_load(folder / f"{key}.pt")
            if isinstance(saved, dict):  # TP>1: the converter merged the shards into this form
                continue
            if saved.numel() != param.numel():
                raise ValueError(
                    f"{name}/{key}: {saved.numel()} values in the ZeRO-3 conversion, the model "
                    f"has {param.numel()}"
                )
            entry = {c.PARAM: saved.reshape(param.shape), c.CAT_DIM: 0 if dim is None else dim}
            if name in VOCAB_WEIGHTS:
                entry[c.PARAM] = entry[c.PARAM][: cfg.vocab_size].clone()
                entry[c.VOCAB_TENSOR] = True
            torch.save(entry, folder / f"{key}.pt")
        torch.save(torch.as_tensor(step, dtype=torch.float32), folder / "step.pt")
    common.setdefault(c.DS_VERSION, deepspeed.__version__)
    torch.save(common, common_file)


def _add_stage3_common_state(folder: Path) -> None:
    """The ZeRO-3 loader reads the Adam step and the group hyperparameters from
    zero/optimizer_state.pt in the form ZeRO-3's converter writes; a ZeRO-1/2 source's has
    them elsewhere (the step per parameter): add that form, so ZeRO-3 can load it too."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    from megapatch.checkpoint.safe_load import safe_load

    file = folder / "zero" / "optimizer_state.pt"
    common = safe_load(file)
    if OPTIMIZER_STATE_DICT in common:
        return
    step = safe_load(next((folder / "zero").glob("*/step.pt")))
    common[OPTIMIZER_STATE_DICT] = {
        "state": {0: {"step": step}},
        PARAM_GROUPS: common[PARAM_GROUPS],
    }
    torch.save(common, file)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _run_converter(step_dir: Path, out: Path, *, workers: int, bar: bool) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(step_dir),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        # A checkpoint saved before megapatch recorded its TP layout: fine at TP=1 (no
        # shards to merge); the TP>1 case is refused by the caller.
        inject_missing_state=True,
    )
    chatter = _Progress(step_dir.name)
    stdout = contextlib.nullcontext() if bar else contextlib.redirect_stdout(chatter)
    stderr = contextlib.nullcontext() if bar else contextlib.redirect_stderr(chatter)
    with stdout, stderr:
        ds_to_universal.main(args)


def has_tp_layout(step_dir: Path) -> bool:
    """Whether the checkpoint records how its parameters split over TP (see above)."""
    from megapatch.checkpoint.client_state import load_model_states

    states, _ = load_model_states(step_dir)
    return "universal_checkpoint_info" in states


# -- during a resume: rank 0 converts, the others wait for the folder ----------------------------
def reshard_for_resume(step_dir: Path, client: ClientState, target: Layout) -> Path:
    """The universal form of `step_dir` for a run of layout `target` (converted by rank 0
    now, or reused); every rank returns its path or raises the same CheckpointError."""
    saved = Layout.of(client.identity)
    check_can_reshard(step_dir, saved, target, client.model_config)
    out = universal_dir(step_dir)
    failed = out.with_name(f"{_TMP_PREFIX}{out.name}.failed")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        with contextlib.suppress(OSError):
            failed.unlink(missing_ok=True)  # an earlier attempt's
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        error: CheckpointError | None = None
        try:
            if saved.tp > 1 and not has_tp_layout(step_dir) and not is_complete(out):
                raise CheckpointError(
                    f"checkpoint {step_dir} ({saved}) predates megapatch's record of its TP "
                    f"layout, so its TP shards cannot be merged for {target}: resume it as it "
                    f"was written (parallel.tensor_model_parallel_size={saved.tp}, "
                    f"parallel.zero_stage={saved.zero}, {saved.tp * saved.dp} ranks)"
                )
            remove_stale(step_dir.parent)
            result = convert(step_dir, out, step=client.step, model_config=client.model_config)
        except CheckpointError as exc:
            error = exc
            with contextlib.suppress(OSError):
                failed.write_text(str(exc) + "\n")
        if error is not None:
            _barrier_after(out, failed)
            raise error
        if result.reused:
            log.info("resharding %s -> %s: reusing %s", saved, target, out)
        else:
            log.info(
                "resharded %s (%s) for %s in %.1f s: %s (%.1f MB, the original is untouched)",
                step_dir,
                saved,
                target,
                result.seconds,
                out,
                result.bytes / 1e6,
            )
    _barrier_after(out, failed)
    if not is_complete(out):
        message = failed.read_text().strip() if failed.is_file() else f"rank 0 did not write {out}"
        raise CheckpointError(message)
    return out


def _barrier_after(out: Path, failed: Path) -> None:
    """Wait, without a collective (a conversion can outlast the collective timeout), until
    rank 0 finished the folder or gave up; then meet in a barrier."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() != 0:
            while not (is_complete(out) or failed.is_file()):
                time.sleep(_WAIT_POLL_S)
        dist.barrier()


# -- reading the weights of a universal checkpoint (eval, export, generate) ----------------------
def read_universal_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master weight, whole (TP merged, vocabulary unpadded)."""
    from megapatch.checkpoint.safe_load import safe_load

    zero = step_dir / "zero"
    state = {}
    # GPT names only: a folder also answers to its pipeline name (a symlink, or the other way)
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir() and not p.name[0].isdigit()):
        saved = safe_load(param_dir / "fp32.pt")
        state[param_dir.name] = saved["param"]
    return state


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


def bar_wanted() -> bool:
    return sys.stderr.isatty()


__all__ = [
    "Layout",
    "ReshardResult",
    "UNIVERSAL_SUFFIX",
    "check_can_reshard",
    "convert",
    "is_universal",
    "needs_reshard",
    "read_universal_weights",
    "reshard_for_resume",
    "universal_checkpoint_info",
    "universal_dir",
]
