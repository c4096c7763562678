"""TP layers at TP=2 against the same layers at TP=1: init shards, forward, backward."""

import pytest
import torch
import torch.nn.functional as F

from megapatch.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    destroy_model_parallel,
    init_weight_shard_,
    initialize_model_parallel,
    pad_vocab_size,
    parameter_seed,
)
from tests.distributed import run_distributed

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")

D_IN, D_OUT, VOCAB, VOCAB_PADDED, K = 6, 8, 9, 10, 3


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, D_IN, generator=g)  # [B, L, D_in]
    grad_col = torch.randn(2, 5, D_OUT, generator=g)
    grad_row = torch.randn(2, 5, D_IN, generator=g)
    # Ids on both shards (rows 0-4 and 5-9), at the shard boundary 4|5, and repeated in a patch.
    ids = torch.tensor([[0, 4, 5], [8, 8, 1], [4, 4, 4], [5, 2, 7]])  # [M, K]
    grad_emb = torch.randn(4, 4, generator=g)
    return x, grad_col, grad_row, ids, grad_emb


def _build():
    column = ColumnParallelLinear(D_IN, D_OUT, gather_output=True, seed=11)
    row = RowParallelLinear(D_OUT, D_IN, input_is_parallel=False, seed=12)
    # An MLP-shaped chain: column output stays sharded and feeds the row layer directly.
    chain_in = ColumnParallelLinear(D_IN, D_OUT, seed=13)
    chain_out = RowParallelLinear(D_OUT, D_IN, seed=14)
    embedding = VocabParallelEmbedding(
        VOCAB_PADDED, 4, seed=15, init_rows=VOCAB, backend="reference"
    )
    return column, row, chain_in, chain_out, embedding


def _run_layers():
    """Forward and backward of each layer; returns numpy arrays (tensors cannot cross the result queue)."""
    x, grad_col, grad_row, ids, grad_emb = _inputs()
    column, row, chain_in, chain_out, embedding = _build()
    out = {}

    xc = x.clone().requires_grad_(True)
    y = column(xc)
    y.backward(grad_col)
    out["column"] = (y, xc.grad, column.weight, column.weight.grad)

    xr = torch.randn(2, 5, D_OUT, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = row(xr)
    y.backward(grad_row)
    out["row"] = (y, xr.grad, row.weight, row.weight.grad)

    xm = x.clone().requires_grad_(True)
    y = chain_out(F.silu(chain_in(xm)))
    y.backward(grad_row)
    out["chain"] = (y, xm.grad, chain_in.weight.grad, chain_out.weight.grad)

    y = embedding(ids)
    y.backward(grad_emb)
    out["embedding"] = (y, embedding.weight, embedding.weight.grad)
    out["marks"] = [
        (p.tensor_model_parallel, p.partition_dim)
        for p in (column.weight, row.weight, embedding.weight)
    ]
    return {k: [t.detach().numpy() for t in v] if k != "marks" else v for k, v in out.items()}


def _tp_layers(rank, world_size):
    initialize_model_parallel(world_size)
    try:
        return _run_layers()
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def tp1():
    return _run_layers()


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp_layers, 2, reuse_workers=True)


def _shard(full, rank, dim, tp=2):
    return torch.from_numpy(full).chunk(tp, dim=dim)[rank]


def _close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual), torch.as_tensor(expected), rtol=1e-5, atol=1e-6
    )


@pytest.mark.distributed
def test_init_shards_are_slices_of_the_tp1_weights(tp1, tp2):
    for rank, r in enumerate(tp2):
        assert torch.equal(torch.from_numpy(r["column"][2]), _shard(tp1["column"][2], rank, 0))
        assert torch.equal(torch.from_numpy(r["row"][2]), _shard(tp1["row"][2], rank, 1))
        assert torch.equal(
            torch.from_numpy(r["embedding"][1]), _shard(tp1["embedding"][1], rank, 0)
        )


def test_vocabulary_padding_rows_start_at_zero(tp1):
    weight = torch.from_numpy(tp1["embedding"][1])
    assert torch.all(weight[VOCAB:] == 0) and torch.all(weight[:VOCAB] != 0)


@pytest.mark.distributed
def test_column_and_row_parallel_linear_match_tp1(tp1, tp2):
    for rank, r in enumerate(tp2):
        for name, weight_dim in (("column", 0), ("row", 1)):
            y, grad_x, _, grad_w = r[name]
            _close(y, tp1[name][0])  # outputs are replicated (gathered / reduced)
            _close(grad_x, tp1[name][1])
            _close(grad_w, _shard(tp1[name][3], rank, weight_dim))
        y, grad_x, grad_in, grad_out = r["chain"]
        _close(y, tp1["chain"][0])
        _close(grad_x, tp1["chain"][1])
        _close(grad_in, _shard(tp1["chain"][2], rank, 0))
        _close(grad_out, _shard(tp1["chain"][3], rank, 1))


@pytest.mark.distributed
def test_vocab_parallel_embedding_matches_tp1_and_the_mean_of_rows(tp1, tp2):
    _, _, _, ids, _ = _inputs()
    weight = torch.from_numpy(tp1["embedding"][1])
    _close(tp1["embedding"][0], weight[ids].mean(dim=1))
    for rank, r in enumerate(tp2):
        y, _, grad_w = r["embedding"]
        _close(y, tp1["embedding"][0])
        _close(grad_w, _shard(tp1["embedding"][2], rank, 0))


@pytest.mark.distributed
def test_sharded_weights_are_marked_for_deepspeed(tp1, tp2):
    assert tp1["marks"] == [(True, 0), (True, 1), (True, 0)]
    assert tp2[0]["marks"] == tp2[1]["marks"] == [(True, 0), (True, 1), (True, 0)]


def test_pad_vocab_size_rounds_up_to_divisor_times_tp():
    assert pad_vocab_size(32000, 128, 1) == 32000
    assert pad_vocab_size(32001, 128, 2) == 32256
    assert pad_vocab_size(250, 1, 4) == 252
    assert pad_vocab_size(251, 1, 1) == 251


def test_parameter_seed_depends_on_seed_and_name_only():
    assert parameter_seed(0, "layers.0.mlp.up_proj.weight") == parameter_seed(
        0, "layers.0.mlp.up_proj.weight"
    )
    assert parameter_seed(0, "a") != parameter_seed(0, "b")
    assert parameter_seed(0, "a") != parameter_seed(1, "a")
    assert 0 <= parameter_seed(123, "x") < 2**63


def test_real_rows_do_not_depend_on_padding():
    small, large = torch.empty(9, 4), torch.empty(16, 4)
    init_weight_shard_(small, 0, std=0.02, seed=5, init_rows=9)
    init_weight_shard_(large, 0, std=0.02, seed=5, init_rows=9)
    assert torch.equal(small, large[:9]) and torch.all(large[9:] == 0)
