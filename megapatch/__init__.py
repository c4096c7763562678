"""megapatch: patch-level pretraining of GPT-style language models.

The model first reads K tokens at a time as one averaged patch and predicts the next
patch, then switches to ordinary next-token training (arXiv 2407.12665).
"""

from megapatch.errors import CheckpointError, ConfigError, DataError, MegapatchError

__version__ = "0.1.0"

__all__ = ["MegapatchError", "ConfigError", "DataError", "CheckpointError", "__version__"]
