"""Checks on a built config: ranges, divisibility, cross-field rules, and the checks
that need the launched job's shape. Every failure is one ConfigError line naming the
file (or override) that set the key."""

from __future__ import annotations

import difflib
import math
from fractions import Fraction
from typing import Any

from megapatch.config.sections import PatchSection, RunConfig
from megapatch.config.yamlio import dump_scalar
from megapatch.errors import ConfigError

# DeepSpeed keys the engine derives from the plan; setting them in parallel.deepspeed
# would silently disagree with the phase batch shapes.
_ENGINE_OWNED_DEEPSPEED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    text = dump_scalar(value)
    # YAML writes a string with a line break across lines even in flow style (a key of a
    # mapping, say): the error must stay one line
    return text if "\n" not in text else repr(value)


class Checker:
    """Builds one-line ConfigErrors that name the file (or override) that set a key."""

    def __init__(self, provenance: dict, source: str):
        self.provenance = provenance
        self.source = source

    def where(self, key: str) -> str:
        # "patch.stages[1].size" was set by whatever set "patch.stages"
        return self.provenance.get(key) or self.provenance.get(key.split("[")[0]) or self.source

    def fail(self, key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{self.where(key)}: {key}={_fmt(value)}: expected {expected}")

    def unknown(self, key: str, candidates: list[str]) -> None:
        # The same name in another section first (model.warmup_steps -> train.warmup_steps),
        # then the closest spelling.
        key = str(key)  # YAML keys need not be strings: `1: x`
        leaf = key.rsplit(".", 1)[-1]
        hint = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c != key][:1]
        hint = hint or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if hint:
            suggestion = f"; did you mean {hint[0]!r}?"
        else:
            suggestion = f"; known keys: {', '.join(sorted(candidates))}"
        raise ConfigError(f"{self.where(key)}: unknown key {key!r}{suggestion}")


# Range checks by key; None (an optional value left unset) always passes.
_POSITIVE = """
    model.d_model model.n_layers model.n_heads model.n_kv_heads model.ffn_hidden model.seq_len
    model.rope_theta model.norm_eps model.init_std model.make_vocab_size_divisible_by
    parallel.tensor_model_parallel_size parallel.pipeline_model_parallel_size parallel.nodes parallel.gpus_per_node patch.size
    train.total_tokens train.tokens_per_step train.micro_batch_size train.lr train.eps
    train.max_nonfinite_steps train.max_steps checkpoint.keep_last eval.max_windows logging.interval
""".split()
_NON_NEGATIVE = """
    data.num_workers data.prefetch train.min_lr train.weight_decay
    train.grad_clip checkpoint.interval checkpoint.max_failed_saves eval.interval
""".split()
_UNIT_INTERVAL = {  # [0, 1)
    "patch.fraction": "a number in [0, 1) (the share of the budget trained on patches)",
    "train.beta1": "a number in [0, 1)",
    "train.beta2": "a number in [0, 1)",
}


def model_shape_problems(
    *,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    ffn_hidden: int,
    tensor_parallel_size: int,
) -> list[tuple[str, Any, str]]:
    """The model's divisibility rules, in one place: (key, value, expected) for each broken
    one. Run configs report them with the file that set the key; GPTConfig without one."""
    kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    tp = tensor_parallel_size
    problems: list[tuple[str, Any, str]] = []
    if d_model % n_heads:
        problems.append(("model.n_heads", n_heads, f"a divisor of model.d_model={d_model}"))
    elif (d_model // n_heads) % 2:
        head = d_model // n_heads
        problems.append(
            ("model.n_heads", n_heads, f"an even head size d_model/n_heads for RoPE, not {head}")
        )
    if n_heads % kv_heads:
        problems.append(("model.n_kv_heads", kv_heads, f"a divisor of model.n_heads={n_heads}"))
    key = "parallel.tensor_model_parallel_size"
    if n_heads % tp or kv_heads % tp:
        heads = f"model.n_heads={n_heads} and model.n_kv_heads={kv_heads}"
        problems.append((key, tp, f"a divisor of {heads}"))
    elif ffn_hidden % tp:
        problems.append((key, tp, f"a divisor of model.ffn_hidden={ffn_hidden}"))
    return problems


def sequence_parallel_problems(
    *, tensor_parallel_size: int, seq_len: int
) -> list[tuple[str, Any, str]]:
    """What sequence parallelism needs: TP > 1 (it splits the sequence over the TP ranks),
    and L positions that split evenly."""
    tp = tensor_parallel_size
    if tp == 1:
        return [
            (
                "parallel.sequence_parallel",
                True,
                "false with TP=1 (it shards the sequence over the TP ranks)",
            )
        ]
    if seq_len % tp:
        return [
            (
                "model.seq_len",
                seq_len,
                f"a multiple of the TP size {tp} under parallel.sequence_parallel",
            )
        ]
    return []


def pipeline_problems(
    *, pipeline_size: int, zero_stage: int, n_layers: int, tie_embeddings: bool
) -> list[tuple[str, Any, str]]:
    """What DeepSpeed's pipeline engine needs of a config. That every stage gets a block
    of the parameter-balanced split (it depends on the vocabulary) is checked where the
    plan is made."""
    pp = pipeline_size
    if pp == 1:
        return []
    problems: list[tuple[str, Any, str]] = []
    if pp > n_layers:
        problems.append(
            (
                "parallel.pipeline_model_parallel_size",
                pp,
                f"at most model.n_layers={n_layers} (every stage holds at least one block)",
            )
        )
    if zero_stage not in (0, 1):
        problems.append(
            (
                "parallel.zero_stage",
                zero_stage,
                f"0 or 1 with parallel.pipeline_model_parallel_size={pp} "
                "(DeepSpeed's pipeline engine shards no gradients or weights)",
            )
        )
    if tie_embeddings:
        problems.append(
            (
                "model.tie_embeddings",
                True,
                f"false with parallel.pipeline_model_parallel_size={pp} (the embedding is on "
                "the first stage, the output layer on the last)",
            )
        )
    return problems


def validate(cfg: RunConfig, check: Checker) -> None:
    """The config's own rules: ranges, the model's shape, cross-field rules. The batch
    arithmetic (whole sequences per step in every phase) is the scheduler's rule, checked
    wherever a plan is made (`megapatch.training.schedule.plan_for_world`)."""

    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key in _POSITIVE:
        if get(key) is not None and get(key) <= 0:
            check.fail(key, get(key), "a positive value")
    for key in _NON_NEGATIVE:
        if get(key) is not None and get(key) < 0:
            check.fail(key, get(key), "a value >= 0")
    for key, expected in _UNIT_INTERVAL.items():
        if not 0.0 <= get(key) < 1.0:
            check.fail(key, get(key), expected)

    m, par, d, t = cfg.model, cfg.parallel, cfg.data, cfg.train
    if m.vocab_size != "auto" and m.vocab_size < 2:
        check.fail("model.vocab_size", m.vocab_size, 'an integer >= 2 or "auto"')
    tp = par.tensor_model_parallel_size
    for key, value, expected in model_shape_problems(
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        ffn_hidden=m.ffn_hidden,
        tensor_parallel_size=tp,
    ):
        check.fail(key, value, expected)
    if par.sequence_parallel:
        for key, value, expected in sequence_parallel_problems(
            tensor_parallel_size=tp, seq_len=m.seq_len
        ):
            check.fail(key, value, expected)
    if par.zero_stage not in (0, 1, 2, 3):
        check.fail("parallel.zero_stage", par.zero_stage, "0, 1, 2 or 3")
    for key, value, expected in pipeline_problems(
        pipeline_size=par.pipeline_model_parallel_size,
        zero_stage=par.zero_stage,
        n_layers=m.n_layers,
        tie_embeddings=m.tie_embeddings,
    ):
        check.fail(key, value, expected)
    for key in _ENGINE_OWNED_DEEPSPEED_KEYS:
        if key in par.deepspeed:
            why = "batch shapes come from train.tokens_per_step and train.micro_batch_size"
            check.fail("parallel.deepspeed", {key: par.deepspeed[key]}, f"no {key} ({why})")

    if (d.path is None) == (d.blend is None):
        check.fail("data.path", d.path, "exactly one of data.path and data.blend to be set")
    if d.blend is not None:
        _validate_blend(d.blend, check)
    if not 0 < t.collective_timeout_s < math.inf:  # NaN fails too
        check.fail(
            "train.collective_timeout_s",
            t.collective_timeout_s,
            "a positive finite number of seconds",
        )
    if isinstance(t.warmup_steps, str):
        if parse_percent(t.warmup_steps) is None:
            check.fail("train.warmup_steps", t.warmup_steps, 'a step count or a percentage ("5%")')
    elif t.warmup_steps < 0:
        check.fail("train.warmup_steps", t.warmup_steps, "a value >= 0")
    if t.min_lr > t.lr:
        check.fail("train.min_lr", t.min_lr, f"at most train.lr={t.lr}")
    if not t.resume.strip():
        check.fail("train.resume", t.resume, '"auto", "none" or a checkpoint path')
    _validate_patch(cfg, check)


_STAGE_KEYS = ("size", "fraction", "position_weights", "reset_optimizer", "rewarm")


def _validate_patch(cfg: RunConfig, check: Checker) -> None:
    """patch.stages, patch.position_weights and the one-form rule. The steps of each stage
    (none may round to 0 or be as short as its warmup) are the scheduler's rule."""
    p = cfg.patch
    if p.stages is None:
        size = p.size if p.size > 1 and p.fraction > 0 else None  # None: no patch stage
        _check_weights("patch.position_weights", p.position_weights, size, check)
        return
    # loading resets the shorthand to its defaults when patch.stages is given (so a saved
    # config reads back); a shorthand set away from them is refused unless patch.stages
    # is a command-line override of a file's shorthand.
    shorthand = [k for k in ("patch.size", "patch.fraction") if k in check.provenance]
    stages_from = check.where("patch.stages")
    if shorthand and not (
        stages_from.startswith("override")
        and not any(check.where(k).startswith("override") for k in shorthand)
    ):
        defaults = PatchSection()
        given = [k for k in shorthand if getattr(p, k[6:]) != getattr(defaults, k[6:])]
        if given:
            raise ConfigError(
                f"{stages_from}: patch.stages is given together with {' and '.join(given)} "
                f"({', '.join(sorted({check.where(k) for k in given}))}): expected one form, "
                "patch.stages or the one-stage shorthand patch.size + patch.fraction"
            )
    stages = p.stages
    if not stages:
        check.fail("patch.stages", stages, "a non-empty list of {size, fraction} (or null)")
    total = 0.0
    for i, entry in enumerate(stages):
        key = f"patch.stages[{i}]"
        if not isinstance(entry, dict):
            check.fail(key, entry, "a mapping {size: K, fraction: f}")
        for k in entry:
            if k not in _STAGE_KEYS:
                hint = difflib.get_close_matches(str(k), _STAGE_KEYS, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                check.fail(key, entry, f"only the keys {', '.join(_STAGE_KEYS)}{suggestion}")
        size, fraction = entry.get("size"), entry.get("fraction")
        if isinstance(size, float) and size.is_integer():
            entry["size"] = size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            check.fail(f"{key}.size", size, "an integer K >= 2 (K=1 is the token phase)")
        if isinstance(fraction, str):
            try:
                entry["fraction"] = fraction = float(Fraction(fraction.replace(" ", "")))
            except (ValueError, ZeroDivisionError):
                pass
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0:
            check.fail(f"{key}.fraction", fraction, "a number > 0 (a share of the run's steps)")
        entry["fraction"] = float(fraction)
        total += fraction
        for flag in ("reset_optimizer", "rewarm"):
            if flag in entry and not isinstance(entry[flag], bool):
                check.fail(f"{key}.{flag}", entry[flag], "true or false")
        weights = entry.get("position_weights", p.position_weights)
        where = (
            f"{key}.position_weights" if "position_weights" in entry else "patch.position_weights"
        )
        _check_weights(where, weights, size, check)
    if total >= 1:
        fractions = " + ".join(f"{e['fraction']:g}" for e in stages)
        check.fail(
            "patch.stages",
            stages,
            f"fractions summing to less than 1 (the rest is the token phase), not {fractions} = {total:g}",
        )


def _check_weights(key: str, weights: Any, size: int | None, check: Checker) -> None:
    if isinstance(weights, str):
        if weights != "uniform":
            check.fail(key, weights, '"uniform" or a list of K non-negative numbers')
        return
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    if not numbers or any(not math.isfinite(w) or w < 0 for w in weights):
        check.fail(key, weights, '"uniform" or a list of non-negative numbers')
    if size is not None and len(weights) != size:
        check.fail(key, weights, f"{size} weights, one per target of a K={size} patch")
    if not any(weights):
        check.fail(key, weights, "at least one positive weight (they are normalised)")


def parse_percent(value: str) -> float | None:
    """50 for "50%", None for anything that is not a percentage in [0, 100)."""
    text = value.strip()
    if not text.endswith("%"):
        return None
    try:
        percent = float(text[:-1])
    except ValueError:
        return None
    return percent if 0 <= percent < 100 else None


def _validate_blend(blend: list, check: Checker) -> None:
    if not blend:
        check.fail("data.blend", blend, "a non-empty list of {path, weight} entries")
    for i, entry in enumerate(blend):
        key = f"data.blend[{i}]"
        if not isinstance(entry, dict):
            check.fail(key, entry, "a mapping {path: ..., weight: ...}")
        for k in entry:
            if k not in ("path", "weight"):
                hint = difflib.get_close_matches(k, ["path", "weight"], n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                check.fail(key, entry, f"only the keys path and weight{suggestion}")
        if not isinstance(entry.get("path"), str):
            check.fail(f"{key}.path", entry.get("path"), "a prep output directory (a string)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            check.fail(f"{key}.weight", weight, "a positive number")
        entry["weight"] = float(weight)


def resolve_vocab_size(
    cfg: RunConfig, data_vocab_size: int, data_source: str = "the data manifest"
) -> int:
    """The model's vocabulary size: the tokenizer's for "auto"; a configured size must
    cover every token id the data can contain."""
    configured = cfg.model.vocab_size
    if configured == "auto":
        return data_vocab_size
    if configured < data_vocab_size:
        raise ConfigError(
            f"{cfg.provenance.get('model.vocab_size', cfg.source)}: model.vocab_size={configured}: expected at least "
            f'the tokenizer\'s vocabulary size {data_vocab_size} (from {data_source}), or "auto"'
        )
    return configured
