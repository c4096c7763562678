"""The stage scheduler and the FLOPs estimate: pure Python, no torch."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megapatch.config import load_config
from megapatch.errors import ConfigError
from megapatch.flops import ModelDims, forward_flops_per_position, training_flops_per_sequence
from megapatch.training.schedule import LRSchedule, StagePlan

REPO = Path(__file__).resolve().parents[2]


def plan(**kw) -> StagePlan:
    args = dict(seq_len=16, patch_size=4, patch_fraction=0.5, total_tokens=16 * 16 * 100,
                tokens_per_step=16 * 16, micro_batch_size=4, lr=1.0, min_lr=0.1, warmup_steps=10)  # fmt: skip
    args.update(kw)
    return StagePlan(**args)


# --------------------------------------------------------------------------- the paper's recipe


def test_official_370m_recipe():
    cfg = load_config(REPO / "configs" / "paper-370m-patch.yaml")
    p = StagePlan.from_config(cfg, dp_size=8)
    patch, token = p.phases
    assert p.tokens_per_step == 2_097_152 and p.total_steps == 135_000
    assert p.total_tokens == 283_115_520_000
    assert (patch.name, patch.steps, patch.first_step, patch.last_step) == (
        "patch",
        90_000,
        0,
        89_999,
    )
    assert (token.name, token.steps, token.first_step, token.last_step) == (
        "token",
        45_000,
        90_000,
        134_999,
    )
    assert p.switch_step == 90_000
    # 8,192-token windows read as 2,048 patches (+4 target tokens), then 2,048-token windows
    assert (patch.patch_size, patch.seq_len, patch.tokens_per_sequence, patch.window) == (
        4,
        2048,
        8192,
        8196,
    )
    assert (token.patch_size, token.seq_len, token.tokens_per_sequence, token.window) == (
        1,
        2048,
        2048,
        2049,
    )
    assert patch.tokens_per_step == token.tokens_per_step == 2_097_152
    assert (patch.sequences_per_step, token.sequences_per_step) == (256, 1024)
    # the official scripts: 8 GPUs x 4 sequences, gradient accumulation 8 then 32
    assert (patch.micro_batch_size, patch.grad_accum, patch.dp_size) == (4, 8, 8)
    assert (token.micro_batch_size, token.grad_accum, token.dp_size) == (4, 32, 8)
    assert (patch.tokens, token.tokens) == (188_743_680_000, 94_371_840_000)
    assert p.cost_ratio == pytest.approx(0.5, abs=1e-5)


def test_token_baseline_is_one_phase_of_the_same_budget():
    p = StagePlan.from_config(load_config(REPO / "configs" / "paper-370m-token.yaml"), dp_size=8)
    (token,) = p.phases
    assert (token.name, token.steps, token.window, token.grad_accum) == ("token", 135_000, 2049, 32)
    assert p.switch_step is None and p.cost_ratio == 1.0


# --------------------------------------------------------------------------- batch shapes


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(1, 8),
    seq_len=st.sampled_from([1, 4, 16, 128]),
    dp=st.integers(1, 8),
    micro=st.integers(1, 16),
    accum=st.integers(1, 16),
    fraction=st.floats(0.0, 0.99),
    steps=st.integers(1, 500),
)
def test_batch_shapes_keep_tokens_per_step(k, seq_len, dp, micro, accum, fraction, steps):
    # a valid token phase; the patch phase may or may not fit
    token_sequences = dp * micro * accum
    tokens_per_step = token_sequences * seq_len
    patch_steps = math.floor(fraction * steps + 0.5) if k > 1 else 0
    try:
        p = plan(warmup_steps=0, seq_len=seq_len, patch_size=k, patch_fraction=fraction, total_tokens=steps * tokens_per_step,
                 tokens_per_step=tokens_per_step, micro_batch_size=micro, dp_size=dp)  # fmt: skip
    except ConfigError as exc:  # refused only for a stated reason
        assert patch_steps, str(exc)
        if steps - patch_steps < 1:
            assert "leaves none for the token phase" in str(exc)
        elif token_sequences % k:
            assert "multiple of model.seq_len x patch.size" in str(exc)
        else:
            assert (token_sequences // k) % dp and "data-parallel size" in str(exc)
        return
    assert sum(ph.steps for ph in p.phases) == p.total_steps == steps
    assert [ph.first_step for ph in p.phases] == [0, p.phases[0].steps][: len(p.phases)]
    token = p.phases[-1]
    for ph in p.phases:
        assert ph.tokens_per_step == tokens_per_step  # equal in both phases
        assert ph.micro_batch_size * ph.grad_accum * ph.dp_size == ph.sequences_per_step
        assert ph.seq_len == seq_len  # the transformer's length never changes
        assert ph.window == ph.patch_size * seq_len + ph.patch_size
        assert ph.micro_batch_size <= micro
    if len(p.phases) == 2:
        patch = p.phases[0]
        assert patch.patch_size == k > 1
        assert patch.sequences_per_step * k == token.sequences_per_step
        assert patch.steps == patch_steps
        if token.grad_accum % k == 0:  # the rule: keep the micro-batch, accumulate K x less
            assert (patch.micro_batch_size, patch.grad_accum) == (micro, token.grad_accum // k)
    else:
        assert token.steps == steps and patch_steps == 0


@pytest.mark.parametrize(
    "token_sequences, micro, dp, patch_shape",
    [
        (32, 4, 2, (4, 1)),  # accumulation 4 divides by K=4: keep micro 4, accumulate 1
        (8, 4, 1, (2, 1)),  # accumulation 2: only 2 sequences per step, so micro 2
        (24, 8, 1, (6, 1)),  # accumulation 3: 6 patch sequences per rank, largest divisor <= 8
        (48, 4, 2, (3, 2)),  # accumulation 6: 6 per rank, largest divisor <= 4 is 3
    ],
)
def test_patch_micro_batch_rule(token_sequences, micro, dp, patch_shape):
    p = plan(warmup_steps=0, tokens_per_step=token_sequences * 16, micro_batch_size=micro, dp_size=dp,
             total_tokens=token_sequences * 16 * 10)  # fmt: skip
    patch, token = p.phases
    assert (patch.micro_batch_size, patch.grad_accum) == patch_shape
    assert token.micro_batch_size == micro


def test_impossible_shapes_are_config_errors():
    with pytest.raises(
        ConfigError, match="2 patch-phase sequences per step .* data-parallel size 4"
    ):
        plan(tokens_per_step=8 * 16, micro_batch_size=2, dp_size=4)
    with pytest.raises(
        ConfigError, match=r"micro_batch_size x DP=3 .* \(none fits: 16 is not divisible by DP=3\)"
    ):
        plan(dp_size=3)


# --------------------------------------------------------------------------- steps


def test_lambda_rounds_to_the_nearest_step_halves_up():
    assert plan(warmup_steps=0, total_tokens=256 * 3).phases[0].steps == 2  # 0.5 x 3 = 1.5 -> 2
    assert (
        plan(warmup_steps=0, total_tokens=256 * 3, patch_fraction=0.4).phases[0].steps == 1
    )  # 1.2 -> 1
    assert (
        plan(warmup_steps=0, total_tokens=256 * 100 + 255).total_steps == 100
    )  # the partial step is dropped
    assert (
        plan(warmup_steps=0, patch_fraction=0.004).phases[0].name == "token"
    )  # 0.4 steps -> no patch phase
    with pytest.raises(ConfigError, match="leaves none for the token phase"):
        plan(total_tokens=256, patch_fraction=0.5)


def test_lambda_zero_and_k_one_are_one_token_phase():
    plain = plan(patch_fraction=0.0)
    k_one = plan(patch_size=1, patch_fraction=0.5)
    for p in (plain, k_one):
        (token,) = p.phases
        assert (token.name, token.steps, token.window, token.grad_accum) == ("token", 100, 17, 4)
    # K=1 trains exactly as a plain token run: same shapes, same LR at every step
    assert plain.state_dict()["phases"] == k_one.state_dict()["phases"]
    assert [plain.lr(s) for s in range(100)] == [k_one.lr(s) for s in range(100)]


def test_phase_at_and_max_steps():
    p = plan(max_steps=30)
    assert [p.phase_at(s).name for s in (0, 49, 50, 99)] == ["patch", "patch", "token", "token"]
    with pytest.raises(IndexError):
        p.phase_at(100)
    assert p.steps_to_run == 30 and p.total_steps == 100
    assert p.tokens_after(60) == 60 * 256


# --------------------------------------------------------------------------- learning rate


def test_lr_warmup_decay_floor_and_rewarm():
    p = plan(lr=1.0, min_lr=0.1, warmup_steps=10)  # 50 patch steps, then 50 token steps
    for first in (0, 50):  # each phase: its own warmup and decay
        assert p.lr(first) == pytest.approx(0.1)  # (i + 1) / warmup
        assert p.lr(first + 4) == pytest.approx(0.5)
        assert p.lr(first + 9) == pytest.approx(1.0)  # peak at the last warmup step
        # 40 decay steps: step 10 + 19 is halfway through the cosine
        assert p.lr(first + 29) == pytest.approx(
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 40))
        )
        assert p.lr(first + 29) == pytest.approx(0.55)
        assert p.lr(first + 49) == pytest.approx(0.1)  # the floor, exactly at the phase's end
    assert p.lr(49) < p.lr(51) < p.lr(59)  # re-warm at the switch
    assert all(0.1 - 1e-12 <= p.lr(s) <= 1.0 for s in range(100))


def test_lr_decay_kinds_and_single_curve():
    linear = plan(lr_decay="linear")
    assert linear.lr(29) == pytest.approx(1.0 - 0.9 * 20 / 40)
    constant = plan(lr_decay="constant")
    assert constant.lr(49) == constant.lr(99) == 1.0 and constant.lr(50) == pytest.approx(0.1)
    single = plan(rewarm=False)
    whole = LRSchedule(1.0, 0.1, 10, 100, 0, "cosine")
    assert [single.lr(s) for s in range(100)] == [whole(s) for s in range(100)]
    assert single.lr(50) < single.lr(49)  # no re-warm: the curve just continues
    assert single.lr(99) == pytest.approx(0.1)


def test_warmup_must_be_shorter_than_every_curve():
    with pytest.raises(
        ConfigError,
        match="train.warmup_steps=50: expected fewer than the 50 steps of the patch phase",
    ):
        plan(warmup_steps=50)  # 50 patch steps, 50 token steps
    with pytest.raises(ConfigError, match="the 20 steps of the token phase"):
        plan(patch_fraction=0.8, warmup_steps=20)  # 80 patch steps, 20 token steps
    # one curve over the whole run (no re-warm): only the run must outlast the warmup
    assert plan(warmup_steps=50, rewarm=False).phases[1].lr_schedule.warmup_steps == 50
    with pytest.raises(ConfigError, match="the 100 steps of the whole run"):
        plan(warmup_steps=100, rewarm=False)
    assert plan(warmup_steps=0).phases[0].lr_schedule.warmup_steps == 0


def test_warmup_as_a_percentage_of_each_phase():
    p = plan(patch_fraction=0.8, warmup_steps="5%")  # 80 patch steps, 20 token steps
    assert [ph.lr_schedule.warmup_steps for ph in p.phases] == [4, 1]
    assert plan(patch_fraction=0.8, warmup_steps="0.1%").phases[1].lr_schedule.warmup_steps == 1
    assert plan(warmup_steps="0%").phases[0].lr_schedule.warmup_steps == 0
    for bad in ("5", "abc%", "100%", "-1%"):
        with pytest.raises(
            ConfigError, match=r"train.warmup_steps=.*: expected a step count or a percentage"
        ):
            plan(warmup_steps=bad)


def test_lr_schedule_without_warmup_and_in_a_short_phase():
    s = LRSchedule(1.0, 0.0, 0, 4, 0, "cosine")
    assert s(3) == pytest.approx(0.0) and s(0) < 1.0
    short = LRSchedule(1.0, 0.0, 10, 4, 0, "cosine")  # a phase shorter than its warmup
    assert [short(i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])


# --------------------------------------------------------------------------- state and text


def test_state_dict_is_json_and_rebuilds_the_plan():
    cfg = load_config(REPO / "configs" / "paper-370m-patch.yaml")
    p = StagePlan.from_config(cfg, dp_size=8)
    state = json.loads(json.dumps(p.state_dict()))
    again = StagePlan.from_state_dict(state)
    assert again == p and again.state_dict() == p.state_dict()
    assert (
        state["phases"][0]["window"] == 8196
        and state["phases"][1]["lr_schedule"]["start_step"] == 90_000
    )


def test_table_names_the_phases_and_the_switch():
    text = plan(dp_size=2).table()
    assert "micro x accum x DP" in text
    assert "2 x 1 x 2" in text and "4 x 2 x 2" in text  # 2 patch sequences per rank
    assert "switch at step 50: K 4 -> 1, window 68 -> 17 tokens" in text
    assert "re-warm 10 steps to 1" in text
    assert "optimizer state reset" in text
    assert "optimizer state kept" in plan(reset_optimizer=False).table()


# --------------------------------------------------------------------------- FLOPs


DIMS = ModelDims(
    vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, seq_len=32
)


def test_flops_match_a_hand_count():
    D, F, L, V, kv = 64, 160, 32, 1024, 32  # kv = head size 16 x 2 kv heads
    per_layer = 2 * D * (D + 2 * kv) + 2 * D * D + 4 * L * D + 6 * D * F
    forward = 2 * per_layer + 2 * D * V
    assert sum(forward_flops_per_position(DIMS).values()) == forward
    assert training_flops_per_sequence(DIMS, 1) == 3 * L * forward
    # the 6N + 12 L D n_layers rule with N the matmul parameters (output layer included)
    params = DIMS.parameters()
    matmul = params["transformer"] - (2 * 2 + 1) * D + params["output"]
    assert training_flops_per_sequence(DIMS, 1) == L * (6 * matmul + 12 * L * D * 2)
    # a patch-phase sequence costs the same plus averaging K embeddings per position
    assert training_flops_per_sequence(DIMS, 4) == 3 * L * forward + L * 2 * 4 * D


def test_plan_flops_and_cost_ratio():
    p = plan(warmup_steps=0, seq_len=32, tokens_per_step=32 * 4 * 8, total_tokens=32 * 4 * 8 * 30, patch_fraction=2 / 3,
             model_dims=DIMS)  # fmt: skip
    patch, token = p.flops.phases
    assert patch.per_step == pytest.approx(token.per_step / 4, rel=1e-3)
    assert p.phases[0].flops_per_step == patch.per_step
    assert p.flops.total == 20 * patch.per_step + 10 * token.per_step
    assert p.flops.simple_ratio == pytest.approx(0.5)
    assert p.cost_ratio == p.flops.precise_ratio == pytest.approx(0.5, rel=1e-3)
    assert p.flops_so_far(25) == 20 * patch.per_step + 5 * token.per_step
    # without dims the ratio still follows the rounded steps
    assert plan(warmup_steps=0, total_tokens=256 * 3).cost_ratio == pytest.approx(2 / 3 / 4 + 1 / 3)
