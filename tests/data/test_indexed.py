import numpy as np
import pytest

from megapatch.data import IndexedDataset, IndexedDatasetWriter, open_corpus, token_dtype
from megapatch.data.indexed import HEADER_SIZE
from megapatch.errors import DataError
from tests.data.helpers import write_prep


def _write(path, docs, dtype):
    w = IndexedDatasetWriter(path, dtype)
    for d in docs:
        w.add_document(np.asarray(d))
    w.close()
    return path


def test_round_trip_uint16(tmp_path):
    docs = [[5, 6, 7, 2], [2], [9, 9, 2]]
    _write(tmp_path / "s", docs, np.uint16)
    ds = IndexedDataset(tmp_path / "s.bin")
    assert ds.dtype == np.uint16
    assert isinstance(ds.tokens, np.memmap)
    assert ds.num_tokens == 8 and ds.num_documents == 3
    assert [ds.document(i).tolist() for i in range(3)] == docs
    assert IndexedDataset(tmp_path / "s.idx").num_tokens == 8  # any of prefix, .bin, .idx
    assert IndexedDataset(tmp_path / "s").num_tokens == 8


def test_uint32_ids_above_uint16(tmp_path):
    big = [70000, 2**32 - 1, 65536, 2]
    _write(tmp_path / "s", [big], np.uint32)
    ds = IndexedDataset(tmp_path / "s")
    assert ds.dtype == np.uint32
    assert ds.document(0).tolist() == big


def test_token_dtype_choice():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(DataError, match="does not fit uint32"):
        token_dtype(2**32 + 1)


def test_truncated_bin_names_the_file(tmp_path):
    _write(tmp_path / "s", [[1, 2, 3, 4]], np.uint16)
    bin_path = tmp_path / "s.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"s\.bin: truncated: 5 bytes, the index says 4 uint16"):
        IndexedDataset(tmp_path / "s")


def test_truncated_idx(tmp_path):
    _write(tmp_path / "s", [[1, 2], [3]], np.uint16)
    idx = tmp_path / "s.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"s\.idx: truncated"):
        IndexedDataset(tmp_path / "s")
    idx.write_bytes(idx.read_bytes()[:10])
    with pytest.raises(DataError, match="shorter than the header"):
        IndexedDataset(tmp_path / "s")


def test_wrong_magic(tmp_path):
    _write(tmp_path / "s", [[1, 2]], np.uint16)
    idx = tmp_path / "s.idx"
    idx.write_bytes(b"NOTMAGIC" + idx.read_bytes()[8:])
    with pytest.raises(DataError, match=r"s\.idx: not a megapatch shard index \(wrong magic"):
        IndexedDataset(tmp_path / "s")


def test_corrupt_offsets(tmp_path):
    _write(tmp_path / "s", [[1, 2], [3, 4]], np.uint16)
    idx = tmp_path / "s.idx"
    data = bytearray(idx.read_bytes())
    data[HEADER_SIZE + 8 : HEADER_SIZE + 16] = (7).to_bytes(8, "little")  # offset 7 > 4 tokens
    idx.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt document offsets"):
        IndexedDataset(tmp_path / "s")


def test_missing_bin(tmp_path):
    _write(tmp_path / "s", [[1]], np.uint16)
    (tmp_path / "s.bin").unlink()
    with pytest.raises(DataError, match=r"s\.bin: missing"):
        IndexedDataset(tmp_path / "s")


def test_dtype_mismatch_against_manifest(tmp_path):
    write_prep(tmp_path / "p", {"train": [np.arange(4, 50)]}, vocab_size=1000)
    # Rewrite the shard as uint32 (consistent in itself): the manifest still says uint16.
    _write(tmp_path / "p" / "train-00000", [np.append(np.arange(4, 50), 2)], np.uint32)
    with pytest.raises(DataError, match=r"token dtype is uint32 but the manifest says uint16"):
        open_corpus(tmp_path / "p")


def test_manifest_counts_must_match_shards(tmp_path):
    write_prep(tmp_path / "p", {"train": [np.arange(4, 50)]}, vocab_size=1000)
    _write(tmp_path / "p" / "train-00000", [np.arange(4, 20)], np.uint16)
    with pytest.raises(DataError, match="but .*manifest.json says 47"):
        open_corpus(tmp_path / "p")


def test_corpus_reads_across_shards(tmp_path):
    docs = [np.arange(10 * i + 4, 10 * i + 13) for i in range(7)]  # 9 tokens + EOS each
    write_prep(tmp_path / "p", {"train": docs}, vocab_size=1000, shard_docs=2)
    corpus = open_corpus(tmp_path / "p")
    assert len(corpus.shards) == 4
    flat = np.concatenate([np.append(d, 2) for d in docs])
    assert corpus.num_tokens == len(flat) == 70
    for start, length in [(0, 70), (15, 10), (19, 21), (39, 1), (60, 10)]:
        assert corpus.read(start, length).tolist() == flat[start : start + length].tolist()
    out = np.empty(25, dtype=np.int64)
    corpus.read(18, 25, out=out)
    assert out.tolist() == flat[18:43].tolist()
    with pytest.raises(IndexError):
        corpus.read(60, 11)
