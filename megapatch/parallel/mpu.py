"""The `mpu` handed to `deepspeed.initialize(mpu=...)`.

DeepSpeed 0.19 reads the parallel layout through this object:
- ZeRO shards optimizer state over `get_data_parallel_group()` only, and broadcasts the
  initial weights inside it, so each TP rank keeps its own shards;
- grad-norm clipping sums squared norms over `get_model_parallel_group()`, counting
  parameters marked `tensor_model_parallel` on every TP rank and the replicated ones on
  TP rank 0 only (`deepspeed.runtime.utils.is_model_parallel_parameter`);
- checkpoints are named by `get_model_parallel_rank()`;
- `bwc_*` helpers prefer the `tensor_model_parallel` and `pipeline_model_parallel` names.

There is deliberately no `initialize_sequence_parallel`: DeepSpeed takes its presence as
"Ulysses sequence parallelism" and then ignores the model-parallel group in ZeRO's norm.
Without the sequence-parallel getters DeepSpeed falls back to size 1, which is our case.
"""

from __future__ import annotations

from megapatch.parallel import state


def _initialized() -> None:
    if not state.model_parallel_is_initialized():
        raise RuntimeError(
            "call megapatch.parallel.initialize_model_parallel() before handing mpu to DeepSpeed"
        )


class ModelParallelUnit:
    """Megatron-style mpu: model parallel here means tensor parallel (no pipeline stages)."""

    def get_model_parallel_group(self):
        _initialized()
        return state.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        _initialized()
        return state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        _initialized()
        return state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.get_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.get_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        _initialized()
        return state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        _initialized()
        return state.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        _initialized()
        return state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        _initialized()
        return state.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        _initialized()
        return state.get_data_parallel_group_ranks()

    # No pipeline parallelism: one stage. DeepSpeed's checkpoint metadata asks for these.
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


mpu = ModelParallelUnit()
