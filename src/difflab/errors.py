"""The error raised for bad user input, before any training or sampling starts."""


class ConfigError(ValueError):
    """A config value, path or file the user gave cannot be used; the message names it and what is allowed."""
