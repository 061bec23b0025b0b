"""The exceptions of :mod:`pmptrain.bench.data`."""

from __future__ import annotations

__all__ = ["DataError", "DatasetNotFoundError", "CorruptDataError", "ChecksumError"]



class DataError(RuntimeError):
    """Base class of the data errors of :mod:`pmptrain.bench.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data set's files are in none of the searched directories (and were not downloaded)."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but is truncated, has a wrong header, or holds inconsistent arrays."""


class ChecksumError(CorruptDataError):
    """A downloaded file's checksum differs from the published one (the file has been removed)."""
