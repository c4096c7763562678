"""Bad input to `megapatch prep`: one clear line, exit code 2, nothing written over."""

import json
import re

import pytest
import sentencepiece

from megapatch.cli import main
from tests.data.helpers import synthetic_text


def _fails(capsys, argv, *fragments):
    code = main(["prep", "--no-progress", *map(str, argv)])
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", ln)]  # logs
    assert code == 2
    assert len(err) == 1 and err[0].startswith("megapatch prep: error: "), lines
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(synthetic_text(1, 3000))
    return path


def test_missing_input_path(tmp_path, capsys):
    _fails(capsys, [tmp_path / "nope.jsonl", "--vocab-size", 400, "--out", tmp_path / "o"],
           "input path not found:", "nope.jsonl")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_unmatched_glob_and_unsupported_file(tmp_path, capsys):
    _fails(capsys, [f"{tmp_path}/*.jsonl", "--vocab-size", 400, "--out", tmp_path / "o"],
           "matched no files")  # fmt: skip
    (tmp_path / "x.csv").write_text("a,b\n")
    _fails(capsys, [tmp_path / "x.csv", "--vocab-size", 400, "--out", tmp_path / "o"],
           "unsupported input file", "x.csv", ".jsonl.zst")  # fmt: skip


def test_empty_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, [tmp_path / "empty", "--vocab-size", 400, "--out", tmp_path / "o"],
           "holds no .txt, .jsonl")  # fmt: skip
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "e.jsonl").write_text("\n\n")
    _fails(capsys, [tmp_path / "e.txt", tmp_path / "e.jsonl", "--vocab-size", 400, "--out",
           tmp_path / "o"], "no text to train the tokenizer on")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_bad_json_and_missing_key_fail_with_strict(tmp_path, capsys, text_file):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    (tmp_path / "nokey.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    common = ["--vocab-size", 400, "--out", tmp_path / "o", "--strict"]
    _fails(capsys, [text_file, tmp_path / "bad.jsonl", *common], "bad.jsonl:2: bad JSON")
    _fails(capsys, [text_file, tmp_path / "nokey.jsonl", *common],
           "nokey.jsonl:1: missing text: field 'text': no such key")  # fmt: skip
    assert not (tmp_path / "o").exists()
    # Without --strict such lines are skipped, counted and reported.
    assert main(["prep", "--no-progress", str(text_file), str(tmp_path / "nokey.jsonl"),
                 "--vocab-size", "400", "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert "skipped 1 input lines or rows: missing text" in capsys.readouterr().out


def test_non_utf8_bytes(tmp_path, capsys, text_file):
    (tmp_path / "latin1.txt").write_bytes("naïve café".encode("latin-1"))
    _fails(capsys, [text_file, tmp_path / "latin1.txt", "--vocab-size", 400, "--out", tmp_path / "o"],
           "latin1.txt: invalid UTF-8 at byte 2", "--utf8-errors replace")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_output_with_shards_is_not_overwritten(tmp_path, capsys, text_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"old shard")
    _fails(capsys, [text_file, "--vocab-size", 400, "--out", out], "already holds", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["train-00000.bin"]
    assert (out / "train-00000.bin").read_bytes() == b"old shard"
    assert main(["prep", "--no-progress", str(text_file), "--vocab-size", "400", "--out", str(out),
                 "--overwrite"]) == 0  # fmt: skip
    assert (out / "manifest.json").is_file()


def test_vocabulary_beyond_uint32(tmp_path, capsys, text_file, tiny_tokenizer_model, monkeypatch):
    model = tmp_path / "huge.model"
    model.write_bytes(tiny_tokenizer_model)
    monkeypatch.setattr(
        sentencepiece.SentencePieceProcessor, "get_piece_size", lambda self: 2**32 + 5
    )
    _fails(capsys, [text_file, "--tokenizer", model, "--out", tmp_path / "o"],
           "huge.model: a vocabulary of 4294967301 pieces does not fit uint32")  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fraction", ["1", "1.5", "-0.1", "nan"])
def test_valid_fraction_outside_range(tmp_path, capsys, text_file, fraction):
    _fails(capsys, [text_file, "--vocab-size", 400, "--valid-fraction", fraction, "--out", tmp_path / "o"],
           "--valid-fraction must be in [0, 1)")  # fmt: skip


def test_tokenizer_choice_is_required(tmp_path, capsys, text_file):
    _fails(capsys, [text_file, "--out", tmp_path / "o"], "--vocab-size N", "--tokenizer PATH")


def test_vocabulary_too_large_for_the_sample(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("only a few words here\n")
    line = _fails(capsys, [tmp_path / "tiny.txt", "--vocab-size", 5000, "--out", tmp_path / "o"],
                  "--vocab-size 5000: sentencepiece cannot train it: Vocabulary size")  # fmt: skip
    assert "trainer" not in line
