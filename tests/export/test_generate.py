"""Generation: the KV cache against recomputation, the samplers' rules, determinism with a
seed, streaming through `megapatch generate`, and a prompt longer than the context."""

from __future__ import annotations

import pytest
import torch

from megapatch.errors import ConfigError
from megapatch.model import GPT, KVCache
from megapatch.model.generate import SamplingConfig, generate, sample_next_token
from tests.export.conftest import one_error_line
from tests.fixtures import tiny_gpt_config

V = 250


def tiny_model(seed: int = 0) -> GPT:
    return GPT(tiny_gpt_config(vocab_size=V, seq_len=24, rope_theta=500000.0), seed=seed).eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- KV cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[24], [1] * 24, [7, 5, 1, 1, 10]])
def test_cached_logits_equal_full_recomputation(chunks):
    model = tiny_model()
    ids = _ids(2, sum(chunks))  # [B, T]
    cache = KVCache.for_model(model, batch_size=2)
    pieces, start = [], 0
    with torch.no_grad():
        for n in chunks:  # a prefill in pieces, then single steps
            pieces.append(model(ids[:, start : start + n], kv_cache=cache))
            start += n
        full = model(ids)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_cache_refuses_what_does_not_fit():
    model = tiny_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with torch.no_grad():
        model(_ids(1, 3), kv_cache=cache)
        with pytest.raises(ConfigError, match="3 cached \\+ 2 new do not fit"):
            model(_ids(1, 2), kv_cache=cache)
        with pytest.raises(ConfigError, match="token mode"):
            model(_ids(1, 4), _ids(1, 4), kv_cache=KVCache.for_model(model, batch_size=1))


def test_generation_with_the_cache_equals_generation_without():
    model = tiny_model()
    prompt = _ids(1, 5)[0].tolist()
    kw = dict(max_new_tokens=19, sampling=SamplingConfig(temperature=1.0, top_p=0.9), seed=3)
    cached = list(generate(model, prompt, use_cache=True, **kw))
    recomputed = list(generate(model, prompt, use_cache=False, **kw))
    assert cached == recomputed and len(cached) == 19


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    model = tiny_model()
    prompt = [1, 2, 3]
    runs = [list(generate(model, prompt, max_new_tokens=15, seed=s)) for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_vocab_limit_draws_only_ids_the_tokenizer_has():
    # A model with more rows than its tokenizer's pieces; push the mass onto the extra rows.
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[200:] *= 50
    kw = dict(max_new_tokens=20, sampling=SamplingConfig(temperature=1.0), seed=0)
    assert max(generate(model, [1, 2, 3], **kw)) >= 200
    assert max(generate(model, [1, 2, 3], vocab_limit=200, **kw)) < 200


# -- samplers ---------------------------------------------------------------------------
def test_greedy_top_k_1_and_a_tiny_top_p_all_take_the_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    for sampling in (SamplingConfig(0.0), SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6)):
        assert torch.equal(sample_next_token(logits, sampling, gen), best)


def test_top_k_and_top_p_sample_only_inside_their_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1))
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next_token(logits, SamplingConfig(top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.8: 0.5 + 0.3 reaches it, so token 2 and 3 never come.
    nucleus = sample_next_token(logits, SamplingConfig(top_p=0.8), gen)
    assert set(nucleus.tolist()) == {0, 1}
    # Within the set, the renormalised probabilities: 0.5/0.8 = 0.625 for token 0.
    assert (nucleus == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)
    # Plain sampling reaches all four.
    assert set(sample_next_token(logits, SamplingConfig(), gen).tolist()) == {0, 1, 2, 3}


def test_generation_stops_when_the_context_is_full_or_at_a_stop_token():
    model = tiny_model()
    full = _ids(1, 24)[0].tolist()
    assert len(list(generate(model, full, max_new_tokens=10))) == 1  # the last position's
    greedy = SamplingConfig(temperature=0.0)
    first = list(generate(model, [5], max_new_tokens=10, sampling=greedy))
    stopped = list(generate(model, [5], max_new_tokens=10, sampling=greedy, stop_ids=[first[3]]))
    assert stopped == first[: first.index(first[3])]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=list(range(25))), "the prompt is 25 tokens, longer than the model's context of 24"),
        (dict(prompt=[]), "the prompt is empty"),
        (dict(max_new_tokens=0), "--max-new-tokens 0"),
        (dict(sampling=SamplingConfig(temperature=-1)), "--temperature -1"),
        (dict(sampling=SamplingConfig(top_p=0)), "--top-p 0"),
        (dict(sampling=SamplingConfig(top_k=-2)), "--top-k -2"),
    ],
)  # fmt: skip
def test_bad_generation_arguments_fail_before_the_first_token(kwargs, message):
    model = tiny_model()
    args = {"prompt": [1, 2], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(model, args.pop("prompt"), **args)  # raises here, not at the first next()


# -- the command ------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_command_streams_the_same_text_for_a_seed(tp2_run, capsys, cli):
    args = ("--prompt", "the world", "--max-new-tokens", "12", "--top-k", "40", "--seed", "5")
    outputs = []
    for extra in ([], [], ["--no-cache"]):
        assert cli("generate", tp2_run, *args, *extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("the world") and len(outputs[0]) > len("the world\n")
    assert outputs[0] == outputs[1] == outputs[2]
    assert cli("generate", tp2_run, *args[:-1], "6") == 0
    assert capsys.readouterr().out != outputs[0]


@pytest.mark.slow
def test_generate_command_bad_input_is_one_line(tp2_run, other_corpus, capsys, cli):
    long_prompt = " ".join(["the"] * 40)  # more than 16 tokens
    assert cli("generate", tp2_run, "--prompt", long_prompt) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "generate", "longer than the model's context of 16 tokens")
    assert captured.out == ""  # refused before anything was printed

    tokenizer = other_corpus / "tokenizer.model"
    assert cli("generate", tp2_run, "--prompt", "the", "--tokenizer", tokenizer) == 2
    one_error_line(capsys.readouterr().err, "generate", "450 pieces", "vocabulary of 400")

    assert cli("generate", tp2_run, "--prompt", "the", "--top-p", "1.5") == 2
    one_error_line(capsys.readouterr().err, "generate", "--top-p 1.5: expected a number in (0, 1]")
