"""megapatch.training.memory under pipeline parallelism: each stage's model state to the
byte against DeepSpeed's pipeline engine on CPU (two gloo processes, PP=2, the tiny model
of tests/training/conftest.py, ZeRO-0 and ZeRO-1), the stage split against DeepSpeed's,
and `megapatch plan`'s per-stage table."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megapatch.cli import main
from megapatch.config import load_config
from megapatch.errors import ConfigError
from megapatch.flops import ModelDims
from megapatch.training.memory import (
    Layout,
    ZeroOptions,
    activation_bytes,
    estimate_stages,
    pipeline_layer_parameters,
    pipeline_stage_bounds,
    stage_layers,
)
from tests.distributed import run_distributed
from tests.training.conftest import REPO, TINY_OVERRIDES
from tests.training.test_memory import DIMS_370M, _storages

TINY = str(REPO / "configs" / "tiny.yaml")
VOCAB = 250  # padded to 256
# CPU: one reduce bucket (engine.py turns overlap_comm on only on CUDA), and a small one.
ZERO = ZeroOptions(reduce_bucket_size=10_000, overlap_comm=False)
PIPELINE = [
    *TINY_OVERRIDES,
    f"model.vocab_size={VOCAB}",
    "train.ops_backend=torch",
    "parallel.pipeline_model_parallel_size=2",
    f"parallel.deepspeed.zero_optimization.reduce_bucket_size={ZERO.reduce_bucket_size}",
]


def tiny_pipeline_config(zero_stage: int, precision: str):
    return load_config(
        TINY, [*PIPELINE, f"parallel.zero_stage={zero_stage}", f"train.precision={precision}"]
    )


# ------------------------------------------------------------------ the stage split


def test_the_stage_split_is_deepspeeds():
    """The plan's torch-free split draws DeepSpeed's boundaries, ties included, and the
    model's layer counts; so the plan's stages are the ones a run builds."""
    from deepspeed.runtime.utils import partition_balanced

    from megapatch.model import GPTConfig
    from megapatch.model.pipeline import layer_parameter_counts, stage_partition

    rng = random.Random(0)
    for _ in range(150):
        n, parts = rng.randint(1, 14), rng.randint(1, 6)
        high = rng.choice([3, 10**9])  # small weights: many tied splits
        weights = [rng.randint(1, high) for _ in range(n)]
        expected = [int(b) for b in partition_balanced(weights, parts)]
        assert pipeline_stage_bounds(weights, parts) == expected, (weights, parts)
    paper = load_config(str(REPO / "configs" / "paper-370m-patch.yaml"))
    for cfg, vocab, stages in (
        (paper, 32000, (2, 3, 4, 8)),
        (tiny_pipeline_config(1, "fp32"), VOCAB, (2,)),
    ):
        model = GPTConfig.from_run_config(cfg, vocab)
        dims = ModelDims.from_config(cfg, vocab)
        split_vocab = ModelDims.from_config(cfg, vocab, tensor_parallel_size=1).vocab_size
        counts = pipeline_layer_parameters(dims, split_vocab)
        assert counts == layer_parameter_counts(model)
        for pp in stages:
            assert pipeline_stage_bounds(counts, pp) == stage_partition(model, pp), pp


def test_stage_layers_in_words():
    assert stage_layers(0, 13, 24) == "embed + blocks 0-11"
    assert stage_layers(13, 26, 24) == "blocks 12-23 + head"
    assert stage_layers(0, 2, 2) == "embed + block 0"
    assert stage_layers(5, 9, 24) == "blocks 4-7"


def test_in_flight_micro_batches_and_boundary_buffers_per_stage():
    dims = ModelDims(**{**DIMS_370M.__dict__, "n_layers": 8})
    layout = dict(micro_batch=1, seq_len=2048, pp=4, zero_stage=1, micro_batches=8)
    stages = estimate_stages(dims, Layout(**layout))
    assert [st.in_flight for st in stages] == [4, 3, 2, 1]  # 1F1B: min(P - s, m)
    assert [st.in_flight for st in estimate_stages(dims, Layout(**{**layout, "micro_batches": 2}))] == [2, 2, 2, 1]  # fmt: skip
    assert [st.logits + st.loss_buffers > 0 for st in stages] == [False, False, False, True]
    # Stage 0's activations: 4 micro-batches of each of its blocks.
    per_layer = activation_bytes(dims, Layout(micro_batch=1, seq_len=2048), layers=1)["per_layer"]
    blocks = stages[0].layers[1] - 1
    assert blocks >= 1 and stages[0].activations > 4 * blocks * per_layer
    assert stages[-1].activations < 2 * (8 - blocks) * per_layer
    # TP slices what crosses a boundary; SP sends L/TP positions and receives them so.
    a, whole = 2, 2048 * dims.d_model
    tp2 = estimate_stages(dims, Layout(**{**layout, "tp": 2}))
    sp2 = estimate_stages(dims, Layout(**{**layout, "tp": 2, "sequence_parallel": True}))
    middle = stages[1].pipe_buffers
    assert middle == a * whole * (1 + 3 + 3)  # receive buffer, 3 inputs, 3 outputs
    assert tp2[1].pipe_buffers == a * whole * (1 + 6 + 3) // 2
    assert sp2[1].pipe_buffers == middle // 2
    with pytest.raises(ConfigError, match="ZeRO stage 2 with pipeline size 4"):
        Layout(**{**layout, "zero_stage": 2})


# ------------------------------------------------------------------ model state, exactly


def _pipeline_held(rank, world_size, cases):
    """Per case, on this rank's stage: bytes of model state held at the backward's peak
    (after a gradient accumulates), at the optimizer step and after the step, and of the
    pipeline's boundary buffers after the step, on the second of two steps."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    generator = torch.Generator().manual_seed(rank)
    return {case: _pipeline_case(*case, generator) for case in cases}


def _pipeline_case(zero_stage, precision, generator):
    from megapatch import parallel
    from megapatch.model import GPTConfig
    from megapatch.training import engine as engine_ops
    from megapatch.training.schedule import StagePlan

    cfg = tiny_pipeline_config(zero_stage, precision)
    # As the trainer builds it: the groups, this rank's stage, the engine for the phase.
    parallel.initialize_model_parallel(1, 2)
    dp, cpu = parallel.get_data_parallel_world_size(), torch.device("cpu")
    phase = StagePlan.from_config(cfg, dp_size=dp, vocab_size=VOCAB).phases[0]
    model = engine_ops.build_model(cfg, GPTConfig.from_run_config(cfg, VOCAB), cpu, dp_size=dp)
    engine = engine_ops.build_engine(model, cfg, phase, dp_size=dp, device=cpu)
    engine_ops.shape_engine(engine, phase, dp)
    base = engine_ops.base_optimizer(engine)
    backward, at_step = [], []
    base.register_step_pre_hook(lambda *_: at_step.append(_storages(engine, base)))
    for p in engine.module.parameters():
        p.register_post_accumulate_grad_hook(lambda _: backward.append(_storages(engine, base)))
    k = phase.patch_size

    def micro_batches():
        for _ in range(phase.grad_accum):
            shape = (phase.micro_batch_size, k * phase.seq_len + k)
            window = torch.randint(0, VOCAB, shape, generator=generator)
            yield window[:, :-k], window[:, k:]  # as Trainer.pipeline_step does

    for _ in range(2):  # the second step: Adam's state exists
        backward.clear()
        at_step.clear()
        engine.train_batch(micro_batches())
    pipe: dict[int, int] = {}
    held = [engine.pipe_buffers, engine._grad_layer_buf, engine.pipe_recv_buf, engine.meta_buffer]
    for t in _tensors(held):
        pipe.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    out = dict(
        stage=parallel.get_pipeline_model_parallel_rank(),
        optimizer=type(engine.optimizer).__name__,
        backward=max(backward),
        at_step=max(at_step),
        after_step=_storages(engine, base),
        pipe=sum(pipe.values()),
    )
    engine.destroy()
    parallel.destroy_model_parallel()
    return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


CASES = [(0, "fp32"), (0, "bf16"), (0, "fp16"), (1, "fp32"), (1, "bf16")]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.usefixtures("kept_gloo_workers")
def test_pipeline_model_state_is_what_deepspeed_allocates():
    held = run_distributed(_pipeline_held, 2, CASES, reuse_workers=True)
    dims = ModelDims.from_config(tiny_pipeline_config(1, "fp32"), VOCAB)
    for rank, per_case in enumerate(held):
        for (zero_stage, precision), got in per_case.items():
            cfg = tiny_pipeline_config(zero_stage, precision)
            phase = plan_phase(cfg)
            layout = Layout(
                micro_batch=phase.micro_batch_size,
                seq_len=phase.seq_len,
                patch_size=phase.patch_size,
                pp=2,
                zero_stage=zero_stage,
                precision=precision,
                zero=ZERO,
                micro_batches=phase.grad_accum,
            )
            est = estimate_stages(dims, layout)[got["stage"]]
            where = f"rank {rank} (stage {got['stage']}), ZeRO-{zero_stage} {precision}, {got['optimizer']}"
            assert got["stage"] == rank, where  # TP=1, DP=1: rank = stage
            kept = est.params + est.master + est.adam + est.grad_buffer
            assert got["after_step"] == kept, where
            # ZeRO-1 allocates its reduce bucket at the step's last micro-batch.
            bucket = est.comm_buffers if zero_stage == 1 else 0
            assert got["backward"] == kept + est.gradients + bucket, where
            assert got["at_step"] == kept + est.step_gradients + est.step_buffers, where
            assert got["pipe"] == est.pipe_persistent, where
    optimizers = {case: got["optimizer"] for case, got in held[0].items()}
    assert optimizers[0, "bf16"] == "BF16_Optimizer"  # the pipeline's own bf16 path


def plan_phase(cfg):
    from megapatch.training.schedule import StagePlan

    return StagePlan.from_config(cfg, dp_size=1, vocab_size=VOCAB).phases[0]


# ------------------------------------------------------------------ megapatch plan


def test_plan_prints_every_stage_of_every_phase(capsys):
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.zero_stage=1"]
    code = main(["plan", TINY, *PIPELINE, *layout, "--dp", "2", "--gpu-memory", "1GiB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cluster TP 2 x PP 2 x DP 2 = 8 rank(s), ZeRO-1, fp32" in out
    assert "PP bubble" in out and "pipeline: 2 stages, 1F1B" in out  # the schedule's table
    table = out[out.index("memory per GPU") :]
    assert table.splitlines()[0].startswith(
        "memory per GPU, GiB (estimate; ZeRO-1, fp32, TP 2, PP 2,"
    )
    rows = [line.split() for line in table.splitlines()[2:6]]
    assert [r[:2] for r in rows] == [["patch", "0"], ["patch", "1"], ["token", "0"], ["token", "1"]]
    assert "embed + block 0" in table and "block 1 + head" in table
    assert "fits    in 1.00 GiB (--gpu-memory 1GiB): yes, stage " in table

    main(["plan", TINY, *PIPELINE, *layout, "--dp", "2", "--json"])
    memory = json.loads(capsys.readouterr().out)["memory"]
    stages = memory["stages"]["token"]
    assert [st["stage"] for st in stages] == [0, 1]
    assert memory["phases"]["token"] == max(stages, key=lambda st: st["total"])
    # The last stage alone holds the loss; the first alone the input ids.
    assert stages[0]["loss_buffers"] == 0 < stages[1]["loss_buffers"]
