"""One error family. The CLI prints these as one line and exits with code 2;
anything else is a bug and keeps its traceback."""


class MegapatchError(Exception):
    """A user-facing error: bad input, not a bug. The message is one self-contained line."""


class ConfigError(MegapatchError, ValueError):
    """A config file, key or value is wrong."""


class DataError(MegapatchError):
    """Input data, shards or manifests are missing, truncated or inconsistent."""


class CheckpointError(MegapatchError):
    """A checkpoint is missing, incomplete or does not match the run."""
