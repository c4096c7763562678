"""Small corpora for the data tests: synthetic text, and prep directories written straight
from token arrays (no tokenizer training) so sampler tests stay fast."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from megapatch.data.indexed import IndexedDatasetWriter, token_dtype
from megapatch.data.manifest import FORMAT, FORMAT_VERSION, write_manifest

WORDS = (
    "the of and to a in that is was he for it with as his on be at by I this had not are "
    "but from or have an they which one you were her all she there would their we him been "
    "has when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people Mr how too little state good "
    "very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against "
    "go came right used take three café naïve Zürich 東京 Ελλάδα москва 🙂"
).split()


def synthetic_text(seed: int, n_words: int) -> str:
    """Pseudo-prose: words, numbers, punctuation, line breaks and some non-ASCII."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(WORDS) + 40, size=n_words).tolist():
        word = WORDS[i] if i < len(WORDS) else str(int(rng.integers(0, 10**i % 100000 + 10)))
        out.append(word)
        r = rng.random()
        if r < 0.06:
            out.append(".\n\n" if r < 0.02 else ",\n")
        elif r < 0.08:
            out.append("  ")
        else:
            out.append(" ")
    return "".join(out).strip() + "\n"


def write_prep(
    directory: Path,
    splits: dict[str, list[np.ndarray]],
    *,
    vocab_size: int,
    eos_id: int = 2,
    shard_docs: int | None = None,
) -> Path:
    """A prep directory holding `splits` (documents without EOS; EOS is appended)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = b"not a real model: these tests never decode"
    (directory / "tokenizer.model").write_bytes(tokenizer)
    dtype = token_dtype(vocab_size)
    info = {}
    for split, docs in splits.items():
        shards = []
        per_shard = shard_docs or max(1, len(docs))
        for s, first in enumerate(range(0, len(docs), per_shard)):
            name = f"{split}-{s:05d}"
            w = IndexedDatasetWriter(directory / name, dtype)
            for doc in docs[first : first + per_shard]:
                w.add_document(np.append(np.asarray(doc), eos_id))
            w.close()
            shards.append(
                {"name": name, "num_tokens": w.num_tokens, "num_documents": w.num_documents}
            )
        info[split] = {
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": hashlib.sha256(tokenizer).hexdigest(),
            "bos_id": 1,
            "eos_id": eos_id,
            "pad_id": 3,
            "unk_id": 0,
        },
        "splits": info,
    }
    write_manifest(directory, manifest)
    return directory


def counting_prep(directory: Path, num_tokens: int, *, doc_len: int = 97, offset: int = 0) -> Path:
    """A train split whose token at concatenated position i is (offset + i) % 60000 + 4,
    except EOS (2) closing every document: so a window's tokens reveal where it was read."""
    docs = []
    pos = 0
    while pos < num_tokens:
        n = min(doc_len - 1, num_tokens - pos - 1)
        docs.append((np.arange(pos, pos + n) + offset) % 60000 + 4)
        pos += n + 1
    return write_prep(directory, {"train": docs}, vocab_size=60004)


def position_of(window: np.ndarray, offset: int = 0) -> int:
    """Where a window of a `counting_prep` corpus starts (from its first non-EOS token)."""
    k = int(np.argmax(window != 2))
    return (int(window[k]) - 4 - offset) % 60000 - k
