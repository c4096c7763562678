"""Multi-stage plans (patch.stages), patch.batching, weighted targets and their bad input:
the scheduler, the config rules, the data streams. Pure Python except the one model check."""

from __future__ import annotations

import pytest

from megapatch.config import load_config
from megapatch.errors import ConfigError
from megapatch.training.schedule import StagePlan
from tests.fixtures import run_cli
from tests.training.conftest import REPO, TINY_OVERRIDES

TINY = REPO / "configs" / "tiny.yaml"
STAGES = "patch.stages=[{size: 8, fraction: 0.25}, {size: 4, fraction: 0.25, rewarm: false}]"


def plan(*overrides: str, vocab_size: int | None = 4096) -> StagePlan:
    return StagePlan.from_config(load_config(TINY, list(overrides)), vocab_size=vocab_size)


def test_stages_have_their_steps_shapes_switches_and_curves():
    p = plan(STAGES, "train.warmup_steps=5%")  # 96 steps of 8,192 tokens
    assert [(ph.name, ph.patch_size, ph.steps) for ph in p.phases] == [
        ("patch1", 8, 24),
        ("patch2", 4, 24),
        ("token", 1, 48),
    ]
    assert [ph.sequences_per_step for ph in p.phases] == [8, 16, 64]  # tokens per step equal
    assert {ph.tokens_per_step for ph in p.phases} == {8192}
    assert [ph.resets_optimizer for ph in p.phases] == [False, True, True]
    assert p.switch_steps == [24, 48]
    # patch2 -> token does not rewarm: one curve over both, decaying at the run's end
    assert p.phases[1].lr_schedule is p.phases[2].lr_schedule
    assert p.lr(24) < p.lr(27) and p.lr(95) == pytest.approx(2e-4)
    assert p.lr(23) == pytest.approx(2e-4)  # patch1 decays to the floor before the switch
    assert p.cost_ratio == pytest.approx(0.25 / 8 + 0.25 / 4 + 0.5, rel=2e-3)
    assert p.flops.simple_ratio == pytest.approx(0.25 / 8 + 0.25 / 4 + 0.5)
    table = p.table()
    assert "switch at step 24: K 8 -> 4" in table and "switch at step 48: K 4 -> 1" in table
    assert "lr     token: continues the patch2 curve" in table


def test_sequence_batching_keeps_sequences_and_flops_per_step():
    p = plan("patch.batching=sequences", "patch.size=6", "patch.fraction=0.3")
    patch, token = p.phases
    assert (patch.steps, token.steps) == (29, 67)  # 0.3 of the 96 steps
    assert patch.sequences_per_step == token.sequences_per_step == 64
    assert patch.tokens_per_step == 6 * token.tokens_per_step
    assert p.tokens_read == 29 * 6 * 8192 + 67 * 8192
    assert p.total_tokens == 96 * 8192  # the budget: token-step equivalents of compute
    assert patch.flops_per_step == pytest.approx(token.flops_per_step, rel=1e-3)
    assert p.cost_ratio == pytest.approx(1.0, abs=1e-3)


def test_one_stage_shorthand_is_the_plan_of_before():
    shorthand = plan()
    assert [ph.name for ph in shorthand.phases] == ["patch", "token"]
    assert "stages" not in shorthand.inputs and "batching" not in shorthand.inputs
    # the same stage spelled as patch.stages: the same phases, named as one stage
    spelled = plan("patch.stages=[{size: 4, fraction: 2/3}]")
    assert spelled.phases == shorthand.phases
    assert load_config(TINY).config_hash() == "cabb2604631ab017"  # old checkpoints resume


def test_uniform_weights_are_the_unweighted_loss():
    for weights in ("uniform", "[2, 2, 2, 2]"):
        assert plan(f"patch.position_weights={weights}").phases[0].position_weights is None
    weighted = plan("patch.position_weights=[4, 3, 2, 1]").phases[0].position_weights
    assert weighted == pytest.approx((0.4, 0.3, 0.2, 0.1))
    # per stage: a stage's own weights win over patch.position_weights
    p = plan(
        "patch.position_weights=[1, 0, 0, 0, 0, 0, 0, 0]",
        "patch.stages=[{size: 8, fraction: 0.25}, {size: 4, fraction: 0.25, position_weights: [1, 1, 0, 0]}]",
    )
    assert p.phases[0].position_weights == (1.0,) + (0.0,) * 7
    assert p.phases[1].position_weights == (0.5, 0.5, 0.0, 0.0)


def test_the_model_applies_the_weights_and_none_is_bitwise_the_old_loss():
    import torch

    from megapatch.model import GPT, GPTConfig
    from megapatch.ops import patch_loss

    cfg = GPTConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, seq_len=8)
    model = GPT(cfg, seed=0)
    ids = torch.randint(0, 64, (2, 4 * 8 + 4), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-4], ids[:, 4:]
    default = model(x, y, patch_size=4)
    assert torch.equal(model(x, y, patch_size=4, position_weights=None), default)
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.update(h=o))
    model(x, y, patch_size=4)
    direct = patch_loss(hidden["h"].reshape(16, -1), model.output_weight, y.reshape(16, 4),
                        vocab_size=64, backend=cfg.ops_backend)  # fmt: skip
    assert torch.equal(default, direct)  # the loss seam adds nothing for uniform targets
    uniform = model(x, y, patch_size=4, position_weights=(0.25,) * 4)
    torch.testing.assert_close(uniform, default)
    assert not torch.allclose(model(x, y, patch_size=4, position_weights=(1, 0, 0, 0)), default)


BAD = [
    (["patch.stages=[{size: 4, fraction: 0.6}, {size: 2, fraction: 0.4}]"], "summing to less than 1"),
    (["patch.stages=[{size: 4, fraction: 0}]"], "patch.stages[0].fraction=0: expected a number > 0"),
    (["patch.stages=[{size: 4, fraction: -0.2}]"], "expected a number > 0"),
    (["patch.stages=[{size: 1, fraction: 0.2}]"], "patch.stages[0].size=1: expected an integer K >= 2"),
    (["patch.stages=[{size: 4, fraction: 0.2, weight: 1}]"], "only the keys"),
    (["patch.stages=[]"], "a non-empty list"),
    (["patch.position_weights=[1, 2]"], "expected 4 weights"),
    (["patch.position_weights=[1, -1, 1, 1]"], "non-negative numbers"),
    (["patch.position_weights=[0, 0, 0, 0]"], "at least one positive weight"),
    (["patch.position_weights=powerlaw"], '"uniform" or a list'),
    (["patch.stages=[{size: 2, fraction: 0.2, position_weights: [1, 2, 3]}]"], "patch.stages[0].position_weights"),
    (["patch.batching=samples"], "patch.batching='samples': expected one of 'tokens', 'sequences'"),
    (["patch.size=8", "patch.stages=[{size: 4, fraction: 0.2}]"], "expected one form"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_stage_config_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)


def test_both_forms_in_one_file_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(TINY.read_text().replace("  fraction: 2/3", "  fraction: 0.5\n  stages: [{size: 2, fraction: 0.5}]"))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"both.yaml: patch.stages is given together with patch.fraction"
    ):
        load_config(path)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # 0.004 of 96 steps rounds to none
        (["patch.stages=[{size: 4, fraction: 0.004}]"], "patch.stages[0].fraction=0.004: expected a share"),
        # 5 steps of patch2 are not longer than a 5-step warmup
        (["patch.stages=[{size: 4, fraction: 0.5}, {size: 2, fraction: 0.05}]", "train.warmup_steps=5"],
         "fewer than the 5 steps of the patch2 phase"),
        (["patch.stages=[{size: 3, fraction: 0.25}]"], "multiple of model.seq_len x patch.stages[0].size"),
    ],
)  # fmt: skip
def test_the_scheduler_refuses_stages_it_cannot_run(overrides, expected):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as info:
        StagePlan.from_config(cfg)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)


def test_bad_stages_exit_2_from_the_cli(capsys):
    code = run_cli("plan", str(TINY), "patch.stages=[{size: 1, fraction: 0.2}]")
    assert code == 2
    assert "patch.stages[0].size=1" in capsys.readouterr().err


def test_every_stage_reads_its_own_tokens(tiny_corpus):
    from megapatch.training.run_data import open_run_data, phase_streams, validation_windows

    cfg = load_config(
        TINY,
        [*TINY_OVERRIDES, f"data.path={tiny_corpus}",
         "patch.stages=[{size: 4, fraction: 0.25}, {size: 2, fraction: 0.25}]"],
    )  # fmt: skip
    corpus, valid = open_run_data(cfg)
    p = StagePlan.from_config(cfg)
    streams = phase_streams(cfg, p, corpus)
    ranges = []
    for ph in p.phases:
        (source,) = streams[ph.name].sources
        assert streams[ph.name].window == ph.window and streams[ph.name].budget_tokens == ph.tokens
        ranges.append((source.start, source.start + source.count * streams[ph.name].stride))
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges  # disjoint, in order
    assert sorted(validation_windows(cfg, p, valid)) == [1, 2, 4]
