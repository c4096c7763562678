"""TP=2 and TP=4 models (real gloo processes) equal the TP=1 model built from the same seed:
weights, patch and token losses, logits and every gradient. The vocabulary (251) is not
divisible by the TP size, so the sharded models carry padding rows; attention is GQA."""

import pytest
import torch
import torch.distributed as dist

from megapatch.errors import ConfigError
from megapatch.model import GPT, GPTConfig
from megapatch.parallel import (
    destroy_model_parallel,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
)
from tests.distributed import run_distributed
from tests.fixtures import tiny_gpt_config

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")

V = 251
SEED = 7
K = 2
BACKENDS = ("reference", "auto")


def config(backend: str, **overrides) -> GPTConfig:
    fields = dict(n_heads=8, n_kv_heads=4, seq_len=6, make_vocab_size_divisible_by=1)
    return tiny_gpt_config(vocab_size=V, ops_backend=backend, **{**fields, **overrides})


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, V, (2, K * 6 + K), generator=g)  # patch-phase windows [B, K·L + K]
    targets = w[:, K:].clone()
    targets[0, :3] = -100  # some ignored targets
    targets[1, 5] = V - 1  # the last real token, next to the padding
    return w[:, :-K], targets


def _full(name: str, tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The TP=1 view of a (possibly sharded) parameter or gradient: gather, drop padding."""
    if (
        getattr(param, "tensor_model_parallel", False)
        and get_tensor_model_parallel_world_size() > 1
    ):
        parts = [torch.empty_like(tensor) for _ in range(get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, tensor.contiguous(), group=get_tensor_model_parallel_group())
        tensor = torch.cat(parts, dim=param.partition_dim)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        tensor = tensor[:V]
    return tensor.detach().clone()


def _run(backend: str) -> dict:
    """Everything to compare, as numpy (tensors cannot cross the result queue)."""
    model = GPT(config(backend), seed=SEED)
    inputs, targets = batch()
    out = {"weights": {n: _full(n, p, p) for n, p in model.named_parameters()}}

    patch_loss = model(inputs, targets, patch_size=K)
    patch_loss.backward()
    out["patch_loss"] = patch_loss.detach()
    out["patch_grads"] = {n: _full(n, p.grad, p) for n, p in model.named_parameters()}
    model.zero_grad()

    token_inputs, token_targets = inputs[:, :-1], inputs[:, 1:]
    token_loss = model(token_inputs, token_targets)
    token_loss.backward()
    out["token_loss"] = token_loss.detach()
    out["token_grads"] = {n: _full(n, p.grad, p) for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(token_inputs)
    logits.sum().backward()  # through the gather: each rank's head shard gets its own slice
    out["logits"] = logits.detach()
    out["logits_head_grad"] = _full(
        "lm_head.weight", model.lm_head.weight.grad, model.lm_head.weight
    )
    return _to_numpy(out)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return tree.numpy()


def _tp_rank(rank, world_size, backends):
    initialize_model_parallel(world_size)
    try:
        results = {backend: _run(backend) for backend in backends}
        try:
            GPT(config("reference", n_heads=8, n_kv_heads=2), seed=SEED)
            results["gqa_error"] = None
        except ConfigError as e:
            results["gqa_error"] = str(e)
        return results
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def tp1():
    torch.set_num_threads(1)
    return {backend: _run(backend) for backend in BACKENDS}


def _assert_same_model(actual: dict, expected: dict) -> None:
    torch.testing.assert_close(
        torch.from_numpy(actual["patch_loss"]),
        torch.from_numpy(expected["patch_loss"]),
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(
        torch.from_numpy(actual["token_loss"]),
        torch.from_numpy(expected["token_loss"]),
        rtol=0,
        atol=1e-5,
    )
    assert actual["logits"].shape == expected["logits"].shape == (2, 2 * 6 - 1, V)
    torch.testing.assert_close(
        torch.from_numpy(actual["logits"]), torch.from_numpy(expected["logits"]), rtol=0, atol=1e-5
    )
    for name, weight in expected["weights"].items():
        assert torch.equal(torch.from_numpy(actual["weights"][name]), torch.from_numpy(weight)), (
            name
        )
    for kind in ("patch_grads", "token_grads"):
        assert actual[kind].keys() == expected[kind].keys()
        for name, grad in expected[kind].items():
            grad = torch.from_numpy(grad)
            scale = grad.abs().max().item()
            assert scale > 0, f"{kind} {name} is all zero"
            torch.testing.assert_close(
                torch.from_numpy(actual[kind][name]) / scale,
                grad / scale,
                rtol=0,
                atol=1e-5,
                msg=f"{kind} {name}",
            )
    torch.testing.assert_close(
        torch.from_numpy(actual["logits_head_grad"]),
        torch.from_numpy(expected["logits_head_grad"]),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_model_equals_tp1(tp, tp1):
    results = run_distributed(_tp_rank, tp, BACKENDS, reuse_workers=True)
    for result in results:  # every rank holds the same gathered model
        for backend in BACKENDS:
            _assert_same_model(result[backend], tp1[backend])
        if tp == 4:
            assert (
                result["gqa_error"]
                == "parallel.tensor_model_parallel_size=4: expected a divisor of model.n_heads=8 and model.n_kv_heads=2"
            )
        else:
            assert result["gqa_error"] is None


# -- sequence parallelism ------------------------------------------------------------------


def _sp_run(backend: str, sequence_parallel: bool) -> dict:
    """Patch and token losses and every gradient of a seq_len=8 model (8 divides TP=2, 4)."""
    model = GPT(config(backend, seq_len=8, sequence_parallel=sequence_parallel), seed=SEED)
    g = torch.Generator().manual_seed(1)
    patch_window = torch.randint(0, V, (2, K * 8 + K), generator=g)
    token_window = torch.randint(0, V, (2, 8 + 1), generator=g)
    out = {}
    for kind, window, k in (("patch", patch_window, K), ("token", token_window, 1)):
        targets = window[:, k:].clone()
        targets[0, :3] = -100
        loss = model(window[:, :-k], targets, patch_size=k)
        loss.backward()
        out[f"{kind}_loss"] = loss.detach()
        out[f"{kind}_grads"] = {n: _full(n, p.grad, p) for n, p in model.named_parameters()}
        model.zero_grad()
    return _to_numpy(out)


def _sp_rank(rank, world_size, backends):
    initialize_model_parallel(world_size)
    try:
        return {(backend, sp): _sp_run(backend, sp) for backend in backends for sp in (False, True)}
    finally:
        destroy_model_parallel()


def _assert_same_losses_and_grads(actual: dict, expected: dict, what: str) -> None:
    for kind in ("patch", "token"):
        torch.testing.assert_close(
            torch.from_numpy(actual[f"{kind}_loss"]),
            torch.from_numpy(expected[f"{kind}_loss"]),
            rtol=0,
            atol=1e-5,
            msg=f"{what}: {kind} loss",
        )
        grads, reference = actual[f"{kind}_grads"], expected[f"{kind}_grads"]
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            grad = torch.from_numpy(grad)
            scale = grad.abs().max().item()
            assert scale > 0, f"{what}: {kind} {name} is all zero"
            torch.testing.assert_close(
                torch.from_numpy(grads[name]) / scale,
                grad / scale,
                rtol=0,
                atol=1e-5,
                msg=f"{what}: {kind} grad {name}",
            )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_equals_sequence_parallel_off_and_tp1(tp):
    torch.set_num_threads(1)
    tp1 = {backend: _sp_run(backend, False) for backend in BACKENDS}
    for rank, result in enumerate(run_distributed(_sp_rank, tp, BACKENDS, reuse_workers=True)):
        for backend in BACKENDS:
            on, off = result[(backend, True)], result[(backend, False)]
            _assert_same_losses_and_grads(on, off, f"TP={tp} rank {rank} {backend}: SP on vs off")
            _assert_same_losses_and_grads(
                on, tp1[backend], f"TP={tp} rank {rank} {backend}: SP vs TP=1"
            )


def test_sequence_parallel_needs_tp_and_a_divisible_sequence():
    with pytest.raises(
        ConfigError, match=r"parallel.sequence_parallel=True: expected false with TP=1"
    ):
        GPT(config("reference", sequence_parallel=True))
    with pytest.raises(ConfigError, match=r"model.seq_len=6: expected a multiple of the TP size 4"):
        config("reference", sequence_parallel=True).validate(4)
