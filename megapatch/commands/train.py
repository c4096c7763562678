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
    _ignore_late_stop_signals()
    if result.summary and _is_rank0():
        print(
            json.dumps(
                {"status": result.status, "step": result.global_step, **result.summary}, indent=2
            )
        )
    return 0


def _ignore_late_stop_signals() -> None:
    """The run has stopped and checkpointed; the process only exits now. A launcher's stop
    signal that arrives late (another node's, a repeated one) would otherwise kill it with
    the default action and turn a clean exit into a failed job."""
    import signal

    from megapatch.training.preemption import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
