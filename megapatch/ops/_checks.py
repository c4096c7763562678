"""Input validation and backend resolution for the patch ops.

Every check runs before any work is done and raises one clear `ConfigError` line that
names the offending value and what was expected.

Shape, dtype and device checks read metadata and run on every call. The value checks (ids
inside the vocabulary, position weights finite, non-negative, not all zero) read the
tensors, which on a GPU is a host sync per call: there they run on the first call of each
signature (op, shapes, dtypes, device, vocabulary arguments) until one passes, so a run's
phases each fail on their first step when misconfigured and cost no sync after it (the data
pipeline checks every token id on the host anyway). On the CPU, where they are free, they
run on every call, and with MEGAPATCH_DEBUG_CHECKS=1 on every call everywhere.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from megapatch.errors import ConfigError

BACKENDS = ("auto", "reference", "torch", "triton")

DEBUG_CHECKS_ENV = "MEGAPATCH_DEBUG_CHECKS"
# Signatures whose value checks passed on a device; bounded, in case shapes never repeat.
_PASSED: set = set()
_MAX_PASSED = 4096


def debug_checks() -> bool:
    """MEGAPATCH_DEBUG_CHECKS set (not empty, not 0): value checks on every call."""
    return os.environ.get(DEBUG_CHECKS_ENV, "").lower() not in ("", "0", "false", "no", "off")


def run_value_checks(signature, device: torch.device, check) -> None:
    """Call `check()` (which raises on bad values) unless its `signature` already passed on
    this non-CPU device; always on the CPU or under MEGAPATCH_DEBUG_CHECKS. A signature is
    recorded only once its check has passed, so a failing call fails again when repeated."""
    if device.type == "cpu" or debug_checks():
        check()
        return
    if signature in _PASSED:
        return
    check()
    if len(_PASSED) >= _MAX_PASSED:
        _PASSED.clear()
    _PASSED.add(signature)


def group_size(group) -> int:
    """World size of a process group; 1 for `None` outside a distributed run."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map "auto" to a concrete backend and check that the requested one can run here."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"ops backend {backend!r} is unknown; expected one of {', '.join(BACKENDS)}"
        )
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ConfigError("ops backend 'triton' requested but triton is not installed")
        if not on_cuda and not triton_interpreting():
            raise ConfigError(
                "ops backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter); got tensors on {tensors[0].device}"
            )
    return backend


def _ids_out_of_range(ids: torch.Tensor, low: int, high: int, skip=None) -> torch.Tensor:
    """Mask of the ids (other than `skip`) outside [low, high); no host sync."""
    bad = (ids < low) | (ids >= high)
    if skip is not None:
        bad &= ids != skip
    return bad


def _raise_out_of_range(name: str, ids: torch.Tensor, bad: torch.Tensor, low, high, what):
    value = int(ids[bad][0])
    raise ConfigError(f"{name}: {what} {value} is outside the vocabulary [{low}, {high})")


def _check_ids_in_range(name: str, ids: torch.Tensor, low: int, high: int, what: str, skip=None):
    """All ids (other than `skip`) in [low, high): one reduction, one host sync on a GPU."""
    bad = _ids_out_of_range(ids, low, high, skip)
    if bool(bad.any()):
        _raise_out_of_range(name, ids, bad, low, high, what)


def _check_position_weights_form(op: str, weights, k: int, device: torch.device) -> None:
    """Type, dtype, shape and device of `position_weights`: metadata only, no host sync."""
    if not isinstance(weights, torch.Tensor):
        raise ConfigError(
            f"{op}: position_weights must be None or a tensor of K={k} weights, "
            f"got {type(weights).__name__}"
        )
    if not weights.dtype.is_floating_point:
        raise ConfigError(
            f"{op}: position_weights must be a floating tensor, got dtype {weights.dtype}"
        )
    if tuple(weights.shape) != (k,):
        raise ConfigError(
            f"{op}: position_weights must have shape [K] = [{k}] to match targets [N, K], "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != device:
        raise ConfigError(f"{op}: position_weights on {weights.device} but hidden on {device}")


def _bad_position_weights(weights: torch.Tensor) -> torch.Tensor:
    """A device bool: any weight non-finite or negative, or all zero. No host sync."""
    return (~torch.isfinite(weights)).any() | (weights < 0).any() | (weights == 0).all()


def _raise_bad_position_weights(op: str, weights: torch.Tensor) -> None:
    values = [float(x) for x in weights.detach().float().cpu()]
    shown = "[" + ", ".join(f"{x:g}" for x in values) + "]"
    if not all(math.isfinite(x) for x in values):
        raise ConfigError(f"{op}: position_weights must be finite, got {shown}")
    if any(x < 0 for x in values):
        raise ConfigError(f"{op}: position_weights must be non-negative, got {shown}")
    raise ConfigError(
        f"{op}: position_weights are all zero; give at least one position a positive weight"
    )


def check_embedding_inputs(
    op: str, ids: torch.Tensor, weight: torch.Tensor, vocab_total: int
) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"{op}: ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.dim() < 1 or ids.shape[-1] < 1:
        raise ConfigError(f"{op}: ids must have shape [..., K] with K >= 1, got {tuple(ids.shape)}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ConfigError(
            f"{op}: weight must be a floating [V, D] matrix, got {tuple(weight.shape)} {weight.dtype}"
        )
    if ids.device != weight.device:
        raise ConfigError(f"{op}: ids on {ids.device} but weight on {weight.device}")
    signature = (op, tuple(ids.shape), ids.dtype, ids.device, vocab_total)
    run_value_checks(
        signature, ids.device, lambda: _check_ids_in_range(op, ids, 0, vocab_total, "token id")
    )


def check_loss_inputs(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    vocab_size: int,
    vocab_total: int,
    position_weights: torch.Tensor | None = None,
) -> None:
    if hidden.dim() != 2 or not hidden.dtype.is_floating_point:
        raise ConfigError(
            f"{op}: hidden must be a floating [N, D] matrix, got {tuple(hidden.shape)} {hidden.dtype}"
        )
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ConfigError(
            f"{op}: weight must be a floating [V, D] matrix, got {tuple(weight.shape)} {weight.dtype}"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ConfigError(
            f"{op}: hidden width D={hidden.shape[1]} does not match weight width D={weight.shape[1]}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ConfigError(f"{op}: targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.dim() != 2 or targets.shape[0] != hidden.shape[0] or targets.shape[1] < 1:
        raise ConfigError(
            f"{op}: targets must have shape [N, K] = [{hidden.shape[0]}, K>=1] to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(targets.shape)}"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ConfigError(
            f"{op}: hidden, weight and targets must share a device, got "
            f"{hidden.device}, {weight.device}, {targets.device}"
        )
    if not 1 <= vocab_size <= vocab_total:
        raise ConfigError(
            f"{op}: vocab_size={vocab_size} must be in [1, {vocab_total}] (the padded weight rows)"
        )
    if 0 <= ignore_index < vocab_size:
        raise ConfigError(
            f"{op}: ignore_index={ignore_index} is a real token id (vocab_size={vocab_size}); "
            "use a negative value such as -100"
        )
    weighted = position_weights is not None
    if weighted:
        _check_position_weights_form(op, position_weights, targets.shape[1], hidden.device)
    signature = (
        op, tuple(targets.shape), targets.dtype, targets.device, ignore_index, vocab_size,
        vocab_total, position_weights.dtype if weighted else None,
    )  # fmt: skip

    def check():
        if not weighted:
            _check_ids_in_range(op, targets, 0, vocab_size, "target id", skip=ignore_index)
            return
        # Both value checks share the targets' one reduction and its one host sync on a GPU:
        # weights add no synchronisation to the call.
        bad_targets = _ids_out_of_range(targets, 0, vocab_size, skip=ignore_index)
        bad_weights = _bad_position_weights(position_weights)
        if bool(bad_targets.any() | bad_weights):
            if bool(bad_weights):
                _raise_bad_position_weights(op, position_weights)
            _raise_out_of_range(op, targets, bad_targets, 0, vocab_size, "target id")

    run_value_checks(signature, targets.device, check)
