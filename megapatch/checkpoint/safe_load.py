"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle: a checkpoint handed over by someone else could run anything the
moment `torch.load(..., weights_only=False)` reads it. megapatch reads its checkpoint
files with `weights_only=True`, which rebuilds only tensors, containers and plain values,
plus exactly the few classes megapatch and DeepSpeed are known to store there (listed
below). Anything else is refused with one line naming the type and the file, before any
of it runs. Files DeepSpeed loads itself on resume are checked the same way first
(`check_files`), so its own unrestricted load only ever sees files that passed.
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megapatch.errors import CheckpointError

# The classes megapatch's and DeepSpeed's checkpoint files may hold, by qualified name:
# numpy's RNG state (np.random.get_state) in megapatch's per-rank files, and DeepSpeed's
# records of its ZeRO stage, loss scaling and parameter fragments in its optimizer states.
ALLOWED_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",  # numpy < 2
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


# A numpy dtype unpickles through numpy.dtype, which builds its class (numpy.dtypes.*):
# torch's scan of the pickle lists only the former.
_COMPANIONS = {"numpy.dtype": ("numpy.dtypes.UInt32DType",)}


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def safe_load(file: str | Path, *, mmap: bool = False) -> Any:
    """`torch.load` of `file` on the CPU with only allowlisted types; CheckpointError
    (one line naming the file) if it is unreadable or holds anything else.

    The pickle's globals are listed before anything is unpickled, so a foreign type is
    refused without being imported, and DeepSpeed is imported only for files that name
    its classes."""
    file = Path(file)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        foreign = [name for name in needed if name not in ALLOWED_GLOBALS]
        if foreign:
            raise CheckpointError(f"{file}: {_refusal(foreign[0])}")
        needed += [c for name in needed for c in _COMPANIONS.get(name, ())]
        with torch.serialization.safe_globals([_resolve(name) for name in needed]):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # what weights_only still refuses (e.g. a REDUCE)
        found = _GLOBAL.search(str(exc))
        raise CheckpointError(f"{file}: {_refusal(found.group(1) if found else None)}") from None
    except (OSError, RuntimeError, EOFError, ValueError, ImportError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{file}: unreadable ({first})") from exc


def check_files(files: Iterable[Path]) -> None:
    """Refuse (CheckpointError) the first of `files` that holds a type outside the
    allowlist; tensors are memory-mapped, so this reads little more than the pickles."""
    for file in files:
        safe_load(file, mmap=True)


_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL |but got <class ')([\w.]+)")


def _refusal(name: str | None) -> str:
    what = f"the type {name}" if name else "a pickle instruction"
    return (
        f"refused: it holds {what}, which megapatch does not load (unpickling it could run "
        "code; only tensors, plain values and the types megapatch and DeepSpeed write are read)"
    )


__all__ = ["ALLOWED_GLOBALS", "safe_load", "check_files"]
