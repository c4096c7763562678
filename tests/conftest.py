import os

# Tests are CPU-only and must not touch the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
