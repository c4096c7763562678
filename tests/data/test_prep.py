import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import data_prep.pipeline as pipeline
from data_prep import PrepConfig, prepare
from data_prep.pipeline import _is_valid
from data_prep.sources import _text_blocks, resolve_inputs, sample_documents
from megapatch.data import (
    IndexedDataset,
    SentencePieceTokenizer,
    Tokenizer,
    open_corpus,
    read_manifest,
)
from megapatch.errors import DataError
from tests.data.helpers import synthetic_text


def _corpus(root: Path) -> list[str]:
    """A small mixed corpus (txt, jsonl, .gz, .zst) under root; returns its documents in
    the order prep reads them (files sorted by path)."""
    docs = {}
    (root / "b").mkdir(parents=True)
    for i in range(3):
        text = synthetic_text(100 + i, 300 + 50 * i)
        (root / f"a{i}.txt").write_text(text, encoding="utf-8")
        docs[f"a{i}.txt"] = [text]
    jsonl = [synthetic_text(200 + i, 40 + i) for i in range(12)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl)]
    (root / "b" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs["b/c.jsonl"] = jsonl
    gz = [synthetic_text(300 + i, 60) for i in range(5)]
    with gzip.open(root / "b" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    docs["b/d.jsonl.gz"] = gz
    zs = [synthetic_text(400 + i, 60) for i in range(5)]
    payload = "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()
    (root / "b" / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    docs["b/e.jsonl.zst"] = zs
    return [d for name in sorted(docs) for d in docs[name]]


def _prep(out, inputs, **kw):
    kw.setdefault("vocab_size", 400)
    kw.setdefault("progress", False)
    return prepare(PrepConfig(out=str(out), inputs=[str(i) for i in inputs], **kw))


def _documents(directory: Path, split: str) -> list[str]:
    corpus = open_corpus(directory, split)
    tok = Tokenizer.from_file(corpus.tokenizer_path)
    out = []
    for shard in corpus.shards:
        for i in range(shard.num_documents):
            doc = shard.document(i)
            assert doc[-1] == corpus.eos_id and (doc[:-1] != corpus.eos_id).all()
            out.append(tok.decode(doc[:-1]))
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, _corpus(root)


def test_prep_writes_shards_tokenizer_and_manifest(corpus_dir, tmp_path):
    root, docs = corpus_dir
    result = _prep(tmp_path / "out", [root], valid_fraction=0.2)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "manifest.json", "tokenizer.model",
        "train-00000.bin", "train-00000.idx", "valid-00000.bin", "valid-00000.idx",
    ]  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    assert manifest["tokenizer"]["eos_id"] == 2 and manifest["tokenizer"]["trained"]
    assert [s["path"].split("corpus")[-1][2:] for s in manifest["sources"]] == [
        "a0.txt", "a1.txt", "a2.txt", "b/c.jsonl", "b/d.jsonl.gz", "b/e.jsonl.zst",
    ]  # fmt: skip
    assert manifest["prep_args"]["vocab_size"] == 400
    assert result.num_documents == {"train": 20, "valid": 5}

    # Every document comes back intact, held-out ones evenly spaced, in input order.
    is_valid = [_is_valid(i, 0.2) for i in range(len(docs))]
    assert _documents(out, "train") == [d for d, v in zip(docs, is_valid) if not v]
    assert _documents(out, "valid") == [d for d, v in zip(docs, is_valid) if v]
    assert sum(is_valid) == round(0.2 * len(docs))


def test_output_is_byte_identical_whatever_the_workers(corpus_dir, tmp_path):
    root, _ = corpus_dir
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        _prep(out, [root], workers=workers, chunk_bytes=1500, shard_tokens=1000)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(outputs[0]) > 6  # several shards
    assert outputs[0] == outputs[1] == outputs[2]


def test_big_text_file_is_one_document_read_in_blocks(tmp_path, tiny_tokenizer_model):
    text = synthetic_text(7, 6000) + "x" * 5000 + " tail\n"  # one 5 kB "word" too
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    model = tmp_path / "tiny.model"
    model.write_bytes(tiny_tokenizer_model)
    _prep(tmp_path / "out", [tmp_path / "big.txt"], vocab_size=None, tokenizer=str(model),
          valid_fraction=0.0, chunk_bytes=700)  # fmt: skip
    ds = IndexedDataset(tmp_path / "out" / "train-00000")
    assert ds.num_documents == 1
    tok = SentencePieceTokenizer(tiny_tokenizer_model)
    assert ds.tokens[:-1].tolist() == tok.encode_plain(text).tolist()


def test_shards_roll_over_at_document_boundaries(corpus_dir, tmp_path):
    root, _ = corpus_dir
    _prep(tmp_path / "one", [root], valid_fraction=0.0)
    _prep(tmp_path / "many", [root], valid_fraction=0.0, shard_tokens=1000)
    one, many = open_corpus(tmp_path / "one"), open_corpus(tmp_path / "many")
    assert len(one.shards) == 1 and len(many.shards) > 3
    assert one.read(0, one.num_tokens).tolist() == many.read(0, many.num_tokens).tolist()
    for shard in many.shards[:-1]:
        assert shard.num_tokens >= 1000 and shard.tokens[-1] == many.eos_id
    assert read_manifest(tmp_path / "many")["splits"]["valid"]["shards"] == []
    with pytest.raises(DataError, match="has no 'valid' split"):
        open_corpus(tmp_path / "many", "valid")


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path):
    lines = [
        json.dumps({"text": synthetic_text(1, 50)}),
        "{not json",
        json.dumps({"body": "wrong key"}),
        json.dumps({"text": None}),
        json.dumps(["a list"]),
        "",
        json.dumps({"text": ""}),
        json.dumps({"text": synthetic_text(2, 50)}),
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    result = _prep(tmp_path / "out", [tmp_path / "x.jsonl"], valid_fraction=0.0)
    assert result.num_documents["train"] == 2
    assert result.skipped == {"bad JSON": 2, "missing text": 2, "empty document": 1}
    assert read_manifest(tmp_path / "out")["skipped"] == result.skipped
    with pytest.raises(DataError, match=r"x\.jsonl:2: bad JSON: .*drop --strict"):
        _prep(tmp_path / "strict", [tmp_path / "x.jsonl"], strict=True)
    assert not (tmp_path / "strict").exists()


def test_text_key_option(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": synthetic_text(1, 80)}) + "\n")
    result = _prep(tmp_path / "out", [tmp_path / "x.jsonl"], text_key="body", valid_fraction=0.0)
    assert result.num_documents["train"] == 1


def test_invalid_utf8_fails_or_is_replaced(tmp_path, tiny_tokenizer_model):
    good = synthetic_text(5, 100).encode()
    (tmp_path / "bad.txt").write_bytes(good + b"caf\xe9 au lait\n")
    with pytest.raises(
        DataError,
        match=rf"bad\.txt: invalid UTF-8 at byte {len(good) + 3}; pass --utf8-errors replace",
    ):
        _prep(tmp_path / "out", [tmp_path / "bad.txt"])
    assert not (tmp_path / "out").exists()
    _prep(tmp_path / "out", [tmp_path / "bad.txt"], utf8_errors="replace", valid_fraction=0.0)
    assert _documents(tmp_path / "out", "train") == [good.decode() + "caf\ufffd au lait\n"]


def test_lone_surrogate_escape_in_json(tmp_path):
    text = json.dumps({"text": synthetic_text(1, 2000)})
    (tmp_path / "s.jsonl").write_text(text + '\n{"text": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: text holds a lone UTF-16 surrogate"):
        _prep(tmp_path / "out", [tmp_path / "s.jsonl"])
    _prep(tmp_path / "out", [tmp_path / "s.jsonl"], utf8_errors="replace", valid_fraction=0.0)
    assert _documents(tmp_path / "out", "train")[1] == "a\ufffdb"


def test_skip_existing_and_overwrite(corpus_dir, tmp_path):
    root, _ = corpus_dir
    out = tmp_path / "out"
    _prep(out, [root])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _prep(out, [root], skip_existing=True, workers=2)  # workers do not change outputs
    assert again.skipped_existing and again.num_tokens["train"] > 0
    with pytest.raises(DataError, match="already holds this prep .*--overwrite"):
        _prep(out, [root])
    with pytest.raises(DataError, match="already holds a prep made with other arguments"):
        _prep(out, [root], vocab_size=450, skip_existing=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _prep(out, [root], vocab_size=450, overwrite=True, shard_tokens=4000)
    assert read_manifest(out)["vocab_size"] == 450
    assert len(list(out.glob("train-*.bin"))) > 1
    assert not [p for p in out.iterdir() if p.name.startswith(".prep-")]


def test_failed_overwrite_keeps_the_old_prep(corpus_dir, tmp_path):
    root, _ = corpus_dir
    out = tmp_path / "out"
    _prep(out, [root])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "z.jsonl").write_text(json.dumps({"text": "fine " * 100}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"z\.jsonl:2: bad JSON"):
        _prep(out, [root, bad], overwrite=True, strict=True, chunk_bytes=500)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging left either


def test_damaged_prep_is_not_taken_as_complete(corpus_dir, tmp_path):
    root, _ = corpus_dir
    out = tmp_path / "out"
    _prep(out, [root])
    shard = out / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="incomplete or damaged prep"):
        _prep(out, [root], skip_existing=True)
    _prep(out, [root], skip_existing=True, overwrite=True)
    open_corpus(out)


def test_uint32_tokens_for_a_large_vocabulary(tmp_path, tiny_tokenizer_model):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    model = pb.ModelProto()
    model.ParseFromString(tiny_tokenizer_model)
    for i in range(66000):  # user-defined pieces push the vocabulary past 2^16
        piece = model.pieces.add()
        piece.piece, piece.score = f"<w{i}>", 0.0
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    (tmp_path / "big.model").write_bytes(model.SerializeToString())
    text = "words <w65990> and <w3> then more words\n"
    (tmp_path / "a.txt").write_text(text)
    _prep(tmp_path / "out", [tmp_path / "a.txt"], vocab_size=None,
          tokenizer=str(tmp_path / "big.model"), valid_fraction=0.0)  # fmt: skip
    manifest = read_manifest(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 66400
    corpus = open_corpus(tmp_path / "out")
    tokens = corpus.read(0, corpus.num_tokens)
    assert tokens.dtype == np.uint32 and tokens.max() == 400 + 65990
    assert Tokenizer.from_file(corpus.tokenizer_path).decode(tokens[:-1]) == text


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab é東\n\n  ")), max_size=400),
    block=st.integers(4, 40),
)
def test_text_blocks_cut_only_between_words(tiny_tokenizer, text, block):
    data = text.encode()
    units = list(_text_blocks(0, io.BytesIO(data), block))
    assert b"".join(u.data for u in units) == data
    assert [u.doc_end for u in units] == [False] * (len(units) - 1) + [True]
    assert [u.where for u in units] == list(np.cumsum([0] + [len(u.data) for u in units[:-1]]))
    cuts = np.cumsum([len(u.data) for u in units[:-1]]).tolist()
    newline_run_ends = [data[c - 1 : c] == b"\n" and data[c : c + 1] != b"\n" for c in cuts]
    space_starts = [data[c : c + 1] == b" " and data[c - 1 : c] != b" " for c in cuts]
    # A cut elsewhere happens only in a "word" longer than 16 blocks (forced, inexact).
    assume(all(a or b for a, b in zip(newline_run_ends, space_starts)))
    pieces = [tiny_tokenizer.encode(u.data.decode()) for u in units]
    assert np.concatenate(pieces).tolist() == tiny_tokenizer.encode_plain(text).tolist()


@pytest.mark.parametrize("workers", [1, 2])
def test_reading_stays_a_few_chunks_ahead(tmp_path, monkeypatch, workers, tiny_tokenizer_model):
    """Memory stays bounded: the reader is never more than 2 chunks per worker ahead."""
    lines = [json.dumps({"text": synthetic_text(i, 30)}) for i in range(300)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tiny.model").write_bytes(tiny_tokenizer_model)
    read, ahead = [0], []
    original_read, original_map = pipeline.read_chunks, pipeline.ChunkEncoder.map

    def counting_read(*args):
        for chunk in original_read(*args):
            read[0] += 1
            yield chunk

    def watching_map(self, chunks):
        for done, result in enumerate(original_map(self, chunks), start=1):
            ahead.append(read[0] - done)
            yield result

    monkeypatch.setattr(pipeline, "read_chunks", counting_read)
    monkeypatch.setattr(pipeline.ChunkEncoder, "map", watching_map)
    _prep(tmp_path / "out", [tmp_path / "big.jsonl"], vocab_size=None,
          tokenizer=str(tmp_path / "tiny.model"), workers=workers, chunk_bytes=2000)  # fmt: skip
    assert read[0] > 20 and len(ahead) == read[0]
    assert max(ahead) <= 2 * workers


def test_tokenizer_sample_spreads_over_many_files(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n")
    files = resolve_inputs([str(tmp_path)])
    assert list(sample_documents(files, "text", 3_000_000)) == ["file 0\n", "file 3\n", "file 6\n"]
    assert len(list(sample_documents(files, "text", 64_000_000))) == 10


@pytest.mark.slow
def test_spawned_workers_give_the_same_output(corpus_dir, tmp_path, monkeypatch):
    """Where fork is not used (macOS, Windows) workers are spawned: same bytes."""
    root, _ = corpus_dir
    _prep(tmp_path / "fork", [root], workers=2, chunk_bytes=3000)
    monkeypatch.setattr(sys, "platform", "darwin")
    _prep(tmp_path / "spawn", [root], workers=2, chunk_bytes=3000)
    read = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert read(tmp_path / "fork") == read(tmp_path / "spawn")


def test_byte_order_marks_are_dropped(tmp_path):
    body = synthetic_text(9, 200)
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "b.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"text": body}).encode() + b"\n"
    )
    _prep(tmp_path / "out", [tmp_path / "a.txt", tmp_path / "b.jsonl"], valid_fraction=0.0)
    assert _documents(tmp_path / "out", "train") == [body, body]
