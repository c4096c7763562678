"""patch_loss, every backend, against a float64 ground truth."""

import pytest
import torch

from megapatch.ops import patch_loss
from tests.ops import cases
from tests.ops.truth import loss_inputs, loss_truth, rel_err

ALL = ["reference", "torch", "triton"]
LOSS_TOL, GRAD_TOL = 1e-6, 1e-5


def _assert_close(errors):
    assert errors["loss"] <= LOSS_TOL, errors
    assert errors["grad_hidden"] <= GRAD_TOL, errors
    assert errors["grad_weight"] <= GRAD_TOL, errors


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_odd_shapes_padded_vocab_ignored_targets(run, k):
    # N=252, V=507, D=123; the last 7 weight rows are padding; 20% of targets ignored.
    _assert_close(run(cases.loss_errors, 252, 507, 123, k, 500, 0.2, k))


@pytest.mark.parametrize("backend", ALL)
def test_unpadded_vocab_no_ignored(run):
    _assert_close(run(cases.loss_errors, 70, 300, 48, 4, None, 0.0, 1))


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("fuse", [True, False], ids=["grads-in-forward", "recompute"])
def test_torch_many_ragged_chunks(run, fuse):
    # Chunks of 50 rows: 252 rows run as five full chunks and a ragged one of 2.
    _assert_close(run(cases.loss_errors, 252, 507, 123, 4, 500, 0.2, 7, 50, fuse))


# Every way the Triton loss can get its gradient (triton_ops.BACKWARD_MODES).
TRITON_MODES = ["atomic", "gemm", "recompute", "in-forward"]


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_modes_are_all_tested(run):
    assert list(run(cases.triton_modes)) == TRITON_MODES


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("mode", TRITON_MODES)
def test_triton_backward_modes(run, mode):
    # 252 rows: the gemm mode runs 16 ragged chunks of 16 rows (the last one 12), the cuBLAS
    # modes 8 chunks of 32 (the last one 28) whose 500 real columns span two row-kernel
    # tiles (the second ragged).
    _assert_close(run(cases.loss_errors_with_backward, mode, 252, 507, 123, 4, 500, 0.2, 3))


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("mode", ["recompute", "in-forward"])
@pytest.mark.parametrize("k", [1, 8])
def test_triton_cublas_modes_other_k(run, mode, k):
    # K=8 with duplicates and ignored targets; K=1 unpadded, nothing ignored.
    args = (252, 507, 123, 8, 500, 0.2, 8) if k == 8 else (70, 300, 48, 1, None, 0.0, 1)
    _assert_close(run(cases.loss_errors_with_backward, mode, *args))


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("mode", ["recompute", "in-forward"])
def test_triton_cublas_modes_edge_cases(run, mode):
    assert run(cases.in_mode, mode, cases.all_ignored) == (0.0, 0, 0)
    assert run(cases.in_mode, mode, cases.all_ignored, [1.0, 0.0]) == (0.0, 0, 0)
    loss_err, grad_err, weight_grad = run(cases.in_mode, mode, cases.custom_ignore_frozen_weight)
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
    assert weight_grad is None
    for weights in (None, POWER_LAW):
        largest, logits = run(cases.in_mode, mode, cases.largest_tensor, 256, 500, 16, 4, weights)
        assert largest <= logits // 10
        plain, tracked = run(cases.in_mode, mode, cases.no_grad_matches_grad, weights)
        assert plain <= LOSS_TOL and tracked <= LOSS_TOL


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_in_forward_refuses_a_second_backward(run):
    message = run(cases.in_mode, "in-forward", cases.backward_twice)
    assert message is not None and "backward through it twice" in message


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_unknown_mode_is_one_config_line(run):
    message = run(cases.unknown_mode)
    assert message.startswith("triton patch loss mode 'fast'")
    assert "expected one of atomic, gemm, recompute, in-forward" in message


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_fp32_accumulation_of_bf16_products(run):
    # bf16 inputs are exact in fp32 and float64; what remains is fp32 summation (and, on a
    # torch without out_dtype, one bf16 rounding of each slice's product).
    accumulated, product = run(cases.fp32_accumulation_of_16bit_products)
    assert accumulated <= 4e-3 and product <= 4e-3


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_cublas_chunk_rows(run):
    # At least 8 chunks, whole 128-row tiles, at most 256 MiB of logits.
    assert run(cases.cublas_chunk_rows, 8192, 32000, 2) == 1024
    assert run(cases.cublas_chunk_rows, 16384, 128256, 2) == 1024
    assert run(cases.cublas_chunk_rows, 32768, 32000, 2) == 4096
    assert run(cases.cublas_chunk_rows, 16384, 128256, 6) == 256  # fp32 logits + bf16 grad
    assert run(cases.cublas_chunk_rows, 5, 300, 4) == 1


@pytest.mark.parametrize("backend", ALL)
def test_all_targets_ignored_gives_zero_loss_and_grads(run):
    assert run(cases.all_ignored) == (0.0, 0, 0)


@pytest.mark.parametrize("backend", ALL)
def test_custom_ignore_index_and_frozen_weight(run):
    loss_err, grad_err, weight_grad = run(cases.custom_ignore_frozen_weight)
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
    assert weight_grad is None


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_grad_matches_grad_mode(backend):
    hidden, weight, targets = loss_inputs(64, 200, 32, 4, seed=4)
    with torch.no_grad():
        plain = patch_loss(hidden, weight, targets, backend=backend)
    tracked = patch_loss(hidden.requires_grad_(), weight, targets, backend=backend)
    assert plain.item() == pytest.approx(tracked.item(), rel=1e-6)


def test_k1_is_cross_entropy():
    hidden, weight, targets = loss_inputs(64, 200, 32, 1, seed=5)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets[:, 0])
    for backend in ("reference", "torch"):
        got = patch_loss(hidden, weight, targets, backend=backend)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_inputs_accumulate_in_fp32(backend):
    hidden, weight, targets = loss_inputs(96, 300, 64, 4, seed=6)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    # The truth on exactly the bf16 values: what remains is accumulation and output rounding.
    want, want_h, want_w = loss_truth(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = patch_loss(h, w, targets, backend=backend)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert loss.dtype == torch.float32  # never rounded to bf16 for the logs
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    assert rel_err(h.grad, want_h) <= 4e-3 and rel_err(w.grad, want_w) <= 4e-3


@pytest.mark.parametrize("backend", ALL)
def test_logits_never_materialized_outside_reference(run, backend):
    # [N, V] fp32 logits are 512 kB; the largest legitimate tensor is the [V, D] fp32 weight
    # gradient (32 kB) or one chunk (16 kB).
    largest, logits = run(cases.largest_tensor)
    if backend == "reference":
        assert largest >= logits  # the oracle does build them: the probe sees it
    else:
        assert largest <= logits // 10


# ----------------------------------------------------------------------------- position weights

POWER_LAW = [1.0, 1 / 2, 1 / 3, 1 / 4]
ZEROING = [0.0, 2.0, 0.0, 1.0]  # two positions get no weight at all


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "k, weights",
    [
        (4, POWER_LAW),
        (4, ZEROING),
        (4, [0.0, 0.0, 5.0, 0.0]),
        (8, [8, 7, 6, 5, 4, 3, 2, 1]),
        (1, [3.0]),
    ],
    ids=["power-law", "zeroing", "one-position", "k8", "k1"],
)
def test_weighted_against_float64(run, k, weights):
    # Padded vocabulary (7 rows), 20% of targets ignored.
    _assert_close(run(cases.loss_errors, 252, 507, 123, k, 500, 0.2, k, None, True, weights))


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("fuse", [True, False], ids=["grads-in-forward", "recompute"])
def test_weighted_torch_many_ragged_chunks(run, fuse):
    _assert_close(run(cases.loss_errors, 252, 507, 123, 4, 500, 0.2, 7, 50, fuse, ZEROING))


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("mode", TRITON_MODES)
def test_weighted_triton_backward_modes(run, mode):
    args = (252, 507, 123, 4, 500, 0.2, 3, None, True, POWER_LAW)
    _assert_close(run(cases.loss_errors_with_backward, mode, *args))


@pytest.mark.parametrize("backend", ALL)
def test_nothing_scored_with_weights_gives_zero_loss_and_grads(run):
    # Targets only at the zero-weight position: the normaliser is 0, the loss 0, not NaN.
    assert run(cases.all_ignored, [1.0, 0.0]) == (0.0, 0, 0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_explicit_uniform_weights_match_unweighted(run, scale):
    loss_diff, grad_diff = run(cases.uniform_vs_unweighted, scale)
    assert loss_diff <= LOSS_TOL and grad_diff <= GRAD_TOL


@pytest.mark.parametrize(
    "backend, variant",
    [
        ("reference", None),
        ("torch", "fused"),
        ("torch", "recompute"),
        ("triton", "atomic"),
        ("triton", "gemm"),
    ],
)
def test_unweighted_is_bit_for_bit_the_code_before_weights(run, variant):
    same = run(cases.unweighted_matches_pinned, variant)
    if isinstance(same, str):
        pytest.skip(same)
    assert same is True


@pytest.mark.parametrize("backend", ALL)
def test_weighted_logits_never_materialized_outside_reference(run, backend):
    largest, logits = run(cases.largest_tensor, 256, 500, 16, 4, ZEROING)
    if backend == "reference":
        assert largest >= logits
    else:
        assert largest <= logits // 10


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_weighted_no_grad_and_bf16(backend):
    hidden, weight, targets = loss_inputs(96, 300, 64, 4, seed=6)
    weights = torch.tensor(POWER_LAW)
    with torch.no_grad():  # the torch backend's unfused forward
        plain = patch_loss(hidden, weight, targets, position_weights=weights, backend=backend)
    want, _, _ = loss_truth(hidden, weight, targets, position_weights=POWER_LAW)
    assert abs(plain.item() - want.item()) <= LOSS_TOL * want.item()

    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = patch_loss(h, w, targets, position_weights=weights.bfloat16(), backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    # bf16 weights round POWER_LAW (1/3 to 3 digits): the truth uses the rounded values.
    want, want_h, want_w = loss_truth(
        hidden, weight, targets, position_weights=weights.bfloat16().double()
    )
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    assert rel_err(h.grad, want_h) <= 4e-3 and rel_err(w.grad, want_w) <= 4e-3
