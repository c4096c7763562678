"""megapatch.training.memory: model state to the byte against a real DeepSpeed engine on
CPU (gloo, DP=2 and TP=2; fp32, bf16, fp16), a block's activations against what autograd saves, and the
scaling of the estimate in micro-batch, TP, SP, checkpointing, PP and the loss backend."""

from __future__ import annotations

import pytest
import torch

from megapatch.errors import ConfigError
from megapatch.flops import ModelDims
from megapatch.training.memory import (
    Layout,
    ZeroOptions,
    activation_bytes,
    estimate_memory,
    estimate_stages,
    loss_bytes,
    model_state_bytes,
    parameter_groups,
    parse_size,
)
from tests.distributed import run_distributed
from tests.fixtures import tiny_gpt_config

# Small enough that ZeRO-3 partitions the matrices and keeps the norms whole, and that its
# reduce bucket is not the default 2 GB of fp32.
ZERO = ZeroOptions(reduce_bucket_size=10_000, param_persistence_threshold=100)
DEEPSPEED_OVERRIDES = {
    "zero_optimization": {
        "reduce_bucket_size": ZERO.reduce_bucket_size,
        "stage3_param_persistence_threshold": ZERO.param_persistence_threshold,
    }
}


def tiny_dims(cfg, tp: int = 1) -> ModelDims:
    from megapatch.parallel import pad_vocab_size

    return ModelDims(
        vocab_size=pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        ffn_hidden=cfg.ffn_hidden,
        seq_len=cfg.seq_len,
    )


# ------------------------------------------------------------------ model state, exactly


def _storages(engine, base) -> int:
    """Bytes of the distinct storages the engine holds: module weights and their grads
    (ZeRO-3: partitions), the torch optimizer's parameters, grads and state, and the tensors
    DeepSpeed's optimizer wrapper keeps (flat groups, partitions, buckets, norm scalars)."""
    seen: dict[int, int] = {}

    def walk(obj, depth=0):
        if depth > 7:
            return
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr():
                seen.setdefault(st.data_ptr(), st.nbytes())
            for extra in (obj.grad, getattr(obj, "ds_tensor", None)):
                if extra is not None:
                    walk(extra, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)
        elif type(obj).__module__.startswith("deepspeed.runtime.zero") and depth < 4:
            walk(vars(obj), depth + 1)  # ZeRO-3's bucket objects

    walk(list(engine.module.parameters()))
    walk([g["params"] for g in base.param_groups])
    walk(dict(base.state))
    walk({k: v for k, v in vars(engine.optimizer).items() if v is not base})
    return sum(seen.values())


def _held_bytes(rank, world_size, tp, cases, model_fields):
    """{(stage, precision): bytes held after backward, at the optimizer step (the most of
    its per-group calls) and after the step}, on the second of two steps."""
    import deepspeed

    from megapatch.model import GPT
    from megapatch.parallel import destroy_model_parallel, initialize_model_parallel, mpu
    from megapatch.training.engine import base_optimizer, deepspeed_config, param_groups

    initialize_model_parallel(tp)
    dp = world_size // tp
    out = {}
    w = torch.randint(0, 250, (2, 2 * 8 + 2), generator=torch.Generator().manual_seed(rank))
    for stage, precision in cases:
        model = GPT(tiny_gpt_config(ops_backend="torch", **model_fields), seed=0)
        config = deepspeed_config(
            micro_batch_size=2,
            grad_accum=1,
            dp_size=dp,
            zero_stage=stage,
            precision=precision,
            grad_clip=1.0,
            lr=1e-3,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.1,
            on_cuda=False,
            overrides=DEEPSPEED_OVERRIDES,
        )
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, 0.1), config=config, mpu=mpu
        )
        base = base_optimizer(engine)
        at_step: list[int] = []  # one call per parameter group under ZeRO
        base.register_step_pre_hook(
            lambda *_, e=engine, b=base, out=at_step: out.append(_storages(e, b))
        )
        for _ in range(2):  # the second step: Adam's state exists
            at_step.clear()
            engine.backward(engine(w[:, :-2], w[:, 2:], patch_size=2))
            after_backward = _storages(engine, base)
            engine.step()
        out[stage, precision] = (after_backward, max(at_step), _storages(engine, base))
        engine.destroy()
    destroy_model_parallel()
    return out


LAYOUTS = {  # TP: (cases, model); ZeRO-3 with TP > 1 is refused by the config today
    # One 34-wide head: the 5 x 34 norm weights pad to 172 for 2 x DP=2 and the partition
    # boundary cuts a norm weight, so padding and straddling parameters are both counted.
    1: (
        [(s, p) for s in (0, 1, 2, 3) for p in ("fp32", "bf16", "fp16")],
        dict(d_model=34, n_heads=1, n_kv_heads=1),
    ),
    2: ([(s, p) for s in (0, 1, 2) for p in ("fp32", "bf16")], {}),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.usefixtures("kept_gloo_workers")
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_model_state_is_what_deepspeed_allocates(tp):
    world = 2
    cases, model_fields = LAYOUTS[tp]
    groups = parameter_groups(tiny_dims(tiny_gpt_config(**model_fields), tp), tp=tp)
    held = run_distributed(_held_bytes, world, tp, cases, model_fields, reuse_workers=True)
    for rank, per_case in enumerate(held):
        dp_rank = rank // tp  # TP ranks adjacent
        for (stage, precision), (after_backward, at_step, after_step) in per_case.items():
            layout = Layout(
                micro_batch=2,
                seq_len=8,
                patch_size=2,
                tp=tp,
                dp=world // tp,
                zero_stage=stage,
                precision=precision,
                zero=ZERO,
            )
            s = model_state_bytes(groups, layout, dp_rank)
            kept = s["params"] + s["master"] + s["adam"]
            if stage == 3:  # its gradient partition and reduce bucket live all run
                kept += s["gradients"] + s["zero3_bucket"]
            where = f"rank {rank}, ZeRO-{stage} {precision}, TP {tp}"
            assert after_step == kept, where
            expected_backward = kept + (0 if stage == 3 else s["gradients"])
            assert after_backward == expected_backward, where
            if stage == 3:  # the step's fp32 gradients: an upper bound
                assert at_step <= expected_backward + s["step_buffers"], where
            else:
                assert at_step == expected_backward + s["step_buffers"], where


def test_parameter_groups_are_the_models_in_order():
    from megapatch.model import GPT
    from megapatch.training.engine import param_groups

    cfg = tiny_gpt_config()
    model = GPT(cfg)
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]
    assert list(parameter_groups(tiny_dims(cfg))) == groups
    dims = tiny_dims(cfg)
    assert sum(map(sum, groups)) == sum(dims.parameters().values())


def test_pipeline_stages_split_the_parameters():
    dims = tiny_dims(tiny_gpt_config(n_layers=4))
    stages = [parameter_groups(dims, pp=2, stage=s) for s in (0, 1)]
    total = sum(sum(sum(g) for g in st) for st in stages)
    assert total == sum(sum(g) for g in parameter_groups(dims))
    V, D = dims.vocab_size, dims.d_model
    assert stages[0][0][0] == V * D and stages[1][0][-1] == V * D  # embedding / head
    assert stages[1][1][-1] == D and len(stages[1][1]) == len(stages[0][1]) + 1  # final norm


def test_zero_options_from_the_deepspeed_overrides():
    assert ZeroOptions.from_deepspeed(None) == ZeroOptions()
    assert ZeroOptions.from_deepspeed(DEEPSPEED_OVERRIDES) == ZERO


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_a_blocks_activations_are_what_autograd_saves(dtype, kv_heads):
    """On CPU SDPA's flash kernel saves q, k, v, the output and the logsumexp, as the CUDA
    kernels do; everything else a block saves is the formula's (RoPE casts included)."""
    from megapatch.model import GPT
    from megapatch.model.transformer import rotary_cos_sin

    cfg = tiny_gpt_config(n_kv_heads=kv_heads, seq_len=16)
    block = GPT(cfg).to(dtype).layers[0]
    x = torch.randn(3, cfg.seq_len, cfg.d_model, dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(cfg.seq_len), cfg.head_dim, cfg.rope_theta)
    skip = {t.untyped_storage().data_ptr() for t in (cos, sin, *block.parameters())}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    precision = "fp32" if dtype == torch.float32 else "bf16"
    layout = Layout(micro_batch=3, seq_len=cfg.seq_len, precision=precision)
    acts = activation_bytes(tiny_dims(cfg), layout, layers=1)
    rope_casts = acts["rope"] - 2 * 4 * cfg.seq_len * cfg.head_dim  # the fp32 tables skipped
    assert sum(saved.values()) == acts["per_layer"] + rope_casts


DIMS_370M = ModelDims(
    vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2752,
    seq_len=2048,
)  # fmt: skip


def acts(**kw) -> dict[str, int]:
    return activation_bytes(DIMS_370M, Layout(**{"micro_batch": 1, "seq_len": 2048, **kw}))


def test_activations_scale_with_micro_batch_tp_sp_and_checkpointing():
    one, four = acts(), acts(micro_batch=4)
    assert four["blocks"] == 4 * one["blocks"] and four["ids"] == 4 * one["ids"]
    # TP shards attention and MLP but not the norms; SP shards the norms too.
    D, positions = DIMS_370M.d_model, 2048
    norms = positions * 2 * ((4 + 2 * 2) * D + 4)
    tp2 = acts(tp=2)["per_layer"]
    assert tp2 - norms == (one["per_layer"] - norms) // 2
    assert acts(tp=2, sequence_parallel=True)["per_layer"] == one["per_layer"] // 2
    assert acts(tp=4, sequence_parallel=True)["per_layer"] == one["per_layer"] // 4
    # Checkpointing: block inputs only, plus one block recomputed in backward.
    ckpt = acts(activation_checkpointing=True)
    assert ckpt["blocks"] == 24 * positions * 2 * D + one["per_layer"]
    assert ckpt["blocks"] < one["blocks"] / 10
    # The patch phase reads K tokens per position: only the ids grow.
    patch = acts(patch_size=4)
    assert patch["blocks"] == one["blocks"] and patch["ids"] == 4 * one["ids"]


def test_loss_logits_depend_on_the_backend():
    def loss(backend, micro=4, tp=1):
        return loss_bytes(
            DIMS_370M, Layout(micro_batch=micro, seq_len=2048, tp=tp, backend=backend)
        )

    n, V = 4 * 2048, 32000
    assert loss("reference")["logits"] == 3 * 4 * n * V  # [N, V] fp32, three of them
    assert loss("reference", tp=2)["logits"] == 3 * 4 * n * V // 2
    assert loss("triton")["logits"] == 0
    assert 0 < loss("torch")["logits"] <= 4 << 23  # one chunk of 2^23 fp32 logits
    assert loss("torch", micro=8)["logits"] == loss("torch")["logits"]
    assert loss("triton")["loss_buffers"] == 4 * (n * 1024 + V * 1024)


def test_pipeline_first_stage_holds_p_micro_batches():
    dims = ModelDims(**{**DIMS_370M.__dict__, "n_layers": 8})
    base = dict(micro_batch=1, seq_len=2048, micro_batches=8)
    first = estimate_stages(dims, Layout(pp=4, **base))[0]
    blocks = first.layers[1] - 1  # after the embedding
    flat = activation_bytes(dims, Layout(**base), layers=blocks)["blocks"]
    assert first.in_flight == 4 and first.activations >= 4 * flat
    # A split by parameters that leaves a stage without a block is refused.
    with pytest.raises(ConfigError, match="stage 0 of the 8 blocks .* holds no block"):
        estimate_memory(dims, Layout(pp=4, stage_bounds=(0, 1, 4, 7, 10), **base))


def test_the_370m_estimate_is_sensible():
    est = estimate_memory(
        DIMS_370M, Layout(micro_batch=4, seq_len=2048, dp=8, zero_stage=2, precision="bf16")
    )
    n = sum(DIMS_370M.parameters().values())
    assert abs(est.params - 2 * n) <= 2 * 16  # bf16, padded to 2*DP per group
    assert est.optimizer == pytest.approx(12 * n / 8, rel=1e-6)
    assert 4 * 2**30 < est.activations < 16 * 2**30
    fp32 = estimate_memory(
        DIMS_370M, Layout(micro_batch=4, seq_len=2048, dp=1, zero_stage=0, precision="fp32")
    )
    assert fp32.master == 0 and fp32.params == fp32.gradients == 4 * n


@pytest.mark.parametrize(
    "text, size",
    [("80GiB", 80 * 2**30), ("141 GB", 141 * 10**9), ("0.5TiB", 2**39), ("96e9B", 96 * 10**9)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "80", "80 parsecs", "0GiB", "-1GiB"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_size(text)
