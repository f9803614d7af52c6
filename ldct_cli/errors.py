"""Exceptions of ldct-cli: each says which file (or option) and why, in one line."""

from __future__ import annotations

from pathlib import Path


class LdctError(Exception):
    """Base class: an error a user can act on, printed as one line (no traceback)."""


class UsageError(LdctError):
    """Bad options or paths: the run cannot start (exit code 2)."""


class CheckpointError(UsageError):
    """A checkpoint file that is missing, malformed, or fails its checksum (nothing can run)."""


class DicomError(LdctError):
    """A DICOM file that cannot be used; the message names the file."""

    def __init__(self, path: Path | str, reason: str):
        # Both go to Exception.__init__ so the error pickles across worker processes.
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class NotDicomError(DicomError):
    """The file is not DICOM at all (skipped when found while walking a folder)."""


class NotCTError(DicomError):
    """A valid DICOM object that is not a CT image (skipped, not failed)."""


class SeriesError(LdctError):
    """A series that cannot be written at all (e.g. none of its slices could be used); a bad
    slice alone is a DicomError, and leaves its series incomplete."""
