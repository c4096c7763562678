"""`megapatch generate RUN_OR_CHECKPOINT --prompt TEXT`: sample a continuation, streamed to
stdout as tokens come (temperature, top-k, top-p, KV cache, seeded)."""

from __future__ import annotations

import argparse
import sys

from megapatch.commands.evaluate import CHECKPOINT_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--prompt", required=True, help="text to continue ('' starts a new document)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off (default)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the same seed gives the same text (default: 0)"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute every step instead of a KV cache"
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep going past an end-of-document token"
    )
    parser.add_argument(
        "--tokenizer", help="a sentencepiece .model or a tokenizer.json (default: the run's)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from megapatch.checkpoint.full_weights import build_model, read_checkpoint
    from megapatch.checkpoint.hf import check_tokenizer_matches
    from megapatch.data import Tokenizer
    from megapatch.errors import CheckpointError
    from megapatch.model.generate import SamplingConfig, generate

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    ckpt = read_checkpoint(args.checkpoint)
    tokenizer_path = args.tokenizer or ckpt.tokenizer_path()
    if tokenizer_path is None:
        raise CheckpointError(f"{ckpt.path}: no tokenizer found for this run; pass --tokenizer")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_tokenizer_matches(tokenizer, ckpt.model_config.vocab_size, ckpt.path)

    # An empty prompt starts a new document: the data separates documents with EOS.
    prompt_ids = [int(i) for i in tokenizer.encode(args.prompt)] or [tokenizer.eos_id]
    model = build_model(ckpt, args.device)
    tokens = generate(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        use_cache=not args.no_cache,
        stop_ids=() if args.ignore_eos or tokenizer.eos_id < 0 else (tokenizer.eos_id,),
        vocab_limit=tokenizer.vocab_size,
    )
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    new_ids: list[int] = []
    shown = ""
    for token in tokens:
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        if text.endswith("\ufffd"):  # the middle of a character spelled in byte pieces
            continue
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write(tokenizer.decode(new_ids)[len(shown) :] + "\n")
    out.flush()
    return 0
