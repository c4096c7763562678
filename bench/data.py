"""Benchmark the data path: tokenization in `megapatch prep`, and window assembly in the loader.

    python bench/data.py                    # the shakespeare sample (fetched once), 32M-token shard
    python bench/data.py --corpus-mb 36 --only tokenize   # a larger corpus, tokenization only
    python bench/data.py --quick            # smaller, a smoke run

Tokenization: the corpus is the sample (synthetic text if it cannot be fetched) or, with
--corpus-mb, the sample followed by the Python standard library's own .py files (path
order, test directories included) up to that size: text new to every cache, as a large
real corpus is. It is prepped with a tokenizer trained beforehand on an even sample of
at most 8 MB of it, with 1 and 2 workers, once with a sentencepiece BPE and once with a
Hugging Face byte-level BPE (tokenizer.json) of the same vocabulary size trained on the
same text. Each prep runs in a fresh process, as `megapatch prep` does, so MB/s counts
input text over the whole prep (read, decode, tokenize, write shards) including the
one-off check of the HF word cache, each worker's start-up and cold word cache (not the
interpreter's start-up and imports). Beside it, single-process encode rates of
sentencepiece on whole documents (the library path), of megapatch's word-cached encoder,
cold and warm, and the same for the HF tokenizer: the library's batch encoding and
megapatch's word cache over it, cold and warm; and the one-off check's seconds in a fresh
process.

Megatron conversion: `prep --from-megatron` of a 128M-token uint16 shard written by
megatron-core's own builder (when installed), zero-copy and rewritten; MB/s of the .bin.

Loader: a random uint16 shard read through build_phase_streams → WindowSampler →
PrefetchLoader with K=4, L=2048 (windows of K·L+K tokens); tokens/s counts the K·L input
tokens of each window handed out. Beside it, torch's DataLoader over a map-style dataset of
the same windows. Targets on a 2-core machine: loader ≥ 50M tokens/s, tokenization
≥ 3 MB/s per worker. Writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import PrepConfig, prepare, train_tokenizer  # noqa: E402
from data_prep.sample import fetch_sample  # noqa: E402
from megapatch.data import (  # noqa: E402
    PrefetchLoader,
    SentencePieceTokenizer,
    WindowSampler,
    build_phase_streams,
    load_tokenizer,
    open_corpus,
)
from megapatch.data.hf_tokenizer import train_bpe  # noqa: E402
from megapatch.errors import MegapatchError  # noqa: E402
from tests.data.helpers import synthetic_text, write_prep  # noqa: E402

LOADER_TARGET = 50e6  # tokens/s
TOKENIZE_TARGET = 3.0  # MB/s per worker


TRAIN_SAMPLE_MB = 8.0  # the tokenizers are trained on at most about this much of the corpus


def corpus_texts(quick: bool, workdir: Path, corpus_mb: float | None) -> tuple[str, list[Path]]:
    try:
        paths = fetch_sample("shakespeare")
        name = "shakespeare sample"
    except MegapatchError as exc:
        print(f"(shakespeare sample unavailable: {exc}; using synthetic text)", file=sys.stderr)
        paths = []
        for i in range(40):
            path = workdir / f"synthetic-{i:02d}.txt"
            path.write_text(synthetic_text(i, 25000), encoding="utf-8")
            paths.append(path)
        name = "synthetic text"
    if quick:
        paths = paths[:8]
    if corpus_mb:
        paths = paths + _stdlib_sources(workdir / "stdlib", corpus_mb * 1e6 - _size(paths))
        name += " + Python standard library sources"
    return name, paths


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _stdlib_sources(directory: Path, budget: float) -> list[Path]:
    """The standard library's .py files (UTF-8 ones, in path order) as .txt documents, up
    to `budget` bytes."""
    directory.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    for source in sorted(stdlib.rglob("*.py")):
        if budget <= 0:
            break
        if "site-packages" in source.relative_to(stdlib).parts:
            continue
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        path = directory / f"{len(out):05d}.txt"
        path.write_text(text, encoding="utf-8")
        budget -= path.stat().st_size
        out.append(path)
    if budget > 0:
        print(f"(the standard library ran out {budget / 1e6:.1f} MB short)", file=sys.stderr)
    return out


def _even_sample(texts: list[str], limit_mb: float) -> list[str]:
    """Every k-th text, so that they hold at most about `limit_mb` MB."""
    total = sum(len(t.encode()) for t in texts) / 1e6
    return texts[:: max(1, math.ceil(total / limit_mb))]


# Runs one prep in a fresh process (as `megapatch prep` does: nothing cached from this one)
# and prints its seconds, CPU seconds (with its workers) and tokens as JSON.
_PREP_DRIVER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from data_prep import PrepConfig, prepare
def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
start = cpu()
result = prepare(PrepConfig(**json.loads(sys.argv[2])))
print(json.dumps({"seconds": result.seconds, "cpu": cpu() - start,
                  "tokens": sum(result.num_tokens.values())}))
"""
# The one-off check of the HF word cache at first use, in a fresh process.
_CHECK_DRIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from megapatch.data import load_tokenizer
tok = load_tokenizer(sys.argv[2])
start, cpu = time.perf_counter(), time.process_time()
tok.prepare()
print(time.perf_counter() - start, time.process_time() - cpu, tok._splitter is not None)
"""


def _fresh_process(driver: str, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", driver, str(ROOT), *args], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1])
    return run.stdout.strip().splitlines()[-1]


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have finished."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_tokenize(paths: list[Path], workdir: Path, vocab_size: int, repeats: int) -> dict:
    texts = [p.read_text(encoding="utf-8") for p in paths]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sample = _even_sample(texts, TRAIN_SAMPLE_MB)
    model = train_tokenizer(sample, vocab_size)
    tokenizer_paths = {"sentencepiece": workdir / "bench.model"}
    tokenizer_paths["sentencepiece"].write_bytes(model)
    # The same text and vocabulary size through a Hugging Face byte-level BPE.
    bpe = train_bpe(sample, vocab_size)
    (workdir / "hf").mkdir()
    tokenizer_paths["huggingface"] = bpe.save(workdir / "hf")
    checks = []
    for _ in range(repeats):
        wall, cpu, on = _fresh_process(_CHECK_DRIVER, str(tokenizer_paths["huggingface"])).split()
        checks.append((float(wall), float(cpu)))
        assert on == "True", "the word cache is off for a trained byte-level BPE"

    def encode_all(encode) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for t in texts:
            encode(t)
        return time.perf_counter() - wall, _cpu_seconds() - cpu

    def encode_batches(encode_batch) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for i in range(0, len(texts), 8):  # as prep does: a chunk's documents in one call
            encode_batch(texts[i : i + 8])
        return time.perf_counter() - wall, _cpu_seconds() - cpu

    encode: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):  # best of `repeats`: other processes only ever slow a run down
        tok = SentencePieceTokenizer(model)  # a cold word cache each time
        encode.setdefault("sentencepiece encode, whole documents", []).append(
            encode_all(tok.encode_plain)
        )
        encode.setdefault("megapatch encode, cold word cache", []).append(encode_all(tok.encode))
        encode.setdefault("megapatch encode, warm word cache", []).append(encode_all(tok.encode))
        hf = load_tokenizer(tokenizer_paths["huggingface"])
        hf.prepare()  # the one-off check, timed on its own above (in a fresh process)
        encode.setdefault("HF tokenizers encode_batch_fast (library path)", []).append(
            encode_batches(hf.encode_plain_batch)
        )
        encode.setdefault("megapatch HF encode, cold word cache", []).append(
            encode_batches(hf.encode_batch)
        )
        encode.setdefault("megapatch HF encode, warm word cache", []).append(
            encode_batches(hf.encode_batch)
        )

    preps: dict[tuple[str, int], list[tuple[float, float]]] = {
        (kind, workers): [] for kind in tokenizer_paths for workers in (1, 2)
    }
    tokens = {}
    for rep in range(repeats):
        for kind, workers in preps:
            config = {
                "out": str(workdir / f"prep-{kind}-{workers}-{rep}"),
                "inputs": [str(p) for p in paths],
                "tokenizer": str(tokenizer_paths[kind]),
                "valid_fraction": 0.05,
                "workers": workers,
                "progress": False,
            }
            result = json.loads(_fresh_process(_PREP_DRIVER, json.dumps(config)))
            preps[kind, workers].append((result["seconds"], result["cpu"]))
            tokens[kind] = result["tokens"]
    same = {
        kind: all(
            (workdir / f"prep-{kind}-1-0" / f.name).read_bytes() == f.read_bytes()
            for f in (workdir / f"prep-{kind}-2-0").iterdir()
        )
        for kind in tokenizer_paths
    }

    def best(runs):
        wall = min(w for w, _ in runs)
        cpu = min(c for _, c in runs)
        return {"MB/s": mb / wall, "MB/s of CPU time": mb / cpu, "seconds": wall}

    prep_rows = {}
    for (kind, workers), runs in preps.items():
        row = best(runs)
        row["MB/s per worker"] = row["MB/s"] / workers
        row["tokens/s"] = tokens[kind] / row["seconds"]
        prep_rows[f"{kind}, {workers} worker{'s' if workers > 1 else ''}"] = row
    return {
        "corpus_MB": mb,
        "documents": len(texts),
        "tokenizer_sample_MB": sum(len(t.encode()) for t in sample) / 1e6,
        "vocab_size": vocab_size,
        "hf_word_cache_check_seconds": {
            "wall": min(w for w, _ in checks),
            "cpu": min(c for _, c in checks),
        },
        "encode": {label: best(runs) for label, runs in encode.items()},
        "prep": prep_rows,
        "outputs_identical_across_workers": same,
    }


def bench_megatron(workdir: Path, num_tokens: int, repeats: int) -> dict | None:
    """`prep --from-megatron` of one uint16 shard written by megatron-core's builder:
    zero-copy (documents ending with EOS, no validation split) and rewritten (EOS appended
    to each document, 1% held out). MB/s counts the shard's .bin."""
    try:
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no Transformer Engine / Apex
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    except ImportError:
        print("(megatron-core not installed: no --from-megatron rows)", file=sys.stderr)
        return None
    tok_dir = workdir / "megatron-tok"
    tok_dir.mkdir()
    tokenizer = train_bpe([synthetic_text(0, 2000)], 1024)  # EOS is id 0
    tokenizer.save(tok_dir)
    vocab = tokenizer.vocab_size
    rng = np.random.default_rng(0)
    prefixes = {}
    for name, eos in (("with-eos", True), ("without-eos", False)):
        builder = IndexedDatasetBuilder(str(workdir / f"{name}.bin"), dtype=np.uint16)
        for doc in np.split(
            rng.integers(1, vocab, num_tokens, dtype=np.uint16), num_tokens // 4096
        ):
            if eos:
                doc[-1] = 0
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        builder.finalize(str(workdir / f"{name}.idx"))
        prefixes[name] = str(workdir / name)
    rows = {}
    for label, name, fraction in (
        ("zero-copy (hard links, checks every id)", "with-eos", 0.0),
        ("rewritten (EOS appended, 1% held out)", "without-eos", 0.01),
    ):
        runs = []
        for rep in range(repeats):
            config = PrepConfig(
                out=str(workdir / f"megatron-{name}-{rep}"),
                from_megatron=[prefixes[name]],
                tokenizer=str(tok_dir),
                valid_fraction=fraction,
                progress=False,
            )
            runs.append(prepare(config).seconds)
        mb = Path(prefixes[name] + ".bin").stat().st_size / 1e6
        rows[label] = {"MB/s": mb / min(runs), "seconds": min(runs), "MB": mb}
    return rows


def bench_loader(workdir: Path, num_tokens: int, steps: int, repeats: int = 3) -> dict:
    K, L, G, micro = 4, 2048, 16, 4
    rng = np.random.default_rng(0)
    docs = np.split(rng.integers(4, 32000, size=num_tokens, dtype=np.uint16), num_tokens // 50_000)
    path = write_prep(workdir / "shard", {"train": [d[:-1] for d in docs]}, vocab_size=32000)
    corpus = open_corpus(path)
    stream = build_phase_streams(
        corpus, total_tokens=corpus.num_tokens, patch_fraction=1.0, patch_size=K, seq_len=L
    )["patch"]
    corpus.read(0, corpus.num_tokens)  # page the shard in: measure assembly, not the disk
    tokens_per_micro = micro * K * L  # the K·L input tokens of each window

    def prefetch_loader() -> float:
        loader = PrefetchLoader(WindowSampler(stream, global_batch=G), micro, prefetch=4)
        for _ in range(8):  # threads started, queue full
            next(loader)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(loader)
        seconds = time.perf_counter() - start
        loader.close()
        assert batch.shape == (micro, K * L + K) and batch.dtype == torch.int64
        return steps * tokens_per_micro / seconds

    def sampler_fetch() -> float:
        sampler = WindowSampler(stream, global_batch=G)
        batches = steps * micro // G
        start = time.perf_counter()
        for b in range(batches):
            sampler.fetch(b * G)
        return batches * G * K * L / (time.perf_counter() - start)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return stream.windows_per_epoch

        def __getitem__(self, i):
            return torch.from_numpy(stream.get(i))

    def torch_dataloader() -> float:
        it = iter(torch.utils.data.DataLoader(Windows(), batch_size=micro, num_workers=0))
        n = min(steps, stream.windows_per_epoch // micro - 1)
        start = time.perf_counter()
        for _ in range(n):
            next(it)
        return n * tokens_per_micro / (time.perf_counter() - start)

    cases = {
        "PrefetchLoader (1 thread)": prefetch_loader,
        "WindowSampler.fetch, no thread": sampler_fetch,
        "torch DataLoader, map-style, num_workers=0": torch_dataloader,
    }
    runs = {label: [] for label in cases}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for label, case in cases.items():
            runs[label].append(case())
    return {
        "K": K,
        "L": L,
        "micro_batch": micro,
        "shard_tokens": corpus.num_tokens,
        "tokens_per_s": {label: max(r) for label, r in runs.items()},
    }


def print_tokenize(tokenize: dict) -> None:
    print(
        f"\ntokenization: {tokenize['corpus']}, {tokenize['corpus_MB']:.1f} MB in "
        f"{tokenize['documents']} documents, vocab {tokenize['vocab_size']} (tokenizers trained "
        f"on {tokenize['tokenizer_sample_MB']:.1f} MB of it)"
    )
    check = tokenize["hf_word_cache_check_seconds"]
    print(
        f"  HF word cache check at first use, fresh process: {check['wall']:.2f} s "
        f"({check['cpu']:.2f} s CPU)"
    )
    print(f"  {'path (best of repeats)':<50} {'MB/s':>6} {'MB/s of CPU time':>17}")
    for label, row in tokenize["encode"].items():
        print(f"  {label + ', 1 process':<50} {row['MB/s']:>6.2f} {row['MB/s of CPU time']:>17.2f}")
    for name, row in tokenize["prep"].items():
        label = f"megapatch prep, {name} (whole prep)"
        ok = "ok" if row["MB/s per worker"] >= TOKENIZE_TARGET else "below target"
        print(
            f"  {label:<50} {row['MB/s']:>6.2f} {row['MB/s of CPU time']:>17.2f}   "
            f"{row['MB/s per worker']:.2f} MB/s per worker (target ≥ {TOKENIZE_TARGET}: {ok})"
        )
    identical = tokenize["outputs_identical_across_workers"]
    print(f"  outputs byte-identical for 1 and 2 workers: {identical}")


def print_loader(loader: dict) -> None:
    print(f"\nloader: K={loader['K']}, L={loader['L']}, micro-batch {loader['micro_batch']}, "
          f"{loader['shard_tokens'] / 1e6:.0f}M-token shard")  # fmt: skip
    base = loader["tokens_per_s"]["torch DataLoader, map-style, num_workers=0"]
    print(f"  {'path (best of 3)':<50} {'M tokens/s':>10} {'vs torch':>9}")
    for label, value in loader["tokens_per_s"].items():
        print(f"  {label:<50} {value / 1e6:>10.1f} {value / base:>8.1f}×")
    ours = loader["tokens_per_s"]["PrefetchLoader (1 thread)"]
    verdict = "ok" if ours >= LOADER_TARGET else "below target"
    print(f"  target ≥ {LOADER_TARGET / 1e6:.0f}M tokens/s: {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument(
        "--corpus-mb", type=float, default=None,
        help="tokenize a corpus of about this many MB: the sample, then the Python standard "
        "library's sources (default: the sample alone)",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", choices=("tokenize", "megatron", "loader"),
        help="run only these parts (repeatable; default: all)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="best of this many runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = parser.parse_args()
    parts = set(args.only or ("tokenize", "megatron", "loader"))
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()  # other processes on a shared machine slow wall-clock rates

    tokenize = megatron = loader = None
    with tempfile.TemporaryDirectory(prefix="megapatch-bench-") as tmp:
        workdir = Path(tmp)
        if "tokenize" in parts:
            name, paths = corpus_texts(args.quick, workdir, args.corpus_mb)
            vocab_size = 1024 if args.quick else 4096
            tokenize = bench_tokenize(paths, workdir, vocab_size, repeats)
            tokenize["corpus"] = name
        if "megatron" in parts:
            megatron = bench_megatron(workdir, 1 << 22 if args.quick else 1 << 27, repeats)
        if "loader" in parts:
            loader = bench_loader(
                workdir, 4_000_000 if args.quick else 32_000_000, 40 if args.quick else 400
            )

    if tokenize:
        print_tokenize(tokenize)
    if megatron:
        print("\nprep --from-megatron, one uint16 shard (best of repeats)")
        for label, row in megatron.items():
            print(
                f"  {label:<50} {row['MB/s']:>8.0f} MB/s ({row['MB']:.0f} MB in {row['seconds']:.2f} s)"
            )
    if loader:
        print_loader(loader)
    load_at_end = os.getloadavg()
    print(f"\nload average (1 min) at start {load_at_start[0]:.1f}, at end {load_at_end[0]:.1f} "
          f"on {os.cpu_count()} cores")  # fmt: skip

    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": load_at_end,
        },
        "quick": args.quick,
        "command": " ".join(["python", "bench/data.py", *sys.argv[1:]]),
        "targets": {
            "loader_tokens_per_s": LOADER_TARGET,
            "tokenize_MB_per_s_per_worker": TOKENIZE_TARGET,
        },
        "tokenization": tokenize,
        "megatron_conversion": megatron,
        "loader": loader,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
