"""Errors a user can cause. The CLI prints them as one line, without a traceback."""

__all__ = [
    "PyroVAEError",
    "ConfigError",
    "DataError",
    "IDXError",
    "CheckpointError",
    "TrainingError",
    "ResourceError",
    "TrainingInterrupted",
]


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


class TrainingError(PyroVAEError):
    """Training that cannot go on (a non-finite loss or parameters); the last good checkpoint is kept."""


class ResourceError(PyroVAEError):
    """The machine lacks what a command needs: memory for the model and its training, or space on
    the disk for a file (files being replaced are kept whole)."""


class TrainingInterrupted(PyroVAEError):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after a checkpoint was written.

    :param str message: what happened and how to resume.
    :param int signum: the signal; the exit code is ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
