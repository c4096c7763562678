import subprocess
import sys


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "megapatch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("prep", "plan", "train", "eval", "export", "generate", "compare"):
        assert name in out
