"""The one exception type of checkpoint conversion: a missing, corrupt or mismatched checkpoint."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted or loaded; the message names the file, key or field."""
