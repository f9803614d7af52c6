"""Exceptions of ldct-cli: each says which file (or option) and why, in one line."""

from __future__ import annotations

from pathlib import Path


class LdctError(Exception):
    """Base class: an error a user can act on, printed as one line (no traceback)."""


class UsageError(LdctError):
    """Bad options or paths: the run cannot start (exit code 2)."""


class CheckpointError(LdctError):
    """A checkpoint file that is missing, malformed, or fails its checksum."""


class DicomError(LdctError):
    """A DICOM file that cannot be used; the message names the file."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NotDicomError(DicomError):
    """The file is not DICOM at all (skipped when found while walking a folder)."""


class NotCTError(DicomError):
    """A valid DICOM object that is not a CT image (skipped, not failed)."""


class SeriesError(LdctError):
    """A series that cannot be processed as a whole (e.g. inconsistent matrix sizes)."""
