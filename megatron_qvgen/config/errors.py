"""The one exception type for invalid configuration, raised before anything is allocated."""


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent; the message names the field."""
