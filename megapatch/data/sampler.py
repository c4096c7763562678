"""Phase streams of training windows and the data-parallel window sampler.

The token budget T is split between the phases (arXiv 2407.12665, section 3):

* T fits in the corpus: the patch phase reads tokens [0, λT) and the token phase
  [λT, T), so no token is seen by both.
* T needs several epochs (the paper's multi-epoch variant): each phase cycles over the
  whole corpus, the patch phase for the first λ of the epochs, the token phase for the rest.

A phase's range is cut into windows: K·L + K tokens at stride K·L in the patch phase
(input K·L tokens, targets shifted by one patch), L + 1 at stride L in the token phase.
A `PhaseStream` visits them in a seeded permutation, a fresh one each epoch, as an endless
sequence of windows. Global batch b is windows b·G … (b+1)·G − 1 of that sequence whatever
the data-parallel size; DP rank r reads its contiguous slice, so TP peers (same DP rank)
read the same windows. A blend gives each source its share of T and interleaves the
sources' windows in proportion to their weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from megapatch.data.corpus import BlendedCorpus, Corpus, sources_of
from megapatch.errors import CheckpointError, ConfigError, DataError
from megapatch.logging_utils import get_logger

log = get_logger("data")

PHASES = ("patch", "token")
_PHASE_CODE = {"patch": 1, "token": 2}  # patch1, patch2, ... (several stages): 3, 4, ...
# A blend repeats one interleaving pattern of this many windows: weights resolve to 1/65536.
_BLEND_PERIOD = 1 << 16
_CACHED_PERMUTATIONS = 4


@dataclass(frozen=True)
class SourceWindows:
    """One source's windows in one phase: `count` windows starting at token `start`."""

    corpus: Corpus
    start: int
    count: int
    multi_epoch: bool


class PhaseStream:
    """The endless, seeded sequence of one phase's windows.

    `.window` tokens per window, `.stride` between window starts, `.windows_per_epoch`
    (summed over the sources of a blend), `.budget_tokens` (this phase's share of T).
    `get(i)` → int64 [window]; `get_many(indices)` → int64 [n, window].
    """

    def __init__(
        self,
        name: str,
        *,
        window: int,
        stride: int,
        sources: list[SourceWindows],
        weights: list[float],
        seed: int,
        budget_tokens: int,
    ):
        self.name = name
        self.window = window
        self.stride = stride
        self.sources = sources
        self.seed = seed
        self.budget_tokens = budget_tokens
        self.windows_per_epoch = sum(s.count for s in sources)
        self.multi_epoch = any(s.multi_epoch for s in sources)
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # loader threads share the permutation cache
        if len(sources) > 1:
            self._quota, self._pattern_source, self._pattern_rank = _blend_pattern(weights)

    def __len__(self) -> int:
        return self.windows_per_epoch

    def get(self, index: int) -> np.ndarray:
        return self.get_many(np.array([index]))[0]

    def get_many(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Windows at stream positions `indices`, as int64 [n, window] (into `out` if given)."""
        sources, starts = self.locate(indices)
        if out is None:
            out = np.empty((len(starts), self.window), dtype=np.int64)
        for row, (s, start) in enumerate(zip(sources.tolist(), starts.tolist())):
            self.sources[s].corpus.read(start, self.window, out=out[row])
        return out

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(source index, first token) of the windows at stream positions `indices`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.windows_per_epoch == 0:
            raise IndexError(f"the {self.name} phase has no windows (its share of the budget is 0)")
        if len(indices) and indices.min() < 0:
            raise IndexError("stream positions are non-negative")
        if len(self.sources) == 1:
            source = np.zeros(len(indices), dtype=np.int64)
            local = indices
        else:
            period, slot = np.divmod(indices, _BLEND_PERIOD)
            source = self._pattern_source[slot]
            local = period * self._quota[source] + self._pattern_rank[slot]
        starts = np.empty(len(indices), dtype=np.int64)
        for s in np.unique(source).tolist():
            mask = source == s
            src = self.sources[s]
            epoch, position = np.divmod(local[mask], src.count)
            order = np.empty(len(position), dtype=np.int64)
            for e in np.unique(epoch).tolist():
                in_epoch = epoch == e
                order[in_epoch] = self._permutation(s, e)[position[in_epoch]]
            starts[mask] = src.start + order * self.stride
        return source, starts

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        with self._lock:
            perm = self._permutations.get(key)
            if perm is None:
                code = _PHASE_CODE.get(self.name) or 2 + int(self.name.removeprefix("patch"))
                rng = np.random.default_rng([self.seed, code, source, epoch])
                count = self.sources[source].count
                dtype = np.int32 if count < 2**31 else np.int64  # half the memory for < 2^31
                perm = rng.permutation(np.arange(count, dtype=dtype))
                self._permutations[key] = perm
                if len(self._permutations) > _CACHED_PERMUTATIONS:
                    self._permutations.popitem(last=False)
            return perm

    def __repr__(self) -> str:
        return (
            f"PhaseStream({self.name!r}, window={self.window}, "
            f"windows_per_epoch={self.windows_per_epoch}, multi_epoch={self.multi_epoch})"
        )


def _blend_pattern(weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One period of the blend: per-source quotas and, for each slot, (source, rank).

    Quotas are the weights rounded to whole windows of the period (largest remainder,
    at least one each); source s's r-th window sits at key (r + ½)/quota_s, so each
    source is spread evenly through the period.
    """
    raw = np.asarray(weights, dtype=np.float64) * _BLEND_PERIOD
    quota = np.floor(raw).astype(np.int64)
    by_remainder = np.argsort(-(raw - quota), kind="stable")
    quota[by_remainder[: _BLEND_PERIOD - quota.sum()]] += 1
    while (quota == 0).any():  # a tiny weight still gets one window per period
        quota[np.argmax(quota)] -= 1
        quota[np.argmin(quota)] += 1
    source = np.repeat(np.arange(len(quota)), quota)
    rank = np.concatenate([np.arange(q) for q in quota])
    order = np.lexsort((source, (rank + 0.5) / quota[source]))
    return quota, source[order], rank[order]


def build_phase_streams(
    corpus: Corpus | BlendedCorpus,
    *,
    total_tokens: int,
    patch_fraction: float,
    patch_size: int,
    seq_len: int,
    seed: int = 0,
) -> dict[str, PhaseStream]:
    """The patch and token phase streams of a run with budget `total_tokens`.

    A phase with no share of the budget (λ = 0 or 1) gets a stream without windows.
    """
    if not isinstance(total_tokens, (int, np.integer)) or total_tokens <= 0:
        raise ConfigError(f"total_tokens must be a positive integer, got {total_tokens!r}")
    if not 0.0 <= patch_fraction <= 1.0:
        raise ConfigError(f"patch fraction must be in [0, 1], got {patch_fraction}")
    patch_budget = round(patch_fraction * int(total_tokens))
    phases = [("patch", patch_size, patch_budget), ("token", 1, int(total_tokens) - patch_budget)]
    return build_stage_streams(corpus, phases=phases, seq_len=seq_len, seed=seed)


def build_stage_streams(
    corpus: Corpus | BlendedCorpus,
    *,
    phases: list[tuple[str, int, int]],
    seq_len: int,
    seed: int = 0,
) -> dict[str, PhaseStream]:
    """One stream per phase, from `phases` = [(name, K, budget tokens)] in training order.

    Where the budget fits in a source, the phases read consecutive, disjoint ranges of its
    share of the tokens in that order; where it does not (multi-epoch), every phase cycles
    over the whole source. A phase with a budget of 0 gets a stream without windows.
    """
    total_tokens = sum(budget for _, _, budget in phases)
    if total_tokens <= 0:
        raise ConfigError(f"total_tokens must be a positive integer, got {total_tokens!r}")
    if any(k < 1 for _, k, _ in phases) or seq_len < 1:
        sizes = [k for _, k, _ in phases]
        raise ConfigError(f"patch size and seq_len must be ≥ 1, got K={sizes}, L={seq_len}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"data seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    shapes = {name: (k * seq_len + k, k * seq_len) for name, k, _ in phases}  # window, stride
    budgets = {name: budget for name, _, budget in phases}
    pairs = sources_of(corpus)
    per_phase: dict[str, list[SourceWindows]] = {name: [] for name, _, _ in phases}
    for corpus_i, weight in pairs:
        share = round(weight * total_tokens)
        fits = share <= corpus_i.num_tokens
        ranges, done = {}, 0
        for name, _, budget in phases:
            # Each boundary is the rounded cumulative share, so the ranges tile [0, share).
            end = round((done + budget) / total_tokens * share)
            ranges[name] = (round(done / total_tokens * share), end)
            done += budget
            if not fits:
                ranges[name] = (0, corpus_i.num_tokens)
        for phase, (window, stride) in shapes.items():
            lo, hi = ranges[phase]
            count = max(0, (hi - lo - (window - stride)) // stride) if budgets[phase] else 0
            if budgets[phase] and count == 0:
                raise DataError(
                    f"{corpus_i.directory}: the {phase} phase's tokens [{lo}, {hi}) hold no "
                    f"window of {window} tokens; raise total_tokens or use a larger corpus "
                    f"(it has {corpus_i.num_tokens} {corpus_i.split} tokens)"
                )
            per_phase[phase].append(SourceWindows(corpus_i, lo, count, not fits))
            if budgets[phase]:
                epochs = weight * budgets[phase] / max(1, count * stride)
                log.info(
                    "%s phase: %s tokens [%d, %d): %d windows of %d tokens, %.2f epochs%s",
                    phase,
                    corpus_i.directory,
                    lo,
                    hi,
                    count,
                    window,
                    epochs,
                    " (multi-epoch)" if not fits else "",
                )
    weights = [w for _, w in pairs]
    return {
        name: PhaseStream(
            name,
            window=shapes[name][0],
            stride=shapes[name][1],
            sources=per_phase[name],
            weights=weights,
            seed=seed,
            budget_tokens=budgets[name],
        )
        for name, _, _ in phases
    }


class WindowSampler:
    """This data-parallel rank's slice of each global batch of a phase stream.

    Global batch b (counted from the start of the phase) is stream windows
    [b·G, (b+1)·G); rank r reads [b·G + r·G/dp, b·G + (r+1)·G/dp). Iterating yields
    int64 [G/dp, window] arrays and counts each batch consumed as it is handed out.
    `state_dict()` is `{"consumed_windows": n}`, the same on every rank, so a run can
    resume with another DP size (or global batch) and continue with window n.
    """

    def __init__(
        self, stream: PhaseStream, *, global_batch: int, dp_rank: int = 0, dp_size: int = 1
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} outside a group of {dp_size}")
        if global_batch < 1 or global_batch % dp_size:
            raise ConfigError(
                f"global batch of {global_batch} windows does not split over {dp_size} "
                "data-parallel ranks"
            )
        self.stream = stream
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.local_batch = global_batch // dp_size
        self.consumed_windows = 0

    @property
    def window(self) -> int:
        return self.stream.window

    def local_indices(self, batch_start: int) -> np.ndarray:
        """Stream positions of this rank's slice of the global batch starting at `batch_start`."""
        first = batch_start + self.dp_rank * self.local_batch
        return np.arange(first, first + self.local_batch, dtype=np.int64)

    def fetch(self, batch_start: int, out: np.ndarray | None = None) -> np.ndarray:
        """This rank's windows of the global batch starting at `batch_start` (no state change)."""
        return self.stream.get_many(self.local_indices(batch_start), out=out)

    def __iter__(self):
        while True:
            start = self.consumed_windows
            batch = self.fetch(start)
            self.consumed_windows = start + self.global_batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_windows": int(self.consumed_windows)}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("consumed_windows") if isinstance(state, dict) else None
        if (
            isinstance(consumed, bool)
            or not isinstance(consumed, (int, np.integer))
            or consumed < 0
        ):
            raise CheckpointError(
                f"sampler state: consumed_windows must be a non-negative integer, got {state!r}"
            )
        self.consumed_windows = int(consumed)

    @property
    def epoch(self) -> float:
        """Epochs of the phase's windows consumed so far."""
        return self.consumed_windows / max(1, self.stream.windows_per_epoch)

    def __repr__(self) -> str:
        return (
            f"WindowSampler({self.stream.name!r}, global_batch={self.global_batch}, "
            f"dp_rank={self.dp_rank}/{self.dp_size}, consumed={self.consumed_windows})"
        )
