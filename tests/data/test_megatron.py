"""`megapatch prep --from-megatron`: shards written by megatron-core's own
IndexedDatasetBuilder become a megapatch prep with the same ids, zero-copy where the layout
allows; a tokenizer too small for the ids is refused."""

import os

import numpy as np
import pytest

from data_prep import PrepConfig, prepare
from data_prep.output import _is_valid, is_valid_mask
from megapatch.data import open_corpus, read_manifest
from megapatch.data.hf_tokenizer import train_bpe
from megapatch.errors import ConfigError
from tests.data.helpers import synthetic_text
from tests.data.test_prep_errors import _fails

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # no Transformer Engine/Apex
    pytest.mark.slow,  # importing megatron-core (and torch) takes several seconds
]


@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("torch")
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_bpe([synthetic_text(s, 2000) for s in range(3)], vocab_size=400).save(directory)
    return directory  # EOS (<|endoftext|>) is id 0


def _docs(seed: int, n: int, eos: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 400, size=int(rng.integers(1, 60))) for _ in range(n)]
    return [np.append(d, 0) if eos else d for d in docs]


def _write(megatron, prefix, docs, dtype=np.uint16, sentences=False):
    import torch

    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        if sentences and len(doc) > 2:  # a document of two sequences
            half = len(doc) // 2
            builder.add_document(torch.tensor(doc), [half, len(doc) - half])
        else:
            builder.add_document(torch.tensor(doc), [len(doc)])
    builder.add_document(torch.tensor([], dtype=torch.int64), [])  # an empty document
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _prep(out, prefixes, tokenizer, **kw):
    kw.setdefault("valid_fraction", 0.0)
    config = PrepConfig(out=str(out), from_megatron=prefixes, tokenizer=str(tokenizer), **kw)
    return prepare(config)


def _split_docs(out, split):
    corpus = open_corpus(out, split)
    return [s.document(i).tolist() for s in corpus.shards for i in range(s.num_documents)]


def test_shards_with_eos_are_linked_zero_copy(megatron, tokenizer_dir, tmp_path):
    docs = [_docs(1, 40, eos=True), _docs(2, 25, eos=True)]
    prefixes = [_write(megatron, tmp_path / f"m{i}", d) for i, d in enumerate(docs)]
    result = _prep(tmp_path / "out", prefixes, tokenizer_dir, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["megatron"] == {"zero_copy": True} and manifest["dtype"] == "uint16"
    assert result.num_documents == {"train": 65, "valid": 0}  # the empty documents dropped
    for i, prefix in enumerate(prefixes):  # the very same file, no copy
        assert os.path.samefile(f"{prefix}.bin", tmp_path / "out" / f"train-{i:05d}.bin")
    assert _split_docs(tmp_path / "out", "train") == [d.tolist() for d in docs[0] + docs[1]]
    # Megatron's own reader agrees on the documents it wrote.
    theirs = megatron.IndexedDataset(prefixes[1])
    assert theirs[3].tolist() == docs[1][3].tolist()


def test_other_layouts_are_rewritten_with_eos_and_a_validation_split(
    megatron, tokenizer_dir, tmp_path
):
    docs = [_docs(3, 50, eos=False), _docs(4, 30, eos=True)]
    prefixes = [
        _write(megatron, tmp_path / "a", docs[0], dtype=np.int32, sentences=True),
        _write(megatron, tmp_path / "b", docs[1]),
    ]
    _prep(tmp_path / "out", prefixes, tokenizer_dir, valid_fraction=0.1, shard_tokens=500,
          progress=True)  # fmt: skip
    manifest = read_manifest(tmp_path / "out")
    assert manifest["megatron"] == {"zero_copy": False}
    assert len(manifest["splits"]["train"]["shards"]) > 2
    expected = [np.append(d, 0).tolist() for d in docs[0]] + [d.tolist() for d in docs[1]]
    held_out = [_is_valid(i, 0.1) for i in range(len(expected))]
    assert _split_docs(tmp_path / "out", "train") == [
        d for d, v in zip(expected, held_out) if not v
    ]
    assert _split_docs(tmp_path / "out", "valid") == [d for d, v in zip(expected, held_out) if v]
    for shard in open_corpus(tmp_path / "out").shards[:-1]:  # shards end at documents
        assert shard.num_tokens >= 500 and shard.tokens[-1] == 0
    # Small blocks give the same bytes as large ones.
    import data_prep.megatron as converter

    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    converter.BLOCK_TOKENS, saved = 37, converter.BLOCK_TOKENS
    try:
        _prep(tmp_path / "out", prefixes, tokenizer_dir, valid_fraction=0.1, shard_tokens=500,
              progress=False, overwrite=True)  # fmt: skip
    finally:
        converter.BLOCK_TOKENS = saved
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_vectorized_split_matches_the_text_prep():
    for fraction in (0.0, 0.01, 0.1, 1 / 3, 0.5):
        assert is_valid_mask(5, 300, fraction).tolist() == [
            _is_valid(i, fraction) for i in range(5, 305)
        ]


def test_bad_shards_and_tokenizers(megatron, tokenizer_dir, tmp_path, capsys):
    big = _write(megatron, tmp_path / "big", [np.array([5, 399, 400, 0])])
    common = ["--tokenizer", tokenizer_dir, "--out", tmp_path / "o"]
    _fails(capsys, ["--from-megatron", big, *common],
           "big.bin: token id 400 (token 2) does not fit the tokenizer", "of 400 tokens")  # fmt: skip
    _fails(capsys, ["--from-megatron", tmp_path / "none", *common],
           "--from-megatron", "none.idx not found")  # fmt: skip
    _fails(capsys, ["--from-megatron", big, "--out", tmp_path / "o"], "needs --tokenizer PATH")
    ok = _write(megatron, tmp_path / "ok", _docs(5, 10, eos=True))
    idx = tmp_path / "ok.idx"
    idx.write_bytes(idx.read_bytes()[:-5])
    _fails(capsys, ["--from-megatron", ok, *common], "ok.idx: truncated")
    (tmp_path / "x.idx").write_bytes(b"MPTOKIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    _fails(capsys, ["--from-megatron", tmp_path / "x.bin", *common],
           "x.idx: not a Megatron indexed dataset")  # fmt: skip
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="pass no INPUTs"):
        prepare(PrepConfig(out=str(tmp_path / "o"), inputs=["a.txt"], from_megatron=[big],
                           tokenizer=str(tokenizer_dir)))  # fmt: skip
