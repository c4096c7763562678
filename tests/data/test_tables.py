"""Parquet and Arrow inputs: one document per row, read a batch of rows at a time, the same
bytes for any number of workers, rows without text skipped and counted (or --strict)."""

import json

import pytest

from data_prep import PrepConfig, prepare
from data_prep.sources import read_chunks, resolve_inputs
from megapatch.data import open_corpus, read_manifest
from megapatch.data.tokenizer import load_tokenizer
from tests.data.helpers import synthetic_text
from tests.data.test_prep_errors import _fails

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _texts(n: int, seed: int = 0) -> list[str]:
    return [synthetic_text(seed + i, 30 + i % 40) for i in range(n)]


def _write_parquet(path, texts, row_group_size=7, **columns):
    table = pa.table({"id": list(range(len(texts))), "text": texts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)


def _documents(out):
    corpus = open_corpus(out)
    tok = load_tokenizer(corpus.tokenizer_path)
    return [tok.decode(s.document(i)[:-1]) for s in corpus.shards for i in range(s.num_documents)]


def _prep(out, inputs, **kw):
    kw.setdefault("vocab_size", 400)
    kw.setdefault("valid_fraction", 0.0)
    return prepare(PrepConfig(out=str(out), inputs=[str(i) for i in inputs], progress=False, **kw))


def test_parquet_rows_are_documents_in_order_for_any_workers(tmp_path, tiny_tokenizer_model):
    texts = _texts(60)
    _write_parquet(tmp_path / "a.parquet", texts[:40])
    _write_parquet(tmp_path / "b.parquet", texts[40:], row_group_size=100)
    (tmp_path / "tiny.model").write_bytes(tiny_tokenizer_model)
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        _prep(out, [tmp_path / "a.parquet", tmp_path / "b.parquet"], vocab_size=None,
              tokenizer=str(tmp_path / "tiny.model"), workers=workers, chunk_bytes=600,
              valid_fraction=0.1, shard_tokens=2000)  # fmt: skip
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(outputs[0]) > 6 and outputs[0] == outputs[1] == outputs[2]
    assert sorted(_documents(tmp_path / "w1") + _valid_docs(tmp_path / "w1")) == sorted(texts)


def _valid_docs(out):
    corpus = open_corpus(out, "valid")
    tok = load_tokenizer(corpus.tokenizer_path)
    return [tok.decode(s.document(i)[:-1]) for s in corpus.shards for i in range(s.num_documents)]


def test_parquet_is_read_a_batch_of_rows_at_a_time(tmp_path, monkeypatch):
    import data_prep.sources as sources

    monkeypatch.setattr(sources, "TABLE_BATCH_ROWS", 5)
    seen = []
    original = pq.ParquetFile.iter_batches

    def watching(self, *args, **kw):
        for batch in original(self, *args, **kw):
            seen.append((batch.num_rows, batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", watching)
    _write_parquet(tmp_path / "a.parquet", _texts(23), extra=["x" * 1000] * 23)
    chunks = list(read_chunks(resolve_inputs([str(tmp_path / "a.parquet")]), 200))
    assert len(chunks) > 5 and sum(len(c.units) for c in chunks) == 23
    assert max(n for n, _ in seen) <= 5 and {tuple(names) for _, names in seen} == {("text",)}


def test_arrow_files_and_datasets_directories(tmp_path):
    texts = _texts(30, seed=100)
    table = pa.table({"text": texts})
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as w:  # IPC file format
        w.write_table(table, max_chunksize=4)
    views = pa.table({"text": pa.array(texts).cast(pa.string_view())})  # as polars writes
    with pa.ipc.new_stream(tmp_path / "stream.arrow", views.schema) as w:  # stream format
        w.write_table(views, max_chunksize=9)
    _prep(tmp_path / "f", [tmp_path / "file.arrow"])
    _prep(tmp_path / "s", [tmp_path / "stream.arrow"])
    assert _documents(tmp_path / "f") == _documents(tmp_path / "s") == texts

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": list(range(30)), "body": texts})
    ds.save_to_disk(str(tmp_path / "hfds"), num_shards=3)
    _prep(tmp_path / "d", [tmp_path / "hfds"], text_key="body")
    assert _documents(tmp_path / "d") == texts
    _prep(tmp_path / "d2", [tmp_path / "hfds"], text_key="body", workers=2, chunk_bytes=300)
    read = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert read(tmp_path / "d2") == read(tmp_path / "d")  # the same bytes for any workers
    sources = [s["path"] for s in read_manifest(tmp_path / "d")["sources"]]
    assert [p.rsplit("/", 1)[1] for p in sources] == [
        f"data-0000{i}-of-00003.arrow" for i in range(3)
    ]


def test_rows_without_text_are_skipped_and_counted(tmp_path, capsys):
    good = _texts(6)
    _write_parquet(tmp_path / "nulls.parquet", [good[0], None, good[1], "", good[2]])
    _write_parquet(tmp_path / "ints.parquet", [good[3]], text=[7])  # a non-string column
    pq.write_table(pa.table({"body": good[4:6]}), tmp_path / "nokey.parquet")
    inputs = [tmp_path / n for n in ("nulls.parquet", "ints.parquet", "nokey.parquet")]
    result = _prep(tmp_path / "out", inputs)
    assert _documents(tmp_path / "out") == good[:3]
    assert result.skipped == {"missing text": 4, "empty document": 1}

    common = ["--vocab-size", 400, "--strict", "--out", tmp_path / "o"]
    _fails(capsys, [inputs[0], *common],
           "nulls.parquet: row 1: missing text: column 'text' is null", "--text-key")  # fmt: skip
    (tmp_path / "ints").mkdir()
    pq.write_table(pa.table({"text": [good[0], good[1]]}), tmp_path / "ints" / "0.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints" / "1.parquet")
    _fails(capsys, [tmp_path / "ints", *common],
           "1.parquet: row 0: missing text: column 'text' holds int64, not strings")  # fmt: skip
    _fails(capsys, [tmp_path / "ints" / "0.parquet", inputs[2], *common],
           "nokey.parquet: row 0: missing text: no column 'text' (columns: body)")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_parquet(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really" * 10)
    (tmp_path / "bad.arrow").write_text(json.dumps({"text": "a json file"}))
    for name in ("bad.parquet", "bad.arrow"):
        line = _fails(capsys, [tmp_path / name, "--vocab-size", 400, "--out", tmp_path / "o"],
                      f"{name}: cannot read as {name.split('.')[1]}: ")  # fmt: skip
        assert "Traceback" not in line
    assert not (tmp_path / "o").exists()
