"""Error hierarchy shared by the CLI (exit codes) and the server (HTTP statuses)."""

from __future__ import annotations


class CvmError(Exception):
    """A failure the user can act on. The CLI prints it on one line and exits 1."""

    exit_code = 1
    http_status = 500


class UsageError(CvmError):
    """The command was called wrongly (bad flag values, missing files named on the command line)."""

    exit_code = 2
    http_status = 400


class DataError(CvmError):
    """Input data (images, class files, folders) is unusable."""

    http_status = 422


class ConceptError(CvmError):
    """A concept table is invalid or does not match what it is used with."""

    http_status = 422


class StoreError(CvmError):
    """The checkpoint or bundle store is missing, locked or inconsistent."""

    http_status = 500


class LockHeldError(StoreError):
    """Another process holds the single-writer lock."""

    http_status = 409


class ForgettingGateError(CvmError):
    """An update would forget more than allowed; nothing was published."""


class TrainingDivergedError(CvmError):
    """Training produced a non-finite loss: the weights are unusable and nothing was published."""


class ModelLoadError(CvmError):
    """A model file or bundle failed to load or verify."""
