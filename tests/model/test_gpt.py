"""The GPT at TP=1: token-mode and patch-mode losses against plain references, the Hugging
Face Llama conventions, init, counts, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megapatch.errors import ConfigError, DataError
from megapatch.model import GPT, GPTConfig, rotary_cos_sin
from tests.fixtures import tiny_gpt_config

torch.set_num_threads(1)

V = 250  # not a multiple of 128: the model pads to 256


def tiny(**overrides) -> GPTConfig:
    return tiny_gpt_config(vocab_size=V, **overrides)


def windows(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = max(a[name].abs().max().item(), 1e-12)
        torch.testing.assert_close(a[name] / scale, b[name] / scale, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_token_mode_loss_equals_cross_entropy_on_shifted_labels(backend):
    model = GPT(tiny(ops_backend=backend), seed=0)
    w = windows(3, 9)  # [B, L+1]
    inputs, labels = w[:, :-1], w[:, 1:].clone()
    labels[0, 2] = labels[2, 5] = -100  # ignored targets drop out of the mean

    loss = model(inputs, labels)
    loss.backward()
    ours = grads(model)
    model.zero_grad()

    logits = model(inputs)  # [B, T, V]
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert_grads_close(ours, grads(model))


def _reference_patch_loss(
    model: GPT, inputs: torch.Tensor, targets: torch.Tensor, K: int
) -> torch.Tensor:
    """The official code's recipe: mean of K embeddings in, K cross-entropies out."""
    B, T = inputs.shape
    L = T // K
    emb = model.embed_tokens.weight[inputs].reshape(B, L, K, -1).mean(dim=2)  # [B, L, D]
    cos, sin = rotary_cos_sin(torch.arange(L), model.cfg.head_dim, model.cfg.rope_theta)
    for layer in model.layers:
        emb = layer(emb, cos, sin)
    logits = model.norm(emb) @ model.lm_head.weight[:V].t()  # [B, L, V]
    log_probs = F.log_softmax(logits, dim=-1).view(B * L, V)
    next_patch = targets.reshape(B * L, K)
    return sum(F.nll_loss(log_probs, next_patch[:, k]) for k in range(K)) / K


@pytest.mark.parametrize("K", [2, 4])
def test_patch_mode_loss_equals_the_straightforward_reference(K):
    model = GPT(tiny(), seed=1)
    w = windows(2, K * 8 + K, seed=K)  # a window of K·L + K tokens
    loss = model(w[:, :-K], w[:, K:], patch_size=K)
    loss.backward()
    ours = grads(model)
    model.zero_grad()

    expected = _reference_patch_loss(model, w[:, :-K], w[:, K:], K)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert_grads_close(ours, grads(model))


def test_patch_mode_without_targets_returns_one_distribution_per_patch():
    logits = GPT(tiny(), seed=0)(windows(2, 16), patch_size=4)
    assert logits.shape == (2, 4, V)


@pytest.mark.slow
def test_weights_load_into_hugging_face_llama_one_to_one():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(rope_theta=500.0, norm_eps=1e-6)
    model = GPT(cfg, seed=2).eval()
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=False,
        )
    ).eval()
    # Same names under `model.`, vocabulary padding dropped: no permutation anywhere.
    state = {
        (name if name.startswith("lm_head") else f"model.{name}"): p[:V] if p.shape[0] == 256 else p
        for name, p in model.state_dict().items()
    }
    hf.load_state_dict(state, strict=True)
    ids = windows(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    w = windows(2, 18)
    results = []
    for checkpointing in (False, True):
        model = GPT(tiny(activation_checkpointing=checkpointing), seed=3)
        loss = model(w[:, :-2], w[:, 2:], patch_size=2)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert_grads_close(results[0][1], results[1][1])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_same_loss_gradients_and_parameter_names(checkpointing):
    # aot_eager traces and runs the same graphs inductor would fuse, without a C++ build
    w = windows(2, 18)
    results = []
    for compiled in (False, True):
        model = GPT(tiny(activation_checkpointing=checkpointing), seed=3)
        if compiled:
            model.compile_blocks(backend="aot_eager")
        loss = model(w[:, :-2], w[:, 2:], patch_size=2)
        loss.backward()
        results.append((loss.detach(), grads(model), list(model.state_dict())))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    assert_grads_close(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]  # checkpoints and exports are unaffected


def test_tied_embeddings_share_one_matrix():
    model = GPT(tiny(tie_embeddings=True, make_vocab_size_divisible_by=1), seed=0)
    assert model.lm_head is None and model.output_weight is model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    w = windows(2, 9)
    model(w[:, :-1], w[:, 1:]).backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0


def test_num_parameters_counts_real_weights_without_padding():
    unpadded = GPT(tiny(make_vocab_size_divisible_by=1), seed=0)
    assert unpadded.num_parameters() == sum(p.numel() for p in unpadded.parameters())
    padded = GPT(tiny(), seed=0)
    padding = (padded.padded_vocab_size - V) * 32 * 2
    assert padded.padded_vocab_size == 256
    assert padded.num_parameters() == sum(p.numel() for p in padded.parameters()) - padding
    assert padded.num_parameters(non_embedding=True) == padded.num_parameters() - 2 * V * 32


@pytest.mark.parametrize("K", [1, 4])
def test_flops_per_token_matches_a_flop_counter(K):
    cfg = tiny(d_model=64, n_heads=4, ffn_hidden=96)
    model = GPT(cfg, seed=0)
    w = windows(2, K * cfg.seq_len + K)
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as counted matmuls (full, not causal-halved).
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(w[:, :-K], w[:, K:], patch_size=K).backward()
    tokens = 2 * K * cfg.seq_len
    # Averaging K embeddings is a gather, invisible to the counter: K·D each way per position.
    embedding_average = 2 * cfg.d_model if K > 1 else 0
    assert model.flops_per_token(K) == counter.get_total_flops() / tokens + embedding_average


def test_init_is_seeded_and_scales_residual_outputs():
    cfg = tiny(d_model=64, ffn_hidden=128, n_layers=8)
    a, b, c = GPT(cfg, seed=4), GPT(cfg, seed=4), GPT(cfg, seed=5)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.all(pa == 1), name
        else:
            assert not torch.equal(pa, pc), name
    layer = a.layers[0]
    ratio = layer.mlp.up_proj.weight.std() / layer.mlp.down_proj.weight.std()
    assert abs(ratio / math.sqrt(2 * cfg.n_layers) - 1) < 0.05
    assert abs(layer.self_attn.q_proj.weight.std() / cfg.init_std - 1) < 0.05
    assert torch.all(a.embed_tokens.weight[V:] == 0) and torch.all(a.lm_head.weight[V:] == 0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m, w: m(w[:, :10], patch_size=4),
            ConfigError,
            "sequence length T=10 is not divisible by patch_size K=4",
        ),
        (
            lambda m, w: m(w[:, :8], w[:, :7]),
            ConfigError,
            r"targets must have the shape of input_ids \(2, 8\)",
        ),
        (
            lambda m, w: m(w[:, :8], patch_size=0),
            ConfigError,
            "patch_size=0 must be a positive integer",
        ),
        (lambda m, w: m(w[0]), ConfigError, r"input_ids must be an integer tensor \[B, T\]"),
        # 252 is a padding row of the 256-row embedding: still outside the real vocabulary.
        (
            lambda m, w: m(torch.full((2, 8), 252)),
            DataError,
            r"input_ids: token id 252 is outside the vocabulary \[0, 250\)",
        ),
        (lambda m, w: m(torch.full((2, 8), -1)), DataError, r"input_ids: token id -1 is outside"),
        (
            lambda m, w: m(w[:, :8], torch.full((2, 8), 250)),
            DataError,
            r"targets: token id 250 is outside",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    model = GPT(tiny(), seed=0)
    with pytest.raises(error, match=message):
        call(model, windows(2, 16))


def test_ignored_targets_are_not_out_of_vocabulary():
    model = GPT(tiny(), seed=0)
    targets = windows(2, 8)
    targets[:, :3] = -100
    assert torch.isfinite(model(windows(2, 8, seed=1), targets))


@pytest.mark.parametrize(
    "overrides, tp, message",
    [
        (
            dict(n_heads=4, n_kv_heads=2),
            4,
            "parallel.tensor_model_parallel_size=4: expected a divisor of model.n_heads=4 and model.n_kv_heads=2",
        ),
        (
            dict(n_heads=4, n_kv_heads=None),
            3,
            "parallel.tensor_model_parallel_size=3: expected a divisor of model.n_heads=4 and model.n_kv_heads=4",
        ),
        (
            dict(ffn_hidden=50, n_kv_heads=4),
            4,
            "parallel.tensor_model_parallel_size=4: expected a divisor of model.ffn_hidden=50",
        ),
        (dict(n_heads=5), 1, "model.n_heads=5: expected a divisor of model.d_model=32"),
        (
            dict(n_heads=4, n_kv_heads=3),
            1,
            "model.n_kv_heads=3: expected a divisor of model.n_heads=4",
        ),
        (
            dict(d_model=24, n_heads=8, n_kv_heads=None),
            1,
            "model.n_heads=8: expected an even head size d_model/n_heads for RoPE, not 3",
        ),
        (dict(n_layers=0), 1, "model.n_layers=0 must be a positive integer"),
        (dict(ops_backend="cuda"), 1, "model.ops_backend='cuda' must be one of"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, tp, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides).validate(tp)
