"""`megapatch train CONFIG [key=value ...]`: the same command under every launcher."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. patch.size=4 train.total_tokens=2e6"
    )


def run(args: argparse.Namespace) -> int:
    from megapatch.config import load_config
    from megapatch.training import train
    from megapatch.training.schedule import StagePlan

    cfg = load_config(args.config, args.overrides)
    StagePlan.from_config(cfg, dp_size=1)  # the batch arithmetic, before data or processes
    result = train(cfg)
    if result.summary and _is_rank0():
        print(
            json.dumps(
                {"status": result.status, "step": result.global_step, **result.summary}, indent=2
            )
        )
    return 0


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
