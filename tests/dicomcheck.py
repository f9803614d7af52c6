"""Validate DICOM output with dicom3tools (``dciodvfy``, ``dcentvfy``), as ``DICOM.md`` asks.

``DICOM.md``: a derived series must not have an error its source did not already have.
Real inputs are rarely clean (missing Type 2 patient attributes, hex strings as UIDs,
vendor quirks), so the check is a difference: ``new_errors(source, output)``.

For that difference to mean something, the same problem must read the same in both
files. ``dciodvfy`` messages embed values that necessarily differ between a source and
its derived instance (UIDs, dates, times, descriptions); ``normalize_error`` removes
exactly those and keeps what names the problem:

- the value after ``= <...>`` (``UI [1] = <1.2.3>`` becomes ``UI [1] = <>``); names such
  as ``Element=<PatientSex> Module=<Patient>`` are kept (no space before ``=``);
- quoted values (``Illegal root for UID - "1.2.3" in (0x0008,0x1155) ...``);
- the offending character of ``Character invalid for this VR = 'd' (0x64)`` (dciodvfy
  prints one line per bad character: they collapse into one);
- the actual length of ``Length invalid for this VR = 3, expected == 4`` (the expected
  length, a property of the VR, stays).

The tag, attribute name, VR, value index and kind of error all stay: the same defect
moved into another attribute (say an invalid source UID copied into a Referenced SOP
Instance UID) counts as new.

When ``dciodvfy`` cannot identify the source's IOD at all (an empty SOP Class UID gives
"Information Object Not found" and no module checks), ``new_errors`` validates a
temporary copy of the source with only the SOP Class UID filled in from the file meta,
so that module-level problems the source already had (a missing Type 2C Laterality,
say) are not charged to the output.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import require_tool

TIMEOUT_S = 120
NO_IOD = "Error - Information Object Not found"

# "Error - ..." at the start of a line, or after a "(0xgggg,0xeeee) VR Name  - " prefix.
_ERROR_LINE = re.compile(r"(?:^|\s-\s)Error - ")
_NORMALIZERS = [
    (re.compile(r" = <[^>]*>"), " = <>"),
    (re.compile(r'"[^"]*"'), '""'),
    (re.compile(r"([Cc]haracter invalid for this VR) = '.*?' \(0x[0-9a-fA-F]+\)"), r"\1"),
    (re.compile(r"(Length invalid for this VR) = \d+"), r"\1 = #"),
    (re.compile(r"\s+"), " "),
]


def _run(tool: str, args: list[str]) -> str:
    """stdout + stderr of a dicom3tools command (they report on stderr; rc 1 means errors)."""
    exe = require_tool(tool)
    result = subprocess.run([exe, *args], capture_output=True, text=True, errors="replace",
                            timeout=TIMEOUT_S)
    return result.stdout + result.stderr


def _error_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if _ERROR_LINE.search(line)]


def normalize_error(line: str) -> str:
    """One dciodvfy Error line without the values that differ between a source and its output."""
    for pattern, replacement in _NORMALIZERS:
        line = pattern.sub(replacement, line)
    return line.strip()


def dciodvfy_errors(path: str | Path) -> set[str]:
    """The normalized Error lines ``dciodvfy`` reports for one file (warnings ignored)."""
    return {normalize_error(line) for line in _error_lines(_run("dciodvfy", [str(path)]))}


def dcentvfy_errors(paths: list[str | Path] | list[Path]) -> list[str]:
    """The Error lines ``dcentvfy`` reports on the files of one series (entity consistency:
    duplicate SOP Instance UIDs, patient/study/series attributes that differ between files)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("dcentvfy_errors: no files given")
    return _error_lines(_run("dcentvfy", paths))


def _source_errors(input_file: Path) -> set[str]:
    errors = dciodvfy_errors(input_file)
    if NO_IOD not in errors:
        return errors
    import pydicom

    ds = pydicom.dcmread(input_file)
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if not sop_class or str(ds.get("SOPClassUID", "") or ""):
        return errors  # nothing better to validate against
    ds.SOPClassUID = sop_class
    with tempfile.TemporaryDirectory(prefix="ldct-dciodvfy-") as folder:
        copy = Path(folder) / "source.dcm"
        ds.save_as(copy, enforce_file_format=False)
        return errors | dciodvfy_errors(copy)


def new_errors(input_file: str | Path, output_file: str | Path) -> set[str]:
    """Normalized dciodvfy errors of ``output_file`` that its source ``input_file`` did not have."""
    return dciodvfy_errors(output_file) - _source_errors(Path(input_file))
