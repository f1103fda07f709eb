"""The one exception for bad user input.

It lives alone so that every module can raise it without importing the config schema
or its file loading (and without an import circle between the two). The CLI prints it
as one line and exits with status 2; ``bigtrain.config`` re-exports it, the name most
code imports it by.
"""


class ConfigError(ValueError):
    """Bad user input: a config, a command line, a data directory or a checkpoint."""
