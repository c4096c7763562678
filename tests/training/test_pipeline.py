"""Pipeline parallelism end to end, in real gloo processes: TP2 x PP2, PP2 x DP2 and
TP2 x PP2 x DP2 runs of the tiny config equal the one-process run at every step on both
sides of the switch (validation too); SIGKILLs before and after the switch resume
bit-identically; a TP2 x PP2 checkpoint reads back as one model (export to transformers,
eval); `init.from_hf` loads into a TP2 x PP2 layout; bad pipeline configs get one line.

With PP=2 the tiny plan's patch phase takes micro-batches of 1 (4 per step, as many as
the token phase's), so the stage buffers change size at the switch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megapatch.checkpoint.full_weights import build_model, read_checkpoint
from tests.distributed import run_distributed
from tests.fixtures import run_cli
from tests.training.conftest import metrics, run_train, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TP2_PP2 = ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")


def _assert_matches(run_dir, reference, steps=None):
    _assert_matches_records(train_records(run_dir)[: steps or None], metrics(run_dir), reference)


def _assert_matches_records(ours, our_metrics, reference):
    """Steps, phases, losses (2e-5 relative), data CRCs and validation of `ours` equal the
    reference run's first len(ours) steps."""
    theirs = train_records(reference)[: len(ours)]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r["phase"] for r in ours] == [r["phase"] for r in theirs]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=2e-5)
    assert [r["data_crc"] for r in ours] == [r["data_crc"] for r in theirs]
    expected = {r["step"]: r for r in metrics(reference) if "val_loss" in r}
    last = ours[-1]["step"]
    validated = [r for r in our_metrics if "val_loss" in r and "loss" in r and r["step"] <= last]
    assert validated, "validation ran"
    for r in validated:
        assert r["val_loss"] == pytest.approx(expected[r["step"]]["val_loss"], rel=2e-5)
        if "val_patch_loss" in expected[r["step"]]:
            assert r["val_patch_loss"] == pytest.approx(
                expected[r["step"]]["val_patch_loss"], rel=2e-5
            )


@pytest.fixture(scope="session")
def tp2_pp2_run(tiny_corpus, tmp_path_factory):
    """TP2 x PP2, ZeRO-1 (four processes), uninterrupted."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "tp2pp2"
    run_train(tiny_corpus, run_dir, *TP2_PP2, nproc=4)
    return run_dir


def test_tp2_pp2_matches_one_process(tp2_pp2_run, reference_run):
    _assert_matches(tp2_pp2_run, reference_run)
    records = train_records(tp2_pp2_run)
    norms = np.array([r["grad_norm"] for r in records])
    np.testing.assert_allclose(
        norms, [r["grad_norm"] for r in train_records(reference_run)], rtol=1e-4
    )


def test_pp2_dp2_zero0_matches_one_process_and_skips_a_nonfinite_step(
    reference_run, tiny_corpus, tmp_path
):
    # ZeRO-0 in fp32: megapatch clips, keeps the norm and skips a non-finite step itself
    # (engine.PipelineStepGuard). Step 10's loss is made NaN: its update must not happen.
    run_dir = tmp_path / "pp2dp2"
    layout = ("parallel.pipeline_model_parallel_size=2", "parallel.zero_stage=0")
    env = {"MEGAPATCH_FAULT_NAN_STEPS": "9"}  # the step after 9 done
    run_train(tiny_corpus, run_dir, *layout, "train.max_steps=10", nproc=4, env=env)
    records = train_records(run_dir)
    assert len(records) == 10
    assert records[-1]["loss"] == "nan" and records[-1]["nonfinite_total"] == 1
    _assert_matches_records(records[:9], metrics(run_dir), reference_run)
    norms = [r["grad_norm"] for r in records[:9]]
    expected = [r["grad_norm"] for r in train_records(reference_run)[:9]]
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    skipped = read_checkpoint(run_dir / "checkpoints" / "step_00000010")
    before = read_checkpoint(reference_run / "checkpoints" / "step_00000009")
    for name, weight in before.state_dict.items():
        torch.testing.assert_close(skipped.state_dict[name], weight, rtol=0, atol=2e-5, msg=name)


def test_tp2_pp2_dp2_with_sequence_parallelism_matches_one_process(
    reference_run, tiny_corpus, tmp_path
):
    # SP: each TP rank holds its own L/2 positions, so stages send whole tensors
    run_dir = tmp_path / "tp2pp2dp2"
    sp = "parallel.sequence_parallel=true"
    run_train(tiny_corpus, run_dir, *TP2_PP2, sp, "train.max_steps=10", nproc=8)
    _assert_matches(run_dir, reference_run, steps=10)


def test_sigkill_before_and_after_the_switch_resumes_exactly(tp2_pp2_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "killed"
    for step in (5, 10):  # a patch step (resumes from 3), a token step (resumes from 9)
        proc = run_train(
            tiny_corpus,
            run_dir,
            *TP2_PP2,
            nproc=4,
            env={"MEGAPATCH_FAULT_KILL_AFTER_STEP": str(step)},
            check=False,
        )
        assert proc.returncode != 0
        assert train_records(run_dir)[-1]["step"] == step
    run_train(tiny_corpus, run_dir, *TP2_PP2, nproc=4)
    ours, theirs = train_records(run_dir), train_records(tp2_pp2_run)
    assert [r["step"] for r in ours] == list(range(1, 13))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert [r["data_crc"] for r in ours] == [r["data_crc"] for r in theirs]


def test_a_tp2_pp2_checkpoint_reads_back_as_the_one_process_model(tp2_pp2_run, reference_run):
    ours, theirs = read_checkpoint(tp2_pp2_run), read_checkpoint(reference_run)
    assert ours.client_state.pipeline_model_parallel_size == 2
    assert ours.client_state.tensor_model_parallel_size == 2
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    for name, weight in theirs.state_dict.items():
        torch.testing.assert_close(ours.state_dict[name], weight, rtol=0, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def tp2_pp2_export(tp2_pp2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline-export") / "hf"
    assert run_cli("export", tp2_pp2_run, "--out", out) == 0
    return out


def test_export_of_a_tp2_pp2_checkpoint_gives_the_models_logits_in_transformers(
    tp2_pp2_run, tp2_pp2_export
):
    transformers = pytest.importorskip("transformers")
    out = tp2_pp2_export
    ckpt = read_checkpoint(tp2_pp2_run)
    ids = torch.randint(
        0, ckpt.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        ours = build_model(ckpt)(ids)
        hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert run_cli("eval", tp2_pp2_run) == 0
    assert run_cli("generate", tp2_pp2_run, "--prompt", "", "--max-new-tokens", "4") == 0


def _stage_weights_from_hf(rank, world_size, hf_dir):
    """Each rank's stage and TP shard after `init.from_hf`'s loader, against the file's
    weights sliced as the layout slices them (vocabulary rows padded with zeros)."""
    import dataclasses

    import deepspeed

    from megapatch import parallel
    from megapatch.checkpoint.hf import load_hf_into_model, read_hf
    from megapatch.model.pipeline import build_pipeline_model

    deepspeed.init_distributed("gloo")
    parallel.initialize_model_parallel(2, 2)
    try:
        cfg, full = read_hf(hf_dir)
        cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=8)
        pipe = build_pipeline_model(cfg, 0, parallel.pipeline_topology(2, 2, 1), 2)
        load_hf_into_model(pipe, hf_dir)
        tp_rank, worst = parallel.get_tensor_model_parallel_rank(), 0.0
        for name, param in pipe.gpt_named_parameters():
            expected = full[name]
            if name in ("embed_tokens.weight", "lm_head.weight"):
                rows = pipe.padded_vocab_size - expected.shape[0]
                expected = torch.cat([expected, expected.new_zeros(rows, expected.shape[1])])
            dim = getattr(param, "partition_dim", None)
            if dim is not None:
                expected = expected.chunk(2, dim=dim)[tp_rank]
            worst = max(worst, float((param.detach() - expected).abs().max()))
        names = sorted(n for n, _ in pipe.gpt_named_parameters())
        return parallel.get_pipeline_model_parallel_rank(), names, worst
    finally:
        parallel.destroy_model_parallel()


def test_init_from_hf_loads_into_a_tp2_pp2_layout(tp2_pp2_run, tp2_pp2_export):
    results = run_distributed(_stage_weights_from_hf, 4, str(tp2_pp2_export))
    names = {name for _, stage_names, _ in results for name in stage_names}
    assert names == set(read_checkpoint(tp2_pp2_run).state_dict)  # the stages hold it all
    assert {stage for stage, _, _ in results} == {0, 1}
    assert all(worst == 0.0 for *_, worst in results)
