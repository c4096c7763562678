"""`megapatch plan CONFIG [key=value ...] [--dp N | --world-size N] [--gpu-memory SIZE]`:
print the phases, batch shapes, LR curves, FLOPs, cost and per-GPU memory of a config
without starting anything.

Fast on purpose: it imports neither torch nor the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

from megapatch.config import RunConfig, load_config
from megapatch.errors import ConfigError
from megapatch.flops import ModelDims
from megapatch.training.memory import (
    Layout,
    MemoryEstimate,
    ZeroOptions,
    estimate_stages,
    format_gib,
    parse_size,
    pipeline_layer_parameters,
    pipeline_stage_bounds,
    stage_layers,
)
from megapatch.training.schedule import StagePlan, plan_for_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse cannot take positionals after options: options go first or after the overrides.
    parser.usage = "megapatch plan [options] CONFIG [key=value ...] [options]"
    parser.add_argument("config", help="a YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. patch.size=4"
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--dp",
        type=int,
        help="data-parallel ranks (default: from parallel.nodes x gpus_per_node, else 1)",
    )
    shape.add_argument(
        "--world-size",
        type=int,
        help="total ranks; DP = world size / (tensor-parallel size x pipeline stages)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help='vocabulary for FLOPs when model.vocab_size is "auto" and '
        "the data manifest is not there yet",
    )
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory of one GPU for the fits/does-not-fit verdict, e.g. 80GiB or 141GB "
        "(default: the CUDA device's, if there is one)",
    )
    parser.add_argument(
        "--show-config", action="store_true", help="also print the resolved config with its docs"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the plan, FLOPs and resolved config as JSON"
    )


def run(args: argparse.Namespace) -> int:
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    cfg = load_config(args.config, args.overrides)
    tp = cfg.parallel.tensor_model_parallel_size
    vocab, vocab_note = _vocab_size(cfg, args.vocab_size)
    if args.dp is None and args.world_size is None and cfg.parallel.gpus_per_node:
        # The cluster shape the config expects: the same checks training makes.
        world = cfg.parallel.nodes * cfg.parallel.gpus_per_node
        plan = plan_for_world(cfg, world, vocab_size=vocab)
    else:
        dp = 1 if args.dp is None else args.dp
        if args.world_size is not None:
            pp = cfg.parallel.pipeline_model_parallel_size
            if args.world_size < 1 or args.world_size % (tp * pp):
                raise ConfigError(
                    f"--world-size {args.world_size}: expected a multiple of "
                    f"parallel.tensor_model_parallel_size={tp} x "
                    f"parallel.pipeline_model_parallel_size={pp} (world size = TP x DP x PP)"
                )
            dp = args.world_size // (tp * pp)
        if dp < 1:
            raise ConfigError(f"--dp {args.dp}: expected at least 1")
        if cfg.parallel.pipeline_model_parallel_size > 1 and vocab:
            from megapatch.config import Checker
            from megapatch.training.schedule import check_pipeline_split

            check_pipeline_split(cfg, vocab, Checker(cfg.provenance, cfg.source))
        plan = StagePlan.from_config(cfg, dp_size=dp, vocab_size=vocab)
    flops = plan.flops
    memory = _memory(cfg, plan, vocab)
    gpu_source = f"--gpu-memory {args.gpu_memory}"
    if gpu_memory is None and memory:
        gpu_memory, gpu_source = _cuda_device_memory()

    if args.json:
        print(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "config_hash": cfg.config_hash(),
                    "vocab_size": vocab,
                    "plan": plan.state_dict(),
                    "flops": asdict(flops) if flops else None,
                    "memory": _memory_json(memory, gpu_memory),
                },
                indent=2,
            )
        )
        return 0
    print(_report(cfg, plan, tp, vocab, vocab_note, flops))
    print()
    print(_memory_report(cfg, plan, memory, gpu_memory, gpu_source))
    if args.show_config:
        print()
        print(cfg.render_yaml(), end="")
    return 0


def _vocab_size(cfg: RunConfig, cli_vocab: int | None) -> tuple[int | None, str]:
    """The vocabulary for FLOPs: configured, from --vocab-size, or from the data manifest."""
    if cfg.model.vocab_size != "auto":
        return cfg.model.vocab_size, ""
    if cli_vocab:
        return cli_vocab, " (from --vocab-size)"
    data_dir = cfg.data.path or cfg.data.blend[0]["path"]
    manifest = os.path.join(data_dir, "manifest.json")
    try:
        with open(manifest) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return (
            None,
            f"auto: unresolved, no readable {manifest} (prep the data or pass --vocab-size)",
        )
    vocab = meta.get("vocab_size") or (meta.get("tokenizer") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        return None, f"auto: unresolved, {manifest} names no vocab_size"
    return vocab, f" (auto, from {manifest})"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _report(cfg: RunConfig, plan: StagePlan, tp: int, vocab, vocab_note: str, flops) -> str:
    m, p = cfg.model, cfg.patch
    lines = [f"megapatch plan: {cfg.run.name} ({cfg.source}, config hash {cfg.config_hash()})", ""]
    shape = (
        f"D {m.d_model:,}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), FFN {m.ffn_hidden:,}, "
        f"L {m.seq_len:,}"
    )
    if vocab:
        dims = ModelDims.from_config(cfg, vocab)
        params = dims.parameters()
        lines.append(
            f"model   {_count(sum(params.values()))} parameters ({_count(params['transformer'])} in the "
            f"transformer): {shape}, V {vocab:,}{vocab_note} padded to {dims.vocab_size:,}"
        )
    else:
        lines.append(f"model   {shape}, V {vocab_note}")
    pp = cfg.parallel.pipeline_model_parallel_size
    ranks = f"TP {tp} x DP {plan.dp_size}" if pp == 1 else f"TP {tp} x PP {pp} x DP {plan.dp_size}"
    lines.append(
        f"cluster {ranks} = {tp * pp * plan.dp_size} rank(s), ZeRO-{cfg.parallel.zero_stage}, "
        f"{cfg.train.precision}"
    )
    lines.append(_budget(plan, p))
    lines += ["", plan.table(), ""]
    if flops is None:
        lines.append("FLOPs   unknown until the vocabulary is known (see the model line)")
        lines.append(
            f"cost    relative to token-only training: {_formula(plan)} = {plan.cost_ratio:.4f}x "
            "(lambda rounded to whole steps)"
        )
        return "\n".join(lines)
    rows = [["phase", "FLOPs/token", "FLOPs/step", "FLOPs"]]
    rows += [
        [ph.name, f"{ph.per_token:.4g}", f"{ph.per_step:.4g}", f"{ph.total:.4g}"]
        for ph in flops.phases
    ]
    rows.append(["total", "", "", f"{flops.total:.4g}"])
    rows.append(
        ["token-only", f"{flops.token_only_per_token:.4g}", "", f"{flops.token_only_total:.4g}"]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines.append(
        "FLOPs (model FLOPs: matmuls, forward + backward; token-only = the same budget without patches)"
    )
    lines += [
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
        for r in rows
    ]
    lines.append("")
    lines.append(
        f"cost    relative to token-only training: {_formula(plan)} = {flops.simple_ratio:.4f}x; "
        f"precise (attention, output layer, patch averaging, whole steps) = {flops.precise_ratio:.6f}x"
    )
    return "\n".join(lines)


def _budget(plan: StagePlan, p) -> str:
    """The budget line: what train.total_tokens means under patch.batching, and the split."""
    stages = plan.phases[:-1]
    if not stages:
        split = "a single token phase"
    elif plan.shorthand:
        split = f"patch.fraction {p.fraction:.4g} -> {stages[0].steps:,} patch steps (nearest whole step)"
    else:
        fractions = " + ".join(f"{st['fraction']:.4g}" for st in plan.stages)
        steps = " + ".join(f"{ph.steps:,}" for ph in stages)
        split = f"patch.stages {fractions} -> {steps} patch steps (nearest whole steps)"
    what = f"{plan.total_tokens:,} tokens ({_count(plan.total_tokens)})"
    if plan.batching == "sequences":
        what = (
            f"{plan.total_tokens:,} token-step equivalents of compute (patch.batching=sequences: "
            f"every step has the token phase's {plan.phases[-1].sequences_per_step:,} sequences and "
            f"FLOPs, a K-stage step reads K x the tokens; {plan.tokens_read:,} tokens read)"
        )
    return f"budget  {what} = {plan.total_steps:,} steps x {plan.tokens_per_step:,} tokens per step; {split}"


def _formula(plan: StagePlan) -> str:
    if plan.batching == "sequences":
        return "1 (equal FLOPs per step)"
    return (
        "lambda/K + 1 - lambda"
        if len(plan.phases) <= 2
        else "sum(lambda_i/K_i) + 1 - sum(lambda_i)"
    )


def _memory(cfg: RunConfig, plan: StagePlan, vocab: int | None) -> dict[str, list[MemoryEstimate]]:
    """Each phase's per-GPU estimate of every pipeline stage (one without a pipeline); {}
    until the vocabulary is known."""
    if not vocab:
        return {}
    dims = ModelDims.from_config(cfg, vocab)
    backend = cfg.train.ops_backend
    zero = ZeroOptions.from_deepspeed(cfg.parallel.deepspeed)
    pp = cfg.parallel.pipeline_model_parallel_size
    bounds = None
    if pp > 1:
        # The split the model makes: balanced over counts with V padded as for TP=1.
        split_vocab = ModelDims.from_config(cfg, vocab, tensor_parallel_size=1).vocab_size
        bounds = tuple(pipeline_stage_bounds(pipeline_layer_parameters(dims, split_vocab), pp))
    return {
        ph.name: estimate_stages(
            dims,
            Layout(
                micro_batch=ph.micro_batch_size,
                seq_len=ph.seq_len,
                patch_size=ph.patch_size,
                tp=cfg.parallel.tensor_model_parallel_size,
                pp=pp,
                dp=plan.dp_size,
                zero_stage=cfg.parallel.zero_stage,
                precision=cfg.train.precision,
                sequence_parallel=cfg.parallel.sequence_parallel,
                activation_checkpointing=cfg.model.activation_checkpointing,
                backend="triton" if backend == "auto" else backend,  # auto is triton on CUDA
                zero=zero,
                micro_batches=ph.grad_accum,
                stage_bounds=bounds,
            ),
        )
        for ph in plan.phases
    }


def _worst(stages: list[MemoryEstimate]) -> MemoryEstimate:
    return max(stages, key=lambda est: est.total)


def _cuda_device_memory() -> tuple[int | None, str]:
    """Total memory of the current CUDA device, without importing torch (plan stays light):
    torch's if the caller already imported it, else nvidia-smi's; (None, why) if neither."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        index = torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"CUDA device {index}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    smi = shutil.which("nvidia-smi")
    if smi is None or visible in ("", "-1"):
        return None, "no CUDA device"
    device = (visible or "0").split(",")[0]
    try:
        out = subprocess.run(
            [smi, "-i", device, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 2**20, f"CUDA device {device} (nvidia-smi)"  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, "no CUDA device (nvidia-smi gave no memory size)"


def _memory_json(memory: dict[str, list[MemoryEstimate]], gpu_memory: int | None) -> dict | None:
    if not memory:
        return None
    worst = max(_worst(stages).total for stages in memory.values())
    out = {
        "phases": {name: _worst(stages).as_dict() for name, stages in memory.items()},
        "gpu_memory": gpu_memory,
        "fits": None if gpu_memory is None else worst <= gpu_memory,
    }
    if any(len(stages) > 1 for stages in memory.values()):
        out["stages"] = {name: [est.as_dict() for est in stages] for name, stages in memory.items()}
    return out


_MEMORY_COLUMNS = (
    "params",
    "grads",
    "optimizer",
    "activations",
    "logits",
    "buffers",
    "step",
    "total",
)


def _memory_report(
    cfg: RunConfig, plan: StagePlan, memory, gpu_memory: int | None, gpu_source: str
) -> str:
    if not memory:
        return "memory  unknown until the vocabulary is known (see the model line)"
    t, m, par = cfg.train, cfg.model, cfg.parallel
    backend = "triton (auto, on CUDA)" if t.ops_backend == "auto" else t.ops_backend
    checkpointing = "on" if m.activation_checkpointing else "off"
    sequence = "on" if par.sequence_parallel else "off"
    pp = par.pipeline_model_parallel_size
    lines = [
        f"memory per GPU, GiB (estimate; ZeRO-{par.zero_stage}, {t.precision}, TP "
        f"{par.tensor_model_parallel_size}, PP {pp}, loss backend {backend}, activation "
        f"checkpointing {checkpointing}, sequence parallelism {sequence})"
    ]
    if pp == 1:
        rows = [["phase", "micro", *_MEMORY_COLUMNS]]
        for name, (est,) in memory.items():
            values = (est.params, est.gradients, est.optimizer, est.activations, est.logits)
            values += (est.buffers, est.step_buffers, est.total)
            rows.append([name, str(plan.phase(name).micro_batch_size), *map(format_gib, values)])
        lines += _aligned(rows, left=1)
        lines.append(
            "        optimizer: fp32 master + Adam; buffers: reduce buckets and the loss's fp32 "
            "gradients; step: the optimizer step's fp32 gradients"
        )
        lines.append(
            "        total = params + grads + optimizer + the larger of (activations + logits + "
            "buffers) and step (docs/memory.md)"
        )
    else:
        lines += _aligned(_stage_rows(cfg, plan, memory), left=3)
        lines.append(
            "        stage s keeps min(P - s, m) micro-batches in flight under 1F1B (m: the "
            "phase's micro-batches per step); only the last holds the loss"
        )
        lines.append(
            "        grads: the stage's, whole until the step's last micro-batch; pipe: stage-"
            "boundary buffers (inputs and outputs in flight, the receive buffer, ids and labels)"
        )
        lines.append(
            "        optimizer: fp32 master + Adam; buffers: reduce buckets and the loss's fp32 "
            "gradients; step: the optimizer step's fp32 gradients"
        )
        lines.append(
            "        total = params + optimizer + the larger of (grads + activations + pipe + "
            "logits + buffers) and (step + the gradients and pipe buffers left at it) "
            "(docs/memory.md)"
        )
    name, worst = max(
        ((name, _worst(stages)) for name, stages in memory.items()), key=lambda x: x[1].total
    )
    if gpu_memory is None:
        lines.append(f"fits    no verdict: {gpu_source}; pass --gpu-memory, e.g. 80GiB")
    else:
        verdict = "yes" if worst.total <= gpu_memory else "NO"
        where = f"the {name} phase"
        if pp > 1:
            layers = stage_layers(*worst.layers, m.n_layers)
            where = f"stage {worst.stage} ({layers}) in the {name} phase"
        lines.append(
            f"fits    in {format_gib(gpu_memory)} GiB ({gpu_source}): {verdict}, {where} "
            f"peaks at {format_gib(worst.total)} GiB ({worst.total / gpu_memory:.0%})"
        )
    return "\n".join(lines)


_STAGE_COLUMNS = ("phase", "stage", "layers", "micro", "in flight", "params", "grads",
                  "optimizer", "activations", "pipe", "logits", "buffers", "step", "total")  # fmt: skip


def _stage_rows(cfg: RunConfig, plan: StagePlan, memory) -> list[list[str]]:
    """One row per phase and pipeline stage."""
    rows = [list(_STAGE_COLUMNS)]
    for name, stages in memory.items():
        for est in stages:
            values = (est.params, est.gradients + est.grad_buffer, est.optimizer)
            values += (est.activations, est.pipe_buffers, est.logits, est.buffers)
            values += (est.step_buffers, est.total)
            layers = stage_layers(*est.layers, cfg.model.n_layers)
            micro = str(plan.phase(name).micro_batch_size)
            rows.append([name, str(est.stage), layers, micro, str(est.in_flight)])
            rows[-1] += map(format_gib, values)
    return rows


def _aligned(rows: list[list[str]], left: int) -> list[str]:
    """Rows as lines: the first `left` columns flush left, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            [c.ljust(w) for c, w in zip(r[:left], widths)]
            + [c.rjust(w) for c, w in zip(r[left:], widths[left:])]
        ).rstrip()
        for r in rows
    ]
