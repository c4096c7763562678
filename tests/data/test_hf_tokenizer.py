"""Hugging Face tokenizers: loading a tokenizer.json or model directory, special tokens from
its own files, byte-level BPE training, and prep with them (exact, worker-independent).
The word-cached encoder's exactness: test_hf_word_cache.py."""

import json
import pickle

import numpy as np
import pytest

from data_prep import PrepConfig, prepare
from megapatch.cli import main
from megapatch.data import HFTokenizer, load_tokenizer, open_corpus, read_manifest
from megapatch.data.hf_tokenizer import train_bpe
from megapatch.errors import ConfigError, DataError
from tests.data.helpers import synthetic_text
from tests.data.test_prep_errors import _fails

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe([synthetic_text(seed, 4000) for seed in range(5)], vocab_size=400)


def _llama3_like(tmp_path, bpe):
    """An HF model directory whose tokenizer adds a BOS through its post-processor and
    names its special tokens in tokenizer_config.json, as Llama 3's does."""
    tok = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    model = tmp_path / "model"
    model.mkdir()
    tok.save(str(model / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False,
           "normalized": False, "rstrip": False, "single_word": False, "special": True}  # fmt: skip
    config = {"bos_token": "<|begin_of_text|>", "eos_token": eos}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "config.json").write_text("{}")
    return model


def test_trained_bpe_round_trips_and_is_deterministic(bpe):
    again = train_bpe([synthetic_text(seed, 4000) for seed in range(5)], vocab_size=400)
    assert again.files() == bpe.files()
    assert (bpe.vocab_size, bpe.eos_id, bpe.bos_id, bpe.kind) == (400, 0, -1, "huggingface")
    for seed in range(3):
        text = synthetic_text(50 + seed, 500) + "  tabs\t\r\n 🙂 e\u0301 \x00"
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16
        assert ids.tolist() == bpe.backend.encode(text, add_special_tokens=False).ids
        assert bpe.decode(ids) == text
    batch = bpe.encode_batch(["a b", "", "c"])
    assert [b.tolist() for b in batch] == [bpe.encode(t).tolist() for t in ("a b", "", "c")]
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone.sha256 == bpe.sha256 and clone.encode("x y").tolist() == bpe.encode("x y").tolist()


def test_too_small_a_vocabulary_for_bytes():
    with pytest.raises(ConfigError, match="--vocab-size 100: a byte-level BPE needs at least 257"):
        train_bpe(["some text"], 100)


def test_special_tokens_come_from_the_tokenizers_own_files(tmp_path, bpe):
    model = _llama3_like(tmp_path, bpe)
    for path in (model, model / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert tok.kind == "huggingface" and tok.vocab_size == 402
        assert (tok.bos_id, tok.eos_id) == (400, 401)
        assert set(tok.files()) == {"tokenizer.json", "tokenizer_config.json"}
        assert tok.encode("hello").tolist() == bpe.encode("hello").tolist()  # no BOS added
    # A bare tokenizer.json: a special token of a well-known name.
    bare = tmp_path / "bare.json"
    bare.write_bytes(bpe.files()["tokenizer.json"])
    tok = load_tokenizer(bare)
    assert tok.eos_id == 0 and json.loads(tok.files()["tokenizer_config.json"])["eos_token"] == (
        "<|endoftext|>"
    )


def test_a_tokenizer_without_an_end_of_text_token(tmp_path, capsys, bpe):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tok.train_from_iterator([synthetic_text(1, 500)], trainer)
    (tmp_path / "noeos").mkdir()
    tok.save(str(tmp_path / "noeos" / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(synthetic_text(2, 300))
    _fails(capsys, [tmp_path / "a.txt", "--tokenizer", tmp_path / "noeos", "--out", tmp_path / "o"],
           "noeos/tokenizer.json: no end-of-text token", "add one to tokenizer_config.json")  # fmt: skip
    (tmp_path / "noeos" / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    _fails(capsys, [tmp_path / "a.txt", "--tokenizer", tmp_path / "noeos", "--out", tmp_path / "o"],
           "eos_token '<|nope|>' is not in its vocabulary")  # fmt: skip
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": 3}')
    _fails(capsys, [tmp_path / "a.txt", "--tokenizer", tmp_path / "broken.json", "--out", tmp_path / "o"],
           "broken.json: not a Hugging Face tokenizer.json")  # fmt: skip
    assert not (tmp_path / "o").exists()


def _text_inputs(root):
    root.mkdir()
    docs = []
    for i in range(3):  # text files read in many blocks: cut only where the tokenizer agrees
        text = synthetic_text(600 + i, 1500) + "\n\n\n  indented\n" + synthetic_text(700 + i, 800)
        (root / f"t{i}.txt").write_text(text)
        docs.append(text)
    lines = [synthetic_text(800 + i, 60) for i in range(9)]
    (root / "j.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return lines + docs  # the order prep reads them: files sorted by name


def test_prep_with_a_tokenizer_json_is_exact_and_worker_independent(tmp_path, bpe):
    docs = _text_inputs(tmp_path / "in")
    model = _llama3_like(tmp_path, bpe)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(PrepConfig(out=str(out), inputs=[str(tmp_path / "in")], tokenizer=str(model),
                           valid_fraction=0.0, workers=workers, chunk_bytes=900, progress=False))  # fmt: skip
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    out = tmp_path / "w1"
    assert sorted(outputs[0]) == [
        "manifest.json", "tokenizer.json", "tokenizer_config.json", "train-00000.bin",
        "train-00000.idx",
    ]  # fmt: skip
    tok = read_manifest(out)["tokenizer"]
    assert (tok["type"], tok["file"], tok["eos_id"], tok["bos_id"]) == (
        "huggingface",
        "tokenizer.json",
        401,
        400,
    )
    corpus = open_corpus(out)
    shard = corpus.shards[0]
    ours = load_tokenizer(out)
    for i, text in enumerate(docs):  # equal to encoding each whole document at once
        assert shard.document(i).tolist() == [*ours.encode(text).tolist(), 401]


def test_prep_trains_a_byte_level_bpe(tmp_path, capsys):
    _text_inputs(tmp_path / "in")
    args = ["prep", "--no-progress", str(tmp_path / "in"), "--vocab-size", "350"]
    assert main([*args, "--tokenizer-type", "bpe", "--out", str(tmp_path / "o")]) == 0
    manifest = read_manifest(tmp_path / "o")
    assert manifest["tokenizer"]["type"] == "huggingface" and manifest["vocab_size"] == 350
    assert manifest["prep_args"]["tokenizer_type"] == "bpe"
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    # A sentencepiece prep of the same inputs is another prep: not silently skipped.
    _fails(capsys, [*args[2:], "--out", tmp_path / "o", "--skip-existing"], "other arguments")
    _fails(capsys, [tmp_path / "in", "--tokenizer", tmp_path / "o", "--tokenizer-type", "bpe",
           "--out", tmp_path / "p"], "drop it with --tokenizer")  # fmt: skip


def test_autotokenizer_reads_a_prep_directory_with_the_same_ids(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    docs = _text_inputs(tmp_path / "in")
    model = _llama3_like(tmp_path, bpe)
    out = tmp_path / "o"
    prepare(PrepConfig(out=str(out), inputs=[str(tmp_path / "in")], tokenizer=str(model),
                       valid_fraction=0.0, progress=False))  # fmt: skip
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    shard = open_corpus(out).shards[0]
    for i in (0, 3, 5):
        assert (
            theirs(docs[i], add_special_tokens=False)["input_ids"]
            == shard.document(i)[:-1].tolist()
        )
    assert theirs.eos_token_id == 401 and theirs.bos_token_id == 400


def test_missing_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
