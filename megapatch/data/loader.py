"""The prefetching loader of training micro-batches, and the validation windows."""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from megapatch.data.corpus import BlendedCorpus, Corpus, sources_of
from megapatch.data.sampler import WindowSampler
from megapatch.errors import ConfigError, DataError


class PrefetchLoader:
    """Endless iterator of this rank's micro-batches, int64 tensors [micro_batch, window].

    Background threads (`num_workers`, each `prefetch` micro-batches ahead) assemble whole
    local batches from the memory-mapped shards; on CUDA they fill pinned memory and the
    copy to the device is asynchronous. A global batch counts as consumed in the sampler
    when its last micro-batch is handed out, so `sampler.state_dict()` is exact at every
    optimizer step however far ahead the threads are. Loading a sampler state restarts the
    threads at the new position.
    """

    def __init__(
        self,
        sampler: WindowSampler,
        micro_batch_size: int,
        device: str | torch.device = "cpu",
        *,
        num_workers: int = 1,
        prefetch: int = 2,
    ):
        if micro_batch_size < 1 or sampler.local_batch % micro_batch_size:
            raise ConfigError(
                f"micro batch of {micro_batch_size} does not divide this rank's "
                f"{sampler.local_batch} windows per global batch"
            )
        if num_workers < 1 or prefetch < 1:
            raise ConfigError(
                f"loader needs num_workers ≥ 1 and prefetch ≥ 1, got {num_workers}, {prefetch}"
            )
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.grad_accum = sampler.local_batch // micro_batch_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self._pin = self.device.type == "cuda"
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()
        self._base = 0  # stream position of the first batch the threads make
        self._batch = 0  # batches handed out since _base
        self._micro = 0  # micro-batches handed out of the current batch
        self._expected = None  # sampler.consumed_windows as this loader last left it

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._expected is None or self.sampler.consumed_windows != self._expected:
            self._restart(self.sampler.consumed_windows)
        item = self._queues[self._batch % self.num_workers].get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._micro += 1
        if self._micro == self.grad_accum:
            self._micro = 0
            self._batch += 1
            self._expected = self._base + self._batch * self.sampler.global_batch
            self.sampler.consumed_windows = self._expected
        if self._pin:
            return item.to(self.device, non_blocking=True)
        return item

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)  # the next __next__ restarts the threads

    def _restart(self, base: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._base, self._batch, self._micro, self._expected = base, 0, 0, base
        self._queues = [queue.Queue(maxsize=self.prefetch) for _ in range(self.num_workers)]
        self._threads = [
            threading.Thread(
                # The threads hold no reference to the loader, so a loader dropped without
                # close() is collected and its __del__ stops them.
                target=_produce,
                args=(self.sampler, self.micro_batch_size, self._pin, base, w, self.num_workers),
                kwargs={"out": self._queues[w], "stop": self._stop},
                name=f"megapatch-loader-{w}",
                daemon=True,
            )
            for w in range(self.num_workers)
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop the background threads (the next `next()` starts them again)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        self._expected = None

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent if __init__ raised
        if stop is not None:
            stop.set()


def _produce(
    sampler: WindowSampler,
    micro_batch_size: int,
    pin: bool,
    base: int,
    worker: int,
    num_workers: int,
    *,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """A background thread: global batches `worker`, `worker + num_workers`, ... counted
    from stream position `base`, split into micro-batches, in order, into `out`."""
    batch = worker
    try:
        while not stop.is_set():
            start = base + batch * sampler.global_batch
            local = torch.empty(
                (sampler.local_batch, sampler.window), dtype=torch.int64, pin_memory=pin
            )  # [G/dp, window]
            sampler.fetch(start, out=local.numpy())
            for m in range(0, sampler.local_batch, micro_batch_size):
                if not _put(out, local[m : m + micro_batch_size], stop):
                    return
            batch += num_workers
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        _put(out, exc, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def eval_windows(
    valid_corpus: Corpus | BlendedCorpus,
    seq_len: int,
    max_windows: int | None = None,
    *,
    patch_size: int = 1,
) -> np.ndarray:
    """Validation windows: int64 [N, K·L + K] (with K = 1: [N, L + 1]).

    Window starts step by K·L, so every token after the first window's first patch is a
    target exactly once. With `max_windows`, an evenly spaced subset (a blend splits it by
    weight). The same windows on every rank and every call.
    """
    if seq_len < 1 or patch_size < 1:
        raise ConfigError(f"eval windows need L ≥ 1 and K ≥ 1, got L={seq_len}, K={patch_size}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be ≥ 1, got {max_windows}")
    stride = patch_size * seq_len
    window = stride + patch_size
    parts = []
    for corpus, weight in sources_of(valid_corpus):
        available = max(0, (corpus.num_tokens - patch_size) // stride)
        if available == 0:
            raise DataError(
                f"{corpus.directory}: the {corpus.split} split has {corpus.num_tokens} tokens, "
                f"fewer than one window of {window}"
            )
        count = available
        if max_windows is not None:
            count = min(available, max(1, round(max_windows * weight)))
        chosen = (np.arange(count, dtype=np.int64) * available) // count
        out = np.empty((count, window), dtype=np.int64)
        for row, i in enumerate(chosen.tolist()):
            corpus.read(i * stride, window, out=out[row])
        parts.append(out)
    return np.concatenate(parts)
