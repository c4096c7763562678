"""Continued pretraining from a Hugging Face model with its own tokenizer (docs/data.md):
prep a Parquet corpus with `--tokenizer HF_DIR`, train `init.from_hf=HF_DIR` through the patch phase and the
token phase, export back: the export carries the same tokenizer files, AutoTokenizer gives
the ids prep wrote, and transformers computes megapatch's logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megapatch.checkpoint.full_weights import build_model, read_checkpoint
from megapatch.data import load_tokenizer, open_corpus
from megapatch.data.hf_tokenizer import train_bpe
from tests.data.helpers import synthetic_text
from tests.export.conftest import train
from tests.fixtures import run_cli, train_records

# One training run for the module: its tests stay on one xdist worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("continued-pretraining")]

transformers = pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def hf_model(tiny_corpus_texts, tmp_path_factory):
    """A random tiny LlamaForCausalLM with a byte-level BPE tokenizer.json, as the Hub
    ships them (the architecture of tests/export's TINY config)."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    texts = [p.read_text() for p in sorted(tiny_corpus_texts.iterdir())]
    tokenizer = train_bpe(texts, vocab_size=384)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=16, rope_theta=500000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def continued(hf_model, tiny_corpus_texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    data, run, export = root / "data", root / "run", root / "export"
    # The corpus as a Parquet file (one document a row), as Hub datasets ship.
    texts = [p.read_text() for p in sorted(tiny_corpus_texts.iterdir())]
    pq.write_table(pa.table({"body": texts}), root / "corpus.parquet", row_group_size=5)
    code = run_cli("prep", root / "corpus.parquet", "--text-key", "body", "--tokenizer", hf_model,
                   "--valid-fraction", "0.1", "--workers", "2", "--no-progress", "--out", data)  # fmt: skip
    assert code == 0
    train(data, run, f"init.from_hf={hf_model}", nproc=1)
    assert run_cli("export", run, "--out", export) == 0
    return data, run, export


def test_the_export_carries_the_models_own_tokenizer(hf_model, continued):
    data, run, export = continued
    for name in TOKENIZER_FILES:
        assert (export / name).read_bytes() == (hf_model / name).read_bytes(), name
        assert (run / name).read_bytes() == (hf_model / name).read_bytes(), name
    theirs = transformers.AutoTokenizer.from_pretrained(export)
    shard = open_corpus(data).shards[0]
    ours = load_tokenizer(run)
    for i in range(3):
        ids = shard.document(i)[:-1].tolist()
        text = ours.decode(ids)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids) == text
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == ours.eos_id


def test_patch_then_token_training_from_the_model_and_back(hf_model, continued):
    _, run, export = continued
    phases = {r["phase"] for r in train_records(run)}
    assert phases == {"patch", "token"}
    ckpt = read_checkpoint(run)
    start = transformers.LlamaForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    after = transformers.LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert not torch.equal(start.lm_head.weight, after.lm_head.weight)  # it trained
    ids = torch.randint(
        0, ckpt.model_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        torch.testing.assert_close(after(ids).logits, build_model(ckpt)(ids), rtol=0, atol=1e-4)


def test_generate_decodes_with_the_runs_tokenizer(continued, capsys):
    _, run, _ = continued
    capsys.readouterr()
    assert run_cli("generate", run, "--prompt", "the", "--max-new-tokens", "5") == 0
    assert capsys.readouterr().out.strip()


def test_lm_eval_evaluates_the_export(continued, tmp_path):
    """`lm_eval --model hf` on the export, offline, with a local task file."""
    pytest.importorskip("lm_eval")
    _, _, export = continued
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": synthetic_text(900 + i, 40)}) + "\n" for i in range(3))
    )
    (tmp_path / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    out = tmp_path / "results"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={export},dtype=float32", "--tasks", "tiny_ppl",
        "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    ppl = json.loads(result.read_text())["results"]["tiny_ppl"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1
