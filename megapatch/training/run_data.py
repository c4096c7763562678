"""The data of a run: one window stream per phase, the validation windows, and the checks
that refuse data a run cannot train on (too small for one global batch, token ids outside
the vocabulary) with one line instead of a crash mid-run."""

from __future__ import annotations

import numpy as np

from megapatch.config import RunConfig
from megapatch.data import (
    PhaseStream,
    WindowSampler,
    build_stage_streams,
    eval_windows,
    open_corpus,
)
from megapatch.errors import DataError


def open_run_data(cfg: RunConfig):
    """The (train, valid) corpora of a run, with their shards and manifests checked."""
    return open_corpus(cfg.train_data, split="train"), open_corpus(cfg.valid_data, split="valid")


def phase_streams(cfg: RunConfig, plan, corpus) -> dict[str, PhaseStream]:
    """One seeded stream per phase over disjoint tokens (each phase's tokens as the plan
    reads them, in training order), each holding a global batch at least."""
    streams = build_stage_streams(
        corpus,
        phases=[(p.name, p.patch_size, p.tokens) for p in plan.phases],
        seq_len=cfg.model.seq_len,
        seed=cfg.data.seed,
    )
    for phase in plan.phases:
        windows = streams[phase.name].windows_per_epoch
        if windows < phase.sequences_per_step:  # a batch would repeat windows
            raise DataError(
                f"data {cfg.train_data}: the {phase.name} phase has {windows} windows of "
                f"{phase.window} tokens, fewer than one global batch of {phase.sequences_per_step} "
                f"(train.tokens_per_step={cfg.train.tokens_per_step}): use a larger corpus or "
                "lower train.tokens_per_step"
            )
    return streams


def validation_windows(cfg: RunConfig, plan, valid) -> dict[int, np.ndarray]:
    """{K: windows} of the `valid` corpus: token-level (K=1) always, and each patch
    stage's K."""
    sizes = sorted({p.patch_size for p in plan.phases})
    windows = {
        k: eval_windows(valid, cfg.model.seq_len, max_windows=cfg.eval.max_windows, patch_size=k)
        for k in sizes
    }
    for w in windows.values():  # [N, K·L + K]
        if w.max() >= valid.vocab_size:
            raise DataError(
                f"data {cfg.valid_data}: the valid split holds token id {int(w.max())}, outside the "
                f"vocabulary of {valid.vocab_size} in its manifest: a corrupt .bin; re-run megapatch prep"
            )
    return windows


class VocabCheckedSampler(WindowSampler):
    """A WindowSampler that refuses token ids outside the vocabulary.

    A corrupt `.bin` of the right length passes every size check on open; its ids would
    reach the embedding lookup, which on a GPU aborts the process. The check runs in the
    loader's threads, off the training path.
    """

    def __init__(self, stream, *, vocab_size: int, **kwargs):
        super().__init__(stream, **kwargs)
        self.vocab_size = vocab_size

    def fetch(self, batch_start: int, out: np.ndarray | None = None) -> np.ndarray:
        windows = super().fetch(batch_start, out=out)  # [G/dp, window]
        if windows.size and windows.max() >= self.vocab_size:
            row = int(np.argmax(windows.max(axis=1) >= self.vocab_size))
            source, start = self.stream.locate(self.local_indices(batch_start)[row : row + 1])
            corpus = self.stream.sources[int(source[0])].corpus
            raise DataError(
                f"{corpus.directory}: {corpus.split} tokens [{start[0]}, {start[0] + self.window}) hold "
                f"id {int(windows[row].max())}, outside the vocabulary of {self.vocab_size} in its "
                "manifest: a corrupt .bin or shards of another tokenizer; re-run megapatch prep"
            )
        return windows


def phase_batches(
    cfg: RunConfig,
    stream: PhaseStream,
    phase,
    *,
    consumed_windows: int,
    vocab_size: int,
    dp_rank: int,
    dp_size: int,
    device,
):
    """This rank's micro-batches of `phase`, from the next window the run has not consumed
    (a global count, so the order does not depend on the DP size)."""
    from megapatch.data import PrefetchLoader

    sampler = VocabCheckedSampler(
        stream,
        vocab_size=vocab_size,
        global_batch=phase.sequences_per_step,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    sampler.load_state_dict({"consumed_windows": consumed_windows})
    return PrefetchLoader(
        sampler,
        phase.micro_batch_size,
        device,
        num_workers=cfg.data.num_workers,
        prefetch=cfg.data.prefetch,
    )
