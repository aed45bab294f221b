"""The two errors of model files, used by every package: a file that cannot be loaded as it is,
and a configuration value that cannot be used. Both name the file and the key."""


class CheckpointError(ValueError):
    """A checkpoint (model, adapter, training state) that cannot be loaded as it is: names the
    file and the tensor or key."""


class ConfigError(ValueError):
    """A configuration that cannot be used: a config.json key, a training option (names it)."""
