"""Sampling from a trained model: temperature, top-k, top-p, a KV cache, a seed.

    for token in generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95):
        ...                                   # each new token id as soon as it is sampled

The model runs in token mode (K=1) on one TP rank (merge shards first: build_model). The
context is the trained seq_len L: a prompt may fill it, and generation stops when the
next token would have no position left. The same seed gives the same tokens, with or
without the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from megapatch.errors import ConfigError
from megapatch.logging_utils import get_logger
from megapatch.model import GPT, KVCache

log = get_logger("generate")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """Sample from the smallest set of most likely tokens whose mass reaches p; 1 = all."""

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature {self.temperature}: expected a number ≥ 0")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: expected an integer ≥ 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: expected a number in (0, 1]")


def sample_next_token(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of logits [B, V] → int64 [B]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    use_cache: bool = True,
    stop_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids, one at a time, after `prompt_ids`.

    Stops early at a token in `stop_ids` (not yielded) or when the context is full. Only
    ids below `vocab_limit` (the tokenizer's size, when the model has more rows) are drawn.
    Without the cache every step recomputes the whole sequence (the reference the cache
    is tested against). Bad arguments raise here, before the first token.
    """
    sampling.validate()
    context = model.cfg.seq_len
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if ids.numel() > context:
        raise ConfigError(
            f"the prompt is {ids.numel()} tokens, longer than the model's context of "
            f"{context} tokens (model.seq_len)"
        )
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: expected an integer ≥ 1")
    stop = set(map(int, stop_ids))
    return _sample(model, ids, max_new_tokens, sampling, seed, use_cache, stop, vocab_limit)


@torch.no_grad()
def _sample(
    model: GPT,
    ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    seed: int,
    use_cache: bool,
    stop: set[int],
    vocab_limit: int | None,
) -> Iterator[int]:
    context = model.cfg.seq_len
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sequence = ids.to(device)[None, :]  # [1, P]
    cache = KVCache.for_model(model, batch_size=1) if use_cache else None
    new_input = sequence
    for produced in range(max_new_tokens):
        if cache is not None:
            logits = model(new_input, kv_cache=cache)[:, -1]  # [1, V]
        else:
            logits = model(sequence)[:, -1]  # [1, V]
        logits = logits[:, :vocab_limit]  # rows past the tokenizer's pieces decode to nothing
        token = sample_next_token(logits, sampling, generator)  # [1]
        if int(token) in stop:
            log.info("stopped at a stop token after %d new tokens", produced)
            return
        yield int(token)
        if sequence.shape[1] == context:
            if produced + 1 < max_new_tokens:
                log.info("stopped: the context of %d tokens is full", context)
            return
        new_input = token[:, None]  # [1, 1]
        sequence = torch.cat([sequence, new_input], dim=1)


__all__ = ["generate", "sample_next_token", "SamplingConfig"]
