"""Errors a user can cause. The CLI prints them as one line, without a traceback."""

__all__ = ["PyroVAEError", "ConfigError", "DataError", "IDXError", "CheckpointError"]


class PyroVAEError(Exception):
    """Base class of every error caused by input (data, flags, files), not by a bug."""

    exit_code = 1


class ConfigError(PyroVAEError, ValueError):
    """An impossible setting (bad flag value, unknown name)."""

    exit_code = 2


class DataError(PyroVAEError):
    """Data that cannot be found, downloaded or used."""


class IDXError(DataError, ValueError):
    """A file that is not a valid MNIST-format IDX file."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint that cannot be loaded safely."""
