"""The errors of model files: a file that cannot be loaded as it is (fileio's CheckpointError,
re-exported: models.qwen.CheckpointError is public), and a configuration value that cannot be
used. Both name the file and the key."""

from fileio.errors import CheckpointError, QwenTuneError  # noqa: F401  (public: models.qwen.CheckpointError)


class ConfigError(QwenTuneError, ValueError):
    """A configuration that cannot be used: a config.json key, a training option (names it)."""
