"""Training data: memory-mapped token shards, blends, phase streams of K·L windows, and the
prefetching loader.

    corpus = open_corpus("data/shakespeare")                      # or [{"path", "weight"}, ...]
    streams = build_phase_streams(corpus, total_tokens=T, patch_fraction=2/3,
                                  patch_size=4, seq_len=256, seed=0)
    sampler = WindowSampler(streams["patch"], global_batch=G, dp_rank=r, dp_size=dp)
    for micro_batch in PrefetchLoader(sampler, micro_batch_size, device):   # int64 [B, K·L+K]
        ...
"""

from megapatch.data.corpus import BlendedCorpus, Corpus, open_corpus
from megapatch.data.hf_tokenizer import HFTokenizer
from megapatch.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from megapatch.data.manifest import MANIFEST_NAME, read_manifest
from megapatch.data.sampler import (
    PhaseStream,
    WindowSampler,
    build_phase_streams,
    build_stage_streams,
)
from megapatch.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "IndexedDataset",
    "IndexedDatasetWriter",
    "token_dtype",
    "Corpus",
    "BlendedCorpus",
    "open_corpus",
    "read_manifest",
    "MANIFEST_NAME",
    "PhaseStream",
    "build_phase_streams",
    "build_stage_streams",
    "WindowSampler",
    "PrefetchLoader",
    "eval_windows",
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]


def __getattr__(name):
    # The loader imports torch; `megapatch prep` and its worker processes never need it.
    if name in ("PrefetchLoader", "eval_windows"):
        from megapatch.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
