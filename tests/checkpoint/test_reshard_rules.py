"""The pure rules of resharding: when it is needed, and the TP layout it records."""

from __future__ import annotations

import re

import pytest
import torch

from megapatch.checkpoint.reshard import Layout, needs_reshard, universal_checkpoint_info
from megapatch.model import GPT, GPTConfig


@pytest.mark.parametrize(
    "saved, target, needed",
    [
        (Layout(1, 2, 1), Layout(1, 2, 1), False),
        (Layout(1, 2, 1), Layout(1, 2, 2), False),  # ZeRO-1 and 2 share a format
        (Layout(1, 4, 0), Layout(1, 2, 0), False),  # ZeRO-0 replicates the optimizer
        (Layout(1, 2, 1), Layout(1, 1, 1), True),
        (Layout(1, 2, 2), Layout(1, 2, 3), True),
        (Layout(2, 1, 1), Layout(1, 2, 1), True),
        (Layout(1, 1, 1, 2), Layout(1, 1, 1, 2), False),
        (Layout(1, 1, 1, 2), Layout(1, 1, 1, 1), True),  # pipeline stages hold other layers
        (Layout(1, 2, 0, 2), Layout(1, 1, 0, 2), False),
    ],
)
def test_when_a_reshard_is_needed(saved, target, needed):
    assert needs_reshard(saved, target) is needed


def test_every_parameter_has_one_tp_rule():
    from deepspeed.checkpoint import constants as c

    cfg = GPTConfig(vocab_size=250, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, seq_len=16)
    with torch.device("meta"):
        model = GPT(cfg)
    info = universal_checkpoint_info(model)
    rules = {
        "replicated": info[c.TP_REPLICATED_PARAMETER_PATTERNS],
        "dim1": info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS],
    }
    for name, param in model.named_parameters():
        hits = [k for k, patterns in rules.items() for p in patterns if re.match(p, name)]
        dim = getattr(param, "partition_dim", None)
        assert hits == ({None: ["replicated"], 1: ["dim1"]}.get(dim, [])), name
    vocab = [
        n
        for n, _ in model.named_parameters()
        for p in info[c.VOCABULARY_PARAMETER_PATTERNS]
        if re.match(p, n)
    ]
    assert sorted(vocab) == ["embed_tokens.weight", "lm_head.weight"]
    assert info[c.ORIGINAL_VOCAB_SIZE] == 250


def test_a_pipeline_records_every_stages_rules_under_the_pipelines_names():
    """The converter reads one rank's copy of the rules, so each stage records them all."""
    from deepspeed.checkpoint import constants as c

    from megapatch.model.pipeline import pipe_parameter_name

    cfg = GPTConfig(vocab_size=250, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, seq_len=16)
    with torch.device("meta"):
        model = GPT(cfg)

    class Stage:  # what universal_checkpoint_info reads of a GPTPipe stage
        def __init__(self):
            self.cfg = cfg

        def gpt_named_parameters(self):
            return iter(())  # this stage's own (none): the rules must not depend on them

    pipe_info, info = universal_checkpoint_info(Stage()), universal_checkpoint_info(model)
    for key in (c.TP_REPLICATED_PARAMETER_PATTERNS, c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                c.VOCABULARY_PARAMETER_PATTERNS):  # fmt: skip
        expected = [
            f"^{re.escape(pipe_parameter_name(p[1:-1].replace(chr(92), ''), 2))}$"
            for p in info[key]
        ]
        assert pipe_info[key] == expected, key
    assert pipe_parameter_name("layers.1.mlp.down_proj.weight", 2) == "2.mlp.down_proj.weight"
