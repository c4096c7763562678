"""ZeRO-0 checkpoints to and from DeepSpeed's universal form.

DeepSpeed converts and loads universal checkpoints for its ZeRO optimizers only. Without
ZeRO it keeps a plain torch AdamW (fp32), or its unfused mixed-precision wrapper around one
(bf16/fp16: an fp32 master per parameter, `fp32_groups`), saved whole in each model-parallel
rank's model-states file: one state per parameter, numbered in the order of the engine's
parameter groups (decay matrices, then the rest: training/engine.param_groups). Both are
plain to read and write, so megapatch does it itself, into and out of the same folder
layout DeepSpeed's converter writes (one folder per parameter: the whole fp32 weight, both
Adam moments, the step), and every other layout loads the result as it loads DeepSpeed's.
A pipeline in bf16/fp16 without ZeRO uses DeepSpeed's BF16_Optimizer instead, whose flat
partitions DeepSpeed's own converter reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megapatch.checkpoint.safe_load import safe_load
from megapatch.errors import CheckpointError
from megapatch.model import VOCAB_WEIGHTS

_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_plain_zero0(step_dir: Path) -> bool:
    """A ZeRO-0 checkpoint whose optimizer lives whole in the model-states files."""
    states = safe_load(step_dir / "mp_rank_00_model_states.pt", mmap=True)
    optimizer = states.get("optimizer")
    return isinstance(optimizer, dict) and ("state" in optimizer or "fp32_groups" in optimizer)


def to_universal(step_dir: Path, out: Path, client) -> None:
    """Write the universal form of ZeRO-0 checkpoint `step_dir` into folder `out`."""
    import deepspeed
    from deepspeed.checkpoint import constants as c

    from megapatch.model import GPT, GPTConfig
    from megapatch.model.pipeline import pipe_parameter_name, stage_partition

    cfg = GPTConfig.from_saved(client.model_config)
    params = dict(GPT.skeleton(cfg).named_parameters())
    tp, pp = client.tensor_model_parallel_size, client.pipeline_model_parallel_size
    parts = stage_partition(cfg, pp) if pp > 1 else [0, cfg.n_layers + 2]
    shards: dict[str, dict[str, list]] = {}
    steps: dict[str, float] = {}
    groups = None

    def layer_of(name: str) -> int:  # its pipeline layer (names are "<layer>.<local name>")
        return int(pipe_parameter_name(name, cfg.n_layers).split(".")[0])

    for stage in range(pp):
        names = [n for n in params if parts[stage] <= layer_of(n) < parts[stage + 1]]
        order = [n for n in names if params[n].dim() >= 2] + [
            n for n in names if params[n].dim() < 2
        ]
        for t in range(tp):
            file = step_dir / f"mp_rank_{stage * tp + t:02d}_model_states.pt"
            states = safe_load(file, mmap=True)
            optimizer = states.get("optimizer")
            torch_state = optimizer.get(c.OPTIMIZER_STATE_DICT, optimizer)
            ids = [i for group in torch_state["param_groups"] for i in group["params"]]
            if len(ids) != len(order):
                raise ValueError(
                    f"{file.name}: {len(ids)} optimizer entries, the model's stage has {len(order)}"
                )
            groups = groups or [
                {k: v for k, v in g.items() if k != "params"} for g in torch_state["param_groups"]
            ]
            if "fp32_groups" in optimizer:  # the mixed-precision wrapper's fp32 masters
                masters = [m for group in optimizer["fp32_groups"] for m in group]
            else:
                masters = [_weight(step_dir, states, name, t, cfg.n_layers) for name in order]
            for i, name, master in zip(ids, order, masters, strict=True):
                entry = torch_state["state"].get(i, {})
                shard = shards.setdefault(name, {"fp32": [], "exp_avg": [], "exp_avg_sq": []})
                shard["fp32"].append(master.float())
                for key in _MOMENTS:
                    shard[key].append(
                        entry[key].float()
                        if key in entry
                        else torch.zeros_like(master, dtype=torch.float32)
                    )
                steps[name] = float(entry.get("step", 0))
    zero = out / "zero"
    zero.mkdir(parents=True)
    for name, param in params.items():
        dim = getattr(param, "partition_dim", None)
        folder = zero / name
        folder.mkdir()
        for key, pieces in shards[name].items():
            full = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
            entry = {c.PARAM: full, c.CAT_DIM: 0 if dim is None else dim}
            if name in VOCAB_WEIGHTS:
                entry[c.PARAM] = full[: cfg.vocab_size].clone()
                entry[c.VOCAB_TENSOR] = True
            torch.save(entry, folder / f"{key}.pt")
        torch.save(torch.tensor(steps[name], dtype=torch.float32), folder / "step.pt")
    torch.save(
        {
            c.PARAM_GROUPS: groups,
            c.DS_VERSION: deepspeed.__version__,
            c.CLIP_GRAD: float(client.config.get("train", {}).get("grad_clip", 0.0)),
            "zero_stage": 0,
        },
        zero / "optimizer_state.pt",
    )
    # The model states without the optimizer (now in zero/) or weights: what a loader reads
    # there is the client state and DeepSpeed's counters.
    for file in sorted(step_dir.glob("mp_rank_*_model_states.pt")):
        states = dict(safe_load(file, mmap=True))
        states.update(optimizer=None, module=None)
        torch.save(states, out / file.name)


def _weight(step_dir: Path, states: dict, name: str, tp_rank: int, n_layers: int) -> torch.Tensor:
    """A plain fp32 run's weight: the module's (a pipeline keeps it in its layer files)."""
    if states.get("module") is not None:
        return states["module"][name]
    from megapatch.model.pipeline import pipe_parameter_name

    layer, local = pipe_parameter_name(name, n_layers).split(".", 1)
    file = step_dir / f"layer_{int(layer):02d}-model_{tp_rank:02d}-model_states.pt"
    return safe_load(file, mmap=True)[local]


def load_universal(engine, step_dir: Path) -> None:
    """Load universal checkpoint `step_dir` into a ZeRO-0 engine (a plain torch AdamW, or
    DeepSpeed's unfused mixed-precision wrapper): this rank's TP shard and pipeline stage of
    every weight, fp32 master and Adam state; the run's own optimizer hyperparameters."""
    from megapatch.checkpoint.tp_shards import tensor_parallel_shard

    model, optimizer = engine.module, engine.optimizer
    if type(optimizer).__name__ == "BF16_Optimizer":
        raise CheckpointError(
            f"{step_dir}: a universal checkpoint does not load into a pipeline without ZeRO in "
            "bf16/fp16 (DeepSpeed's BF16_Optimizer) here; resume it with parallel.zero_stage=1"
        )
    named = (
        model.gpt_named_parameters()
        if hasattr(model, "gpt_named_parameters")
        else model.named_parameters()
    )
    name_of = {id(p): n for n, p in named}
    wrapped = hasattr(optimizer, "fp32_groups")
    module_params = (
        [p for group in optimizer.fp16_groups for p in group]
        if wrapped
        else [p for group in optimizer.param_groups for p in group["params"]]
    )
    saved = optimizer.state_dict()
    torch_state = saved["optimizer_state_dict"] if wrapped else saved
    ids = [i for group in torch_state["param_groups"] for i in group["params"]]
    zero = step_dir / "zero"

    def shard(param, key: str) -> torch.Tensor:
        name = name_of[id(param)]
        full = safe_load(zero / name / f"{key}.pt")["param"]
        return tensor_parallel_shard(model, name, param, full).float()

    masters = [shard(param, "fp32") for param in module_params]
    with torch.no_grad():
        for param, master in zip(module_params, masters):  # bf16/fp16: rounded, as trained
            param.copy_(master)
    for i, param in zip(ids, module_params, strict=True):
        step = float(safe_load(zero / name_of[id(param)] / "step.pt"))
        torch_state["state"][i] = {
            "step": torch.tensor(step, dtype=torch.float32),
            **{key: shard(param, key) for key in _MOMENTS},
        }
    if wrapped:  # module_params is fp16_groups flattened, in order
        masters = iter(masters)
        saved["fp32_groups"] = [[next(masters) for _ in group] for group in optimizer.fp16_groups]
    optimizer.load_state_dict(saved)


__all__ = ["is_plain_zero0", "to_universal", "load_universal"]
