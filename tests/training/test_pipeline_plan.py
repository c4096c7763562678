"""Pipeline parallelism without processes: the bad layouts (one line, exit 2, before any
process group exists), the scheduler's patch-phase micro-batch and the bubble, the stage
split."""

from __future__ import annotations

import pytest

from megapatch.config import load_config
from megapatch.errors import ConfigError
from megapatch.model import GPTConfig
from megapatch.model.pipeline import gpt_parameter_name, layer_parameter_counts, stage_partition
from megapatch.training.schedule import StagePlan, plan_for_world
from tests.fixtures import run_cli
from tests.training.conftest import REPO, TINY_OVERRIDES

TINY = str(REPO / "configs" / "tiny.yaml")
SHAPE = [o for o in TINY_OVERRIDES if o.startswith(("model.", "train."))]


def _plan_error(capsys, *overrides: str, extra=("--vocab-size", "400")) -> str:
    capsys.readouterr()
    code = run_cli("plan", TINY, *SHAPE, *overrides, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("megapatch plan: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["parallel.pipeline_model_parallel_size=3"],
            "parallel.pipeline_model_parallel_size=3: expected at most model.n_layers=2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2", "parallel.zero_stage=2"],
            "parallel.zero_stage=2: expected 0 or 1 with parallel.pipeline_model_parallel_size=2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2", "parallel.zero_stage=3"],
            "parallel.zero_stage=3: expected 0 or 1 with parallel.pipeline_model_parallel_size=2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=2", "model.tie_embeddings=true"],
            "model.tie_embeddings=true: expected false with parallel.pipeline_model_parallel_size=2",
        ),
        (
            # the 4,096-row embedding and head outweigh three 10K-parameter blocks: a stage
            # of only the embedding
            [
                "parallel.pipeline_model_parallel_size=3",
                "model.n_layers=3",
                "model.vocab_size=4096",
            ],
            "leave stage 0 without a block",
        ),
        (
            ["parallel.sequence_parallel=true", "parallel.pipeline_model_parallel_size=2"],
            "parallel.sequence_parallel=true: expected false with TP=1",
        ),
        (
            [
                "parallel.sequence_parallel=true",
                "parallel.tensor_model_parallel_size=2",
                "parallel.pipeline_model_parallel_size=2",
                "model.seq_len=15",
                "train.tokens_per_step=240",
            ],
            "model.seq_len=15: expected a multiple of the TP size 2 under parallel.sequence_parallel",
        ),
    ],
)
def test_bad_pipeline_layouts_get_one_line(capsys, overrides, expected):
    assert expected in _plan_error(capsys, *overrides)


def test_a_world_size_that_is_not_a_multiple_of_tp_x_pp_is_refused(capsys):
    layout = ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    line = _plan_error(capsys, *layout, extra=("--vocab-size", "400", "--world-size", "6"))
    assert "--world-size 6: expected a multiple of" in line and "TP x DP x PP" in line
    # the check a launched job makes (train, and launch/preflight.py), before any group
    cfg = load_config(TINY, [*SHAPE, *layout])
    with pytest.raises(ConfigError, match="parallel.pipeline_model_parallel_size=2: expected a "
                       r"divisor of the world size 6 / TP=2"):  # fmt: skip
        plan_for_world(cfg, 6, vocab_size=400)
    assert plan_for_world(cfg, 8, vocab_size=400).dp_size == 2


def _plan(pp: int, micro: int = 4, tokens_per_step: int = 256, dp: int = 1) -> StagePlan:
    return StagePlan(
        seq_len=16, patch_size=4, patch_fraction=2 / 3, total_tokens=tokens_per_step * 12,
        tokens_per_step=tokens_per_step, micro_batch_size=micro, lr=1e-3, dp_size=dp,
        pipeline_size=pp,
    )  # fmt: skip


def test_the_patch_micro_batch_keeps_the_token_phases_micro_batches_under_a_pipeline():
    # 16 token sequences per step (4 x 4), 4 patch sequences.
    patch, token = _plan(pp=1).phases
    assert (patch.micro_batch_size, patch.grad_accum) == (4, 1)  # no pipeline: memory-equal
    plan = _plan(pp=2)
    patch, token = plan.phases
    assert (token.micro_batch_size, token.grad_accum) == (4, 4)
    assert (patch.micro_batch_size, patch.grad_accum) == (1, 4)
    assert plan.bubble(patch) == plan.bubble(token) == pytest.approx(1 / 5)
    assert "keeps at least the token phase's 4 micro-batches" in plan.table()
    assert "PP bubble" in plan.table() and "20.0%" in plan.table()


def test_when_the_budget_allows_too_few_patch_sequences_the_plan_says_the_bubble_grows():
    # 4 token sequences per step at micro-batch 1 (4 micro-batches); the patch phase has
    # one sequence per step, so one micro-batch at most.
    plan = _plan(pp=4, micro=1, tokens_per_step=64)
    patch, token = plan.phases
    assert (token.grad_accum, patch.grad_accum) == (4, 1)
    assert plan.bubble(patch) == pytest.approx(3 / 4) and plan.bubble(token) == pytest.approx(3 / 7)
    assert "so its bubble is larger than the token phase's" in plan.table()


def test_the_stage_split_balances_parameters_and_names_map_to_the_gpt():
    cfg = GPTConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, ffn_hidden=2752,
                    seq_len=2048)  # fmt: skip
    counts = layer_parameter_counts(cfg)
    assert sum(counts) == cfg.n_layers * counts[1] + 2 * counts[0] + cfg.d_model
    parts = stage_partition(cfg, 4)
    assert parts[0] == 0 and parts[-1] == cfg.n_layers + 2
    loads = [sum(counts[a:b]) for a, b in zip(parts, parts[1:])]
    assert max(loads) / min(loads) < 1.2, loads  # about equal parameters per stage
    assert gpt_parameter_name("0.embed_tokens.weight", 24) == "embed_tokens.weight"
    assert gpt_parameter_name("3.mlp.up_proj.weight", 24) == "layers.2.mlp.up_proj.weight"
    assert gpt_parameter_name("25.lm_head.weight", 24) == "lm_head.weight"
