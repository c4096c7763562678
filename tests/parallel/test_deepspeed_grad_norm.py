"""DeepSpeed's gradient norm with our mpu at TP=2 x DP=2 equals the TP=1 model's.

This holds only if DeepSpeed sums sharded gradients over the TP group (they carry
`tensor_model_parallel`), counts replicated ones (the norms) once, and reduces and shards
over the DP group only.
"""

import pytest
import torch

from megapatch.model import GPT, GPTConfig
from megapatch.parallel import destroy_model_parallel, initialize_model_parallel, mpu
from megapatch.training.engine import grad_norm_before_step, keeps_grad_norm
from tests.distributed import run_distributed
from tests.fixtures import tiny_gpt_config

# run_distributed(..., reuse_workers=True): under xdist, one worker keeps the processes
pytestmark = pytest.mark.usefixtures("kept_gloo_workers")

SEED = 3
K = 2


def config() -> GPTConfig:
    # vocabulary 101: padded to 102 at TP=2
    return tiny_gpt_config(vocab_size=101, seq_len=4, make_vocab_size_divisible_by=1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(0, 101, (2, K * 4 + K), generator=torch.Generator().manual_seed(0))
    return w[:, :-K], w[:, K:]


def _deepspeed_norms(rank, world_size, tp):
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    initialize_model_parallel(tp)
    dp = world_size // tp
    inputs, targets = batch()  # the same batch on every DP rank: the DP mean is the TP=1 gradient
    norms = {}
    for stage in (0, 1, 2):
        model = GPT(config(), seed=SEED)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            mpu=mpu,
            config={
                "train_batch_size": 2 * dp,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                "zero_optimization": {"stage": stage},
                "steps_per_print": 2**62,
            },
        )
        loss = engine(inputs, targets, patch_size=K)
        engine.backward(loss)
        if stage == 0:
            # Plain fp32 without ZeRO: the engine clips with this function and keeps no norm,
            # so megapatch computes it before the step (what metrics.jsonl logs).
            norms[stage] = float(clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=mpu))
            assert not keeps_grad_norm(engine)
            norms["megapatch"] = grad_norm_before_step(engine)
            engine.step()
            assert engine.get_global_grad_norm() is None
        else:
            assert keeps_grad_norm(engine)
            engine.step()
            norms[stage] = float(engine.get_global_grad_norm())
        engine.destroy()
    destroy_model_parallel()
    return norms


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_grad_norm_at_tp2_dp2_equals_tp1():
    torch.set_num_threads(1)
    model = GPT(config(), seed=SEED)
    inputs, targets = batch()
    model(inputs, targets, patch_size=K).backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()

    for rank, norms in enumerate(run_distributed(_deepspeed_norms, 4, 2, reuse_workers=True)):
        for stage, norm in norms.items():
            assert norm == pytest.approx(expected, rel=1e-5), f"rank {rank}, ZeRO stage {stage}"
