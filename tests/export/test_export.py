"""`megapatch export`: a Hugging Face Llama directory that transformers loads and that
computes megapatch's logits, from any TP size and ZeRO stage; and the way back
(`init.from_hf`) into any TP size."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch

from megapatch.checkpoint.full_weights import build_model, read_checkpoint
from megapatch.checkpoint.hf import load_hf_into_model, read_hf
from megapatch.data import Tokenizer
from megapatch.errors import CheckpointError
from megapatch.model import GPT
from tests.data.helpers import synthetic_text
from tests.distributed import run_distributed
from tests.export.conftest import one_error_line, run_cli

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")


def _ids(vocab_size: int, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def tp2_export(tp2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tp2-hf"
    assert run_cli("export", tp2_run, "--out", out) == 0
    return out


def test_export_of_a_tp2_checkpoint_computes_megapatch_logits_in_transformers(tp2_run, tp2_export):
    ckpt = read_checkpoint(tp2_run)
    assert ckpt.client_state.tensor_model_parallel_size == 2
    ids = _ids(ckpt.model_config.vocab_size)
    with torch.no_grad():
        ours = build_model(ckpt)(ids)  # [B, T, V]
        hf = transformers.LlamaForCausalLM.from_pretrained(tp2_export, dtype=torch.float32)
        theirs = hf.eval()(ids).logits
    assert theirs.shape == ours.shape == (*ids.shape, ckpt.model_config.vocab_size)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    config = json.loads((tp2_export / "config.json").read_text())
    assert (config["num_key_value_heads"], config["rope_theta"], config["rms_norm_eps"]) == (
        2,
        500000,
        1e-6,
    )


def test_exported_tokenizer_encodes_and_decodes_like_megapatch(tp2_run, tp2_export):
    ours = Tokenizer.from_file(tp2_run / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(tp2_export)
    for seed in range(5):
        text = synthetic_text(1000 + seed, 200)  # prose, numbers, line breaks, non-ASCII
        ids = [int(i) for i in ours.encode(text)]
        assert theirs(text)["input_ids"] == ids  # no BOS: megapatch trains without one
        assert theirs.decode(ids) == text


def test_round_trip_of_a_patch_then_token_model_is_exact(tp2_run, tp2_export):
    ckpt = read_checkpoint(tp2_run)
    tokens = ckpt.client_state.progress.tokens
    assert tokens["patch"] > 0 and tokens["token"] > 0  # trained through both phases
    hf_cfg, state = read_hf(tp2_export)
    assert state.keys() == ckpt.state_dict.keys()
    for name, weight in ckpt.state_dict.items():
        assert torch.equal(state[name], weight), name
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ffn_hidden",
                  "seq_len", "rope_theta", "norm_eps", "tie_embeddings"):  # fmt: skip
        assert getattr(hf_cfg, field) == getattr(ckpt.model_config, field), field

    model = GPT(ckpt.model_config, seed=99).eval()  # different random weights first
    load_hf_into_model(model, tp2_export)
    ids = _ids(ckpt.model_config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), build_model(ckpt)(ids))


def test_the_patch_phase_checkpoint_round_trips_too(tp2_run, tmp_path, cli):
    switch = tp2_run / "checkpoints" / "step_00000004"  # saved right before the switch
    assert cli("export", switch, "--out", tmp_path / "hf") == 0
    ckpt = read_checkpoint(switch)
    assert ckpt.client_state.progress.tokens["token"] == 0
    _, state = read_hf(tmp_path / "hf")
    assert all(torch.equal(state[n], w) for n, w in ckpt.state_dict.items())


def _reimport_at_tp2(rank, world_size, hf_dir, model_config, ids):
    from megapatch import parallel

    parallel.initialize_model_parallel(2)
    model = GPT(model_config, seed=5).eval()
    load_hf_into_model(model, hf_dir)
    with torch.no_grad():
        logits = model(ids)  # gathered over TP
    shard = model.layers[0].self_attn.q_proj.weight.clone()
    parallel.destroy_model_parallel()
    return logits, shard


def test_export_reimported_at_tp2_gives_identical_logits(tp2_run, tp2_export):
    ckpt = read_checkpoint(tp2_run)
    ids = _ids(ckpt.model_config.vocab_size)
    with torch.no_grad():
        expected = build_model(ckpt)(ids)
    results = run_distributed(
        _reimport_at_tp2, 2, str(tp2_export), ckpt.model_config, ids, reuse_workers=True
    )
    q_proj = ckpt.state_dict["layers.0.self_attn.q_proj.weight"]
    for rank, (logits, shard) in enumerate(results):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        assert torch.equal(shard, q_proj.chunk(2, dim=0)[rank])  # each rank its own rows


def test_every_layout_exports_the_same_model(tp2_run, zero3_run, tmp_path, cli):
    """TP=2 x ZeRO-2 and TP=1 x ZeRO-3 trained the same config: merged and gathered
    weights agree up to float rounding (a wrong merge would differ by O(weights))."""
    assert cli("export", zero3_run, "--out", tmp_path / "zero3") == 0
    _, zero3 = read_hf(tmp_path / "zero3")
    tp2 = read_checkpoint(tp2_run)
    assert read_checkpoint(zero3_run).client_state.zero_stage == 3
    assert zero3.keys() == tp2.state_dict.keys()
    for name, weight in tp2.state_dict.items():
        torch.testing.assert_close(zero3[name], weight, rtol=0, atol=1e-4, msg=name)


def test_sharded_bf16_export_loads_in_transformers(tp2_run, tmp_path, cli):
    out = tmp_path / "hf"
    args = ("--out", out, "--dtype", "bfloat16", "--max-shard-size", "40KB")
    assert cli("export", tp2_run, *args) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ckpt = read_checkpoint(tp2_run)
    for name, weight in ckpt.state_dict.items():
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        assert torch.equal(hf.state_dict()[hf_name], weight.bfloat16().float()), name


# -- bad input --------------------------------------------------------------------------
def test_export_refuses_a_non_empty_directory_unless_overwrite(tp2_run, tmp_path, capsys, cli):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("export", tp2_run, "--out", out) == 2
    one_error_line(capsys.readouterr().err, "export", "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert cli("export", tp2_run, "--out", out, "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_respects_the_umask(tp2_run, tmp_path, cli, umask):
    # A team on a shared cluster reads the model: no 0700 directory, no 0600 files.
    previous = os.umask(umask)
    try:
        assert cli("export", tp2_run, "--out", tmp_path / "hf") == 0
    finally:
        os.umask(previous)
    out = tmp_path / "hf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in files)


def test_export_with_a_tokenizer_of_another_vocabulary_fails(
    tp2_run, other_corpus, tmp_path, capsys, cli
):
    out = tmp_path / "hf"
    args = ("--out", out, "--tokenizer", other_corpus / "tokenizer.model")
    assert cli("export", tp2_run, *args) == 2
    one_error_line(capsys.readouterr().err, "export", "450 pieces", "vocabulary of 400")
    assert not out.exists()


def _load_at_tp1(model_config, hf_dir):
    model = GPT(model_config)
    load_hf_into_model(model, hf_dir)


def test_init_from_hf_names_the_mismatch(tp2_run, tp2_export):
    cfg = read_checkpoint(tp2_run).model_config
    wider = dataclasses.replace(cfg, ffn_hidden=128)
    with pytest.raises(CheckpointError, match=r"intermediate_size=64 but model.ffn_hidden=128"):
        _load_at_tp1(wider, tp2_export)
    more_words = dataclasses.replace(cfg, vocab_size=450)
    with pytest.raises(CheckpointError, match=r"vocab_size=400 but the run's vocabulary is 450"):
        _load_at_tp1(more_words, tp2_export)
    with pytest.raises(CheckpointError, match=r"no config.json"):
        _load_at_tp1(cfg, tp2_export / "missing")
