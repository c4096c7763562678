"""Run configuration: typed sections loaded from YAML, with `base:` inheritance and
dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["patch.size=4", "train.total_tokens=2e6"])
    cfg.model.d_model, cfg.patch.fraction, cfg.train.lr, ...
    cfg.save_resolved(run_dir)      # run_dir/config.yaml: every value, resolved, documented
    cfg.config_hash()               # identity of the run: model, data, patch, budget, seed
    cfg2 = with_overrides(cfg, ["train.lr=1e-3"])   # a new, validated config

The batch arithmetic of a config (whole sequences per step in every phase) is the
scheduler's rule: `megapatch.training.schedule.plan_for_world(cfg, world_size)` checks it
and the launched job's shape, and returns the plan.

Sections (`sections.py`) are frozen dataclasses whose field docstrings are the user
documentation (`config_reference()` renders them; the saved config carries them as
comments). Values are checked strictly; every mistake raises `ConfigError` with one line
naming the file (or override), the dotted key, the value and what was expected.
Relative paths in values (data, run dir) are relative to the working directory; `base:`
paths are relative to the file naming them. A file may name several bases; later ones,
then the file itself, then the overrides win.
"""

from megapatch.config.loading import (
    config_from_dict,
    config_reference,
    load_config,
    with_overrides,
)
from megapatch.config.sections import (
    FIELD_DOCS,
    SECTIONS,
    CheckpointSection,
    DataSection,
    EvalSection,
    InitSection,
    LoggingSection,
    ModelSection,
    ParallelSection,
    PatchSection,
    RunConfig,
    RunSection,
    TrainSection,
)
from megapatch.config.validation import Checker, model_shape_problems, resolve_vocab_size
from megapatch.config.yamlio import parse_override

__all__ = [
    "RunConfig",
    "load_config",
    "config_from_dict",
    "parse_override",
    "with_overrides",
    "Checker",
    "model_shape_problems",
    "resolve_vocab_size",
    "config_reference",
    "SECTIONS",
    "FIELD_DOCS",
    "RunSection",
    "ModelSection",
    "ParallelSection",
    "DataSection",
    "PatchSection",
    "TrainSection",
    "CheckpointSection",
    "EvalSection",
    "LoggingSection",
    "InitSection",
]
