"""The stage scheduler: from the budget, K, lambda, L and tokens per step, the phases of a
run, their batch shapes and their learning-rate curves. Pure Python, no torch.

    plan = StagePlan.from_config(cfg, dp_size=4)
    plan.phases                  # (Phase("patch", ...), Phase("token", ...)) or just the token phase;
                                 # several stages (patch.stages): patch1, patch2, ..., token
    plan.phase_at(step).name     # "patch" | "token"   (global optimizer steps count from 0)
    plan.lr(step)
    print(plan.table())

Rules, in one place:

- Steps. The run has `total_tokens // tokens_per_step` optimizer steps (the remainder
  of the budget is dropped). Patch stage i ends at its cumulative fraction of those steps,
  rounded to the nearest whole step (halves round up; one stage: lambda of the steps); a
  stage of patch.stages that rounds to no step is refused. The token phase gets the
  rest, and must not be empty.
- Batching. "tokens" (the paper): tokens per step equal in every phase, as below.
  "sequences" (Token Superposition Training): every patch stage keeps the token phase's
  sequences, micro-batch and accumulation, so a step reads K times the tokens at the same
  FLOPs; total_tokens then counts token-step equivalents of compute.
- Switches. Every boundary is one: the phase after it resets Adam's state when the
  stage before it says reset_optimizer, and starts a new LR curve when it says rewarm
  (otherwise the curve runs on over both phases).
- K=1 or lambda=0 is a single token phase: a K=1 patch phase *is* token training, so
  treating it as one makes a K=1 run equal a plain token run step for step, with one LR
  curve and no optimizer reset.
- Tokens per optimizer step are equal in every phase (batching "tokens"). A patch-phase
  sequence holds K*L tokens (L patches), so a patch phase takes K times fewer sequences.
- Batch shape. The token phase uses train.micro_batch_size and gradient accumulation
  sequences / (micro x DP), which must be whole. The patch phase keeps the same
  micro-batch -- the transformer sees L positions per sequence in both phases, so
  activation memory is the same -- and divides accumulation by K. When accumulation is
  not a multiple of K, the patch micro-batch becomes the largest divisor of the patch
  sequences per rank that does not exceed the token micro-batch.
- Learning rate. Each phase warms up linearly for warmup_steps (step i of the phase gets
  peak*(i+1)/warmup, so the last warmup step is at peak), then decays (cosine, linear, or
  constant) to min_lr, reached exactly at the phase's last step. With rewarm=false the
  run has one curve: warmup at step 0 and decay over all steps, the switch in between.
  warmup_steps may be a percentage of each phase's steps ("5%", rounded, at least one
  step); a curve whose warmup is not shorter than it (it would never reach its peak, or
  never decay) is refused, naming the phase and its steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from megapatch.config.validation import parse_percent
from megapatch.errors import ConfigError
from megapatch.flops import ModelDims, PlanFlops, plan_flops

__all__ = ["PATCH", "TOKEN", "LRSchedule", "Phase", "StagePlan", "plan_for_world"]

PATCH = "patch"
TOKEN = "token"


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup then decay to a floor, over `steps` optimizer steps from `start_step`."""

    peak: float
    floor: float
    warmup_steps: int
    steps: int
    start_step: int = 0
    decay: str = "cosine"  # "cosine" | "linear" | "constant"

    def __call__(self, global_step: int) -> float:
        i = global_step - self.start_step
        if i < self.warmup_steps:
            return self.peak * (i + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.peak
        progress = min(1.0, (i - self.warmup_steps + 1) / (self.steps - self.warmup_steps))
        if self.decay == "linear":
            return self.floor + (self.peak - self.floor) * (1.0 - progress)
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def describe(self, rewarm: bool = False) -> str:
        warm = "re-warm" if rewarm else "warmup"
        text = f"{warm} {self.warmup_steps:,} steps to {self.peak:g}"
        if self.decay == "constant":
            return text + ", then constant"
        last = self.start_step + self.steps - 1
        return text + f", {self.decay} to {self.floor:g} at step {last:,}"


@dataclass(frozen=True)
class Phase:
    """One stage of training with its batch shape; steps are global optimizer steps."""

    name: str  # PATCH | TOKEN
    patch_size: int  # K (1 in the token phase)
    seq_len: int  # L: positions the transformer sees
    steps: int
    first_step: int
    sequences_per_step: int  # global, all DP ranks together
    micro_batch_size: int  # sequences per DP rank per micro-step
    grad_accum: int
    dp_size: int
    lr_schedule: LRSchedule
    flops_per_step: float | None = None  # model FLOPs, all ranks; None until dims are known
    position_weights: tuple[float, ...] | None = None  # normalised [K]; None = uniform
    resets_optimizer: bool = False  # Adam's state is reset when this phase begins

    @property
    def tokens_per_sequence(self) -> int:
        return self.patch_size * self.seq_len  # K*L

    @property
    def window(self) -> int:
        """Tokens read per sequence: K*L inputs plus the K targets of the last patch."""
        return self.patch_size * self.seq_len + self.patch_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.tokens_per_sequence

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1

    @property
    def end_step(self) -> int:
        """First global step after this phase."""
        return self.first_step + self.steps

    def contains(self, global_step: int) -> bool:
        return self.first_step <= global_step < self.end_step


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class StagePlan:
    """The phases of a run for one data-parallel size. Build it with `from_config`, or
    with explicit arguments (config key names in the error messages)."""

    def __init__(
        self,
        *,
        seq_len: int,
        patch_size: int,
        patch_fraction: float,
        total_tokens: int,
        tokens_per_step: int,
        micro_batch_size: int,
        lr: float,
        min_lr: float = 0.0,
        warmup_steps: int | str = 0,
        lr_decay: str = "cosine",
        dp_size: int = 1,
        rewarm: bool = True,
        reset_optimizer: bool = True,
        max_steps: int | None = None,
        source: str = "plan",
        provenance: dict | None = None,
        model_dims: ModelDims | None = None,
        stages: list[dict] | None = None,
        batching: str = "tokens",
        pipeline_size: int = 1,
    ):
        """`stages`: [{size, fraction[, position_weights, reset_optimizer, rewarm]}], the
        patch stages in order (the last two for the switch at the stage's end, defaulting
        to `reset_optimizer` and `rewarm`); None = one stage of patch_size, patch_fraction."""
        self.inputs = dict(
            seq_len=seq_len,
            patch_size=patch_size,
            patch_fraction=patch_fraction,
            total_tokens=total_tokens,
            tokens_per_step=tokens_per_step,
            micro_batch_size=micro_batch_size,
            lr=lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            lr_decay=lr_decay,
            dp_size=dp_size,
            rewarm=rewarm,
            reset_optimizer=reset_optimizer,
            max_steps=max_steps,
            model_dims=model_dims,
        )
        # Only when used, so a one-stage plan's inputs (and state_dict) are as before.
        if stages is not None:
            self.inputs["stages"] = [dict(st) for st in stages]
        if batching != "tokens":
            self.inputs["batching"] = batching
        if pipeline_size != 1:
            self.inputs["pipeline_size"] = pipeline_size
        self.pipeline_size = pipeline_size
        self.batching = batching
        self.source = source
        self._provenance = provenance or {}  # dotted key -> file or override that set it
        self.seq_len, self.patch_size, self.patch_fraction = seq_len, patch_size, patch_fraction
        self.tokens_per_step, self.dp_size = tokens_per_step, dp_size
        self.rewarm, self.reset_optimizer, self.max_steps = rewarm, reset_optimizer, max_steps
        if dp_size < 1:
            raise ConfigError(f"{source}: data-parallel size {dp_size}: expected at least 1")
        if tokens_per_step % seq_len:
            self._fail(
                "train.tokens_per_step", tokens_per_step, f"a multiple of model.seq_len={seq_len}"
            )

        self.total_steps = total_tokens // tokens_per_step
        if self.total_steps < 1:
            self._fail(
                "train.total_tokens",
                total_tokens,
                f"at least train.tokens_per_step={tokens_per_step:,} (one step)",
            )
        # The patch stages, in order, each with its switch policy (for the switch at its end).
        self.shorthand = stages is None
        if stages is None:
            stages = [] if patch_size < 2 or patch_fraction <= 0 else [{"size": patch_size}]
            stages = [dict(s, fraction=patch_fraction) for s in stages]
        defaults = dict(position_weights=None, reset_optimizer=reset_optimizer, rewarm=rewarm)
        self.stages = [{**defaults, **dict(s)} for s in stages]
        token_sequences = tokens_per_step // seq_len
        stage_steps, first, cumulative = [], 0, 0.0
        for i, stage in enumerate(self.stages):
            # Cumulative rounding to the nearest step (halves up): the stages' steps sum to
            # the rounded sum of their fractions.
            cumulative += stage["fraction"]
            steps = math.floor(cumulative * self.total_steps + 0.5) - first
            if steps < 1 and self.shorthand:
                break  # a shorthand lambda that rounds to no step: a token-only run
            if steps < 1:
                self._fail(
                    f"patch.stages[{i}].fraction",
                    stage["fraction"],
                    f"a share that is at least one of the run's {self.total_steps:,} steps "
                    "(it rounds to 0; raise it or train.total_tokens)",
                )
            stage_steps.append(steps)
            first += steps
        self.stages = self.stages[: len(stage_steps)]
        token_steps = self.total_steps - first
        if token_steps < 1:
            key = "patch.fraction" if self.shorthand else "patch.stages"
            value = patch_fraction if self.shorthand else [s["fraction"] for s in self.stages]
            self._fail(
                key,
                value,
                f"a smaller share: it rounds all {self.total_steps:,} steps into the patch phase and "
                "leaves none for the token phase (or raise train.total_tokens)",
            )
        for i, stage in enumerate(self.stages):
            key = "patch.size" if self.shorthand else f"patch.stages[{i}].size"
            if batching == "tokens" and tokens_per_step % (stage["size"] * seq_len):
                self._fail(
                    "train.tokens_per_step",
                    tokens_per_step,
                    f"a multiple of model.seq_len x {key} = {seq_len * stage['size']:,} so "
                    "every phase has whole sequences",
                )
        self._check_token_batch(token_sequences, micro_batch_size)
        phases, first = [], 0
        for i, (stage, steps) in enumerate(zip(self.stages, stage_steps)):
            name = PATCH if len(self.stages) == 1 else f"{PATCH}{i + 1}"
            phases.append(self._patch_phase(i, name, stage, first, steps, token_sequences))
            first += steps
        phases.append(
            Phase(TOKEN, 1, seq_len, token_steps, first, token_sequences, micro_batch_size,
                  token_sequences // (dp_size * micro_batch_size), dp_size, None)
        )  # fmt: skip
        phases = self._with_lr_curves(phases, warmup_steps, lr, min_lr, lr_decay)
        self.phases: tuple[Phase, ...] = tuple(phases)
        self.flops: PlanFlops | None = None
        if model_dims is not None:
            self.flops = plan_flops(model_dims, self)
            per_step = [ph.per_step for ph in self.flops.phases]
            self.phases = tuple(replace(ph, flops_per_step=f) for ph, f in zip(phases, per_step))

    def _patch_phase(
        self, i: int, name: str, stage: dict, first: int, steps: int, token_sequences: int
    ) -> Phase:
        """Patch stage `i` with its batch shape (its LR curve comes later)."""
        k, dp = stage["size"], self.dp_size
        if self.batching == "sequences":  # the token phase's sequences, each K*L tokens
            sequences, micro = token_sequences, self.inputs["micro_batch_size"]
        else:
            sequences = token_sequences // k
            if sequences % dp:
                self._fail(
                    "train.tokens_per_step",
                    self.tokens_per_step,
                    f"{sequences:,} {name}-phase sequences per step (tokens_per_step / (K x L)) "
                    f"divisible by the data-parallel size {dp}",
                )
            micro = self._patch_micro_batch(sequences // dp, token_sequences // dp)
        weights = stage["position_weights"]
        return Phase(
            name, k, self.seq_len, steps, first, sequences, micro, sequences // (dp * micro), dp,
            None, position_weights=tuple(weights) if weights else None,
        )  # fmt: skip

    def _patch_micro_batch(self, per_rank: int, token_per_rank: int) -> int:
        """The patch phase's micro-batch: a divisor of its sequences per rank. Without a
        pipeline, the largest up to the token phase's (same activation memory). With one,
        the largest that still gives at least the token phase's micro-batches per step, so
        its bubble (P-1)/(m+P-1) is no larger; when even 1 cannot, 1 (the most micro-batches
        the budget's batch allows)."""
        token_micro = self.inputs["micro_batch_size"]
        if self.pipeline_size == 1:
            return _largest_divisor_at_most(per_rank, token_micro)
        token_accum = token_per_rank // token_micro
        fits = [
            d
            for d in range(1, min(per_rank, token_micro) + 1)
            if per_rank % d == 0 and per_rank // d >= token_accum
        ]
        return max(fits) if fits else 1

    def bubble(self, phase: Phase) -> float:
        """The pipeline bubble of a 1F1B step of `phase`: (P-1)/(m+P-1), m micro-batches."""
        p = self.pipeline_size
        return (p - 1) / (phase.grad_accum + p - 1)

    def _with_lr_curves(self, phases, warmup, lr, min_lr, decay) -> list[Phase]:
        """Each phase's LR curve: a switch whose stage says rewarm starts a new curve
        (warmup, decay to the floor at its last step); elsewhere the curve runs on."""
        phases = [
            replace(ph, resets_optimizer=bool(i and self.stages[i - 1]["reset_optimizer"]))
            for i, ph in enumerate(phases)
        ]
        groups = [[phases[0]]]
        for i, ph in enumerate(phases[1:]):
            if self.stages[i]["rewarm"]:
                groups.append([ph])
            else:
                groups[-1].append(ph)
        out = []
        for group in groups:
            steps = sum(ph.steps for ph in group)
            if len(group) == len(phases) and (len(phases) > 1 or not self.rewarm):
                name = "whole run (patch.rewarm=false)"
            elif len(group) == 1:
                name = f"{group[0].name} phase"
            else:
                name = "+".join(ph.name for ph in group) + " phases (no rewarm between them)"
            steps_warm = self._warmup_steps(warmup, name, steps)
            curve = LRSchedule(lr, min_lr, steps_warm, steps, group[0].first_step, decay)
            out += [replace(ph, lr_schedule=curve) for ph in group]
        return out

    def _warmup_steps(self, warmup: int | str, curve: str, steps: int) -> int:
        """Warmup steps of an LR curve of `steps` steps: `warmup` itself, or a percentage
        of `steps` ("5%"); refused unless the curve has steps left after its warmup."""
        if isinstance(warmup, str):
            percent = parse_percent(warmup)
            if percent is None:
                self._fail("train.warmup_steps", warmup, 'a step count or a percentage ("5%")')
            warmup = max(1, math.floor(percent / 100 * steps + 0.5)) if percent > 0 else 0
        if warmup and warmup >= steps:
            self._fail(
                "train.warmup_steps",
                warmup,
                f"fewer than the {steps:,} steps of the {curve}, which would never reach its "
                "peak LR or never decay: lower it, give it as a percentage of each phase "
                '("5%"), or raise train.total_tokens',
            )
        return warmup

    def _fail(self, key: str, value, expected: str) -> None:
        where = self._provenance.get(key, self.source)
        raise ConfigError(f"{where}: {key}={value!r}: expected {expected}")

    def _check_token_batch(self, sequences: int, micro: int) -> None:
        if micro > sequences:
            self._fail(
                "train.micro_batch_size",
                micro,
                f"at most the {sequences:,} token-phase sequences per step",
            )
        if sequences % (micro * self.dp_size):
            fits = (
                f"e.g. {_largest_divisor_at_most(sequences // self.dp_size, micro)}"
                if sequences % self.dp_size == 0
                else f"none fits: {sequences:,} is not divisible by DP={self.dp_size}"
            )
            self._fail(
                "train.micro_batch_size",
                micro,
                f"micro_batch_size x DP={self.dp_size} to divide the {sequences:,} token-phase sequences per step ({fits})",
            )

    @classmethod
    def from_config(cls, cfg, dp_size: int = 1, vocab_size: int | None = None) -> StagePlan:
        """The plan of a `RunConfig` for `dp_size` data-parallel ranks. FLOPs are counted
        when the vocabulary is known: configured, or passed once resolved from the data."""
        t, p = cfg.train, cfg.patch
        if vocab_size is None and cfg.model.vocab_size != "auto":
            vocab_size = cfg.model.vocab_size
        dims = ModelDims.from_config(cfg, vocab_size) if vocab_size else None
        stages = None  # the one-stage shorthand with uniform weights: the plan as before
        if p.stages is not None or p.position_weights != "uniform":
            stages = [asdict(st) for st in p.resolved_stages()]
        return cls(
            seq_len=cfg.model.seq_len,
            patch_size=p.size,
            patch_fraction=p.fraction,
            total_tokens=t.total_tokens,
            tokens_per_step=t.tokens_per_step,
            micro_batch_size=t.micro_batch_size,
            lr=t.lr,
            min_lr=t.min_lr,
            warmup_steps=t.warmup_steps,
            lr_decay=t.lr_decay,
            dp_size=dp_size,
            rewarm=p.rewarm,
            reset_optimizer=p.reset_optimizer,
            max_steps=t.max_steps,
            source=cfg.source,
            provenance=cfg.provenance,
            model_dims=dims,
            stages=stages,
            batching=p.batching,
            pipeline_size=cfg.parallel.pipeline_model_parallel_size,
        )

    # ------------------------------------------------------------------ queries

    @property
    def total_tokens(self) -> int:
        """The budget in whole steps: tokens read with patch.batching=tokens; with
        sequences, token-step equivalents of compute (the tokens read are `tokens_read`)."""
        return self.total_steps * self.tokens_per_step

    @property
    def tokens_read(self) -> int:
        return sum(ph.tokens for ph in self.phases)

    @property
    def switch_steps(self) -> list[int]:
        """First global step of every phase after the first: every switch."""
        return [ph.first_step for ph in self.phases[1:]]

    @property
    def simple_cost_ratio(self) -> float:
        """The textbook cost with the configured fractions: sum of f/K (batching=tokens) or
        of f (sequences) over the stages, plus the token share 1 - sum of f."""
        per_stage = [
            st["fraction"] / (st["size"] if self.batching == "tokens" else 1) for st in self.stages
        ]
        return sum(per_stage) + 1 - sum(st["fraction"] for st in self.stages)

    @property
    def steps_to_run(self) -> int:
        """Steps actually taken: total_steps, or train.max_steps if smaller."""
        return self.total_steps if self.max_steps is None else min(self.total_steps, self.max_steps)

    @property
    def switch_step(self) -> int | None:
        """First global step of the token phase when there is a patch phase, else None."""
        return self.phases[-1].first_step if len(self.phases) > 1 else None

    @property
    def effective_patch_fraction(self) -> float:
        """Share of steps (and tokens) in the patch phase after rounding."""
        return (self.total_steps - self.phases[-1].steps) / self.total_steps

    def phase(self, name: str) -> Phase | None:
        return next((ph for ph in self.phases if ph.name == name), None)

    def phase_at(self, global_step: int) -> Phase:
        for ph in self.phases:
            if ph.contains(global_step):
                return ph
        raise IndexError(f"step {global_step} is outside the plan's {self.total_steps} steps")

    def lr(self, global_step: int) -> float:
        return self.phase_at(global_step).lr_schedule(global_step)

    @property
    def cost_ratio(self) -> float:
        """Training FLOPs relative to token-only training on the same budget: the precise
        figure when the model's dims are known, else lambda/K + 1 - lambda after rounding
        lambda to whole steps (the same up to the negligible patch averaging)."""
        if self.flops is not None:
            return self.flops.precise_ratio
        # Each step costs in proportion to its sequences (L positions each).
        token = self.phases[-1].sequences_per_step
        cost = sum(ph.steps * ph.sequences_per_step / token for ph in self.phases)
        return cost / self.total_steps

    def flops_so_far(self, steps_done: int) -> float | None:
        """Model FLOPs of the first `steps_done` optimizer steps (None without dims)."""
        if self.flops is None:
            return None
        done = [max(0, min(steps_done, ph.end_step) - ph.first_step) for ph in self.phases]
        return sum(n * ph.flops_per_step for n, ph in zip(done, self.phases))

    def tokens_after(self, steps_done: int) -> int:
        """Tokens consumed once `steps_done` optimizer steps are complete."""
        done = [max(0, min(steps_done, ph.end_step) - ph.first_step) for ph in self.phases]
        return sum(n * ph.tokens_per_step for n, ph in zip(done, self.phases))

    def state_dict(self) -> dict:
        """JSON-able: the inputs (enough to rebuild the plan) and the derived phases."""
        phases = []
        for ph in self.phases:
            derived = dict(window=ph.window, tokens_per_step=ph.tokens_per_step, tokens=ph.tokens)
            phases.append({**asdict(ph), **derived, "last_step": ph.last_step})
        inputs = dict(self.inputs)
        if inputs["model_dims"] is not None:
            inputs["model_dims"] = asdict(inputs["model_dims"])
        return {
            "version": 1,
            "inputs": inputs,
            "total_steps": self.total_steps,
            "phases": phases,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> StagePlan:
        inputs = dict(state["inputs"])
        if inputs.get("model_dims") is not None:
            inputs["model_dims"] = ModelDims(**inputs["model_dims"])
        return cls(**inputs)

    def __eq__(self, other) -> bool:
        return isinstance(other, StagePlan) and self.inputs == other.inputs

    def __repr__(self) -> str:
        parts = ", ".join(f"{ph.name}: {ph.steps} steps" for ph in self.phases)
        return f"StagePlan({parts}; {self.tokens_per_step} tokens/step, DP={self.dp_size})"

    # ------------------------------------------------------------------ text

    def table(self) -> str:
        """The phases as a text table, then the LR curves and the switch."""
        columns = list(_COLUMNS)
        if self.pipeline_size > 1:
            columns.append(("PP bubble", lambda ph: f"{self.bubble(ph):.1%}"))
        rows = [[column(ph) for _, column in columns] for ph in self.phases]
        if len(self.phases) > 1:
            total = {
                "phase": "total",
                "steps": f"{self.total_steps:,}",
                "tokens": f"{self.tokens_read:,}",
            }
            total["tokens/step"] = f"{self.tokens_per_step:,}" if self.batching == "tokens" else ""
            rows.append([total.get(name, "") for name, _ in columns])
        lines = _format_table([name for name, _ in columns], rows)
        lines.append("")
        for i, ph in enumerate(self.phases):
            curve = ph.lr_schedule
            if i and curve is self.phases[i - 1].lr_schedule:
                whole = curve.start_step == 0 and curve.steps == self.total_steps
                runs_on = (
                    "the run's single curve" if whole else f"the {self.phases[i - 1].name} curve"
                )
                text = f"continues {runs_on} ({curve.describe()})"
            else:
                text = curve.describe(rewarm=i > 0)
            lines.append(f"lr     {ph.name}: {text}")
        for before, ph in zip(self.phases, self.phases[1:]):
            optimizer = "optimizer state reset" if ph.resets_optimizer else "optimizer state kept"
            lines.append(
                f"switch at step {ph.first_step:,}: K {before.patch_size} -> {ph.patch_size}, window "
                f"{before.window:,} -> {ph.window:,} tokens, micro x accum "
                f"{before.micro_batch_size} x {before.grad_accum} -> "
                f"{ph.micro_batch_size} x {ph.grad_accum}, {optimizer}"
            )
        if self.pipeline_size > 1:
            lines.extend(self._pipeline_lines())
        for ph in self.phases:
            if ph.position_weights:
                weights = ", ".join(f"{w:.3g}" for w in ph.position_weights)
                lines.append(
                    f"targets {ph.name}: the K={ph.patch_size} positions weighted {weights}"
                )
        if len(self.phases) == 1 and self.patch_size == 1:
            lines.append("patch.size=1: a single token phase (ordinary next-token training)")
        if self.steps_to_run < self.total_steps:
            lines.append(
                f"train.max_steps={self.max_steps:,}: stops after {self.steps_to_run:,} "
                f"of {self.total_steps:,} steps"
            )
        return "\n".join(lines)

    def _pipeline_lines(self) -> list[str]:
        """What the pipeline costs each phase, and why the patch micro-batch is what it is."""
        p, token = self.pipeline_size, self.phases[-1]
        lines = [
            f"pipeline: {p} stages, 1F1B; bubble (P-1)/(m+P-1) with m micro-batches per step: "
            + ", ".join(
                f"{ph.name} m={ph.grad_accum} -> {self.bubble(ph):.1%}" for ph in self.phases
            )
        ]
        for ph in self.phases[:-1]:
            if ph.grad_accum < token.grad_accum:
                lines.append(
                    f"pipeline: {ph.name} micro-batch {ph.micro_batch_size}: the budget's "
                    f"{ph.sequences_per_step} sequences per step allow no more than "
                    f"{ph.grad_accum} micro-batches, so its bubble is larger than the token "
                    "phase's (raise train.tokens_per_step, or use fewer stages)"
                )
            elif ph.micro_batch_size != token.micro_batch_size:
                lines.append(
                    f"pipeline: {ph.name} micro-batch {ph.micro_batch_size} (token phase "
                    f"{token.micro_batch_size}): the largest that keeps at least the token "
                    f"phase's {token.grad_accum} micro-batches per step, so its bubble is no larger"
                )
        return lines


# The plan table: (header, cell of a phase).
_COLUMNS = (
    ("phase", lambda ph: ph.name),
    ("K", lambda ph: str(ph.patch_size)),
    ("steps", lambda ph: f"{ph.steps:,}"),
    ("global steps", lambda ph: f"{ph.first_step:,} - {ph.last_step:,}"),
    ("positions", lambda ph: f"{ph.seq_len:,}"),
    ("tokens/seq", lambda ph: f"{ph.tokens_per_sequence:,}"),
    ("window", lambda ph: f"{ph.window:,}"),
    ("seqs/step", lambda ph: f"{ph.sequences_per_step:,}"),
    ("micro x accum x DP", lambda ph: f"{ph.micro_batch_size} x {ph.grad_accum} x {ph.dp_size}"),
    ("tokens/step", lambda ph: f"{ph.tokens_per_step:,}"),
    ("tokens", lambda ph: f"{ph.tokens:,}"),
)


def _format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 3, 8}  # text columns; numbers align right
    out = []
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def plan_for_world(
    cfg,
    world_size: int,
    *,
    local_world_size: int | None = None,
    local_devices: int | None = None,
    vocab_size: int | None = None,
) -> StagePlan:
    """The plan of `cfg` for a launched job of `world_size` ranks (DP = world / TP), with
    the checks that need the job's shape.

    `local_devices` is the number of accelerators on this node (None or 0 on CPU, where
    any number of processes may share the machine); `vocab_size` (resolved from the data
    when the config says "auto") lets the plan count FLOPs.
    """
    from megapatch.config import Checker

    check = Checker(cfg.provenance, cfg.source)
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    if world_size % tp:
        check.fail(
            "parallel.tensor_model_parallel_size", tp, f"a divisor of the world size {world_size}"
        )
    if world_size % (tp * pp):
        check.fail(
            "parallel.pipeline_model_parallel_size",
            pp,
            f"a divisor of the world size {world_size} / TP={tp} (world size = TP x DP x PP)",
        )
    if pp > 1 and vocab_size is not None:
        check_pipeline_split(cfg, vocab_size, check)
    par = cfg.parallel
    expected = par.nodes * par.gpus_per_node if par.gpus_per_node else None
    if expected is not None and expected != world_size:
        raise ConfigError(
            f"{check.where('parallel.gpus_per_node')}: parallel.nodes={par.nodes} x "
            f"parallel.gpus_per_node={par.gpus_per_node} = {expected} ranks expected, "
            f"but the launcher started {world_size}; set them to the allocation (or gpus_per_node: null)"
        )
    if local_devices and local_world_size and local_world_size > local_devices:
        raise ConfigError(
            f"{cfg.source}: {local_world_size} ranks on this node but only {local_devices} devices; "
            "start one rank per device"
        )
    return StagePlan.from_config(cfg, dp_size=world_size // (tp * pp), vocab_size=vocab_size)


def check_pipeline_split(cfg, vocab_size: int, check) -> None:
    """Every pipeline stage of the parameter-balanced split holds a transformer block.
    Torch-free (the plan and the launchers' preflight import no torch): the split is
    memory.pipeline_stage_bounds, tested equal to the model's own (DeepSpeed's)."""
    from megapatch.training.memory import pipeline_layer_parameters, pipeline_stage_bounds

    pp, n = cfg.parallel.pipeline_model_parallel_size, cfg.model.n_layers
    dims = ModelDims.from_config(cfg, vocab_size, tensor_parallel_size=1)  # V padded as at TP=1
    parts = pipeline_stage_bounds(pipeline_layer_parameters(dims), pp)
    empty = [s for s in range(pp) if max(parts[s], 1) >= min(parts[s + 1], n + 1)]
    if empty:
        check.fail(
            "parallel.pipeline_model_parallel_size",
            pp,
            f"fewer stages: split by parameters, the {n} blocks and the embedding and output "
            f"layers (vocabulary {vocab_size:,}) leave stage {empty[0]} without a block",
        )
