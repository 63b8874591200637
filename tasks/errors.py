"""Exception classes raised by the ``tasks`` package.

Every data problem raises a subclass of :class:`DatasetError` (itself a :class:`RuntimeError`), so a
caller can catch all of them at once; each message says what is wrong, which file is affected and
how to fix it.
"""

from __future__ import annotations

__all__ = ["ChecksumError", "DatasetError", "DatasetNotFoundError", "DownloadError", "IDXFormatError"]


class DatasetError(RuntimeError):
    """Base class of every dataset problem (missing, corrupt, wrongly formatted or undownloadable data)."""


class DatasetNotFoundError(DatasetError):
    """The dataset files are not on disk and could not (or were not allowed to) be downloaded.

    The message lists the missing file names and every folder that was searched, and says where to put them.
    """


class ChecksumError(DatasetError):
    """A dataset file exists but its MD5 / SHA-256 differs from the published value (corrupt, truncated,
    or a different dataset's file). The message names the file, the expected and the actual checksum."""


class IDXFormatError(DatasetError):
    """A file is not a valid IDX file: wrong magic number, unknown data type, payload shorter or longer
    than the header says, unexpected shape, or a truncated / corrupt gzip stream."""


class DownloadError(DatasetError):
    """Every mirror failed (after retries) while downloading a dataset file."""
