"""Discover CT series in a file tree, sort their slices, and read stored pixels and HU.

Follows ``DICOM.md``: group by Series Instance UID (by folder and geometry when it is
empty), sort along the slice normal, HU = stored * slope + intercept, and mark padding
pixels so they are written back unchanged. Every transfer syntax with an installed
decoder reads (GDCM, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, pydicom's own).

A bad file is one ``DicomError`` naming the file, the element (tag and keyword) where one is
at fault, and why, in one line; a value is only repeated when it is short and printable (a
damaged length can make an element swallow the bytes of others, patient tags among them).
pydicom's warnings are silenced (``quiet_pydicom``): they are about values that break their
VR's rules (an invalid UID character, an IS too long), and every element ldct uses is
validated here with its own error, while the others are copied to the output unchanged, so
the warnings would change nothing and repeat once per slice and element.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ldct_cli.errors import DicomError, NotCTError, NotDicomError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
# Scanners fill the corners outside the reconstruction circle with values far below
# air (-2000, -3024 HU are common): anything below this is not anatomy.
PADDING_BELOW_HU = -1200.0


@dataclass(frozen=True)
class SliceHeader:
    """What discovery needs of one slice file (read without its pixel data)."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    rows: int
    columns: int
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    transfer_syntax: str


@dataclass
class Series:
    """One CT series: its slices in spatial order, and how it was identified."""

    key: str  # Series Instance UID, or a stable stand-in when the file has none
    series_uid: str  # as in the files; may be empty
    folder: Path  # folder holding the series' files (the deepest common one)
    slices: list[SliceHeader] = field(default_factory=list)
    description: str = ""
    number: int | None = None
    # Files of this series that cannot be used (also in Discovery.failed): a damaged header
    # whose Series Instance UID (or else folder) ties it to this series, or a matrix size
    # other than the series' own.
    bad: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        """The usable slices (``slices``); ``bad`` files are not counted."""
        return len(self.slices)


@dataclass
class Discovery:
    """The result of walking an input: series to process, files skipped and files failed."""

    series: list[Series]
    skipped: list[tuple[Path, str]]
    failed: list[tuple[Path, str]]


def iter_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), in a stable order.

    Hidden names (``.DS_Store``, our own ``.ldct-partial-*``) are left out.
    """
    if root.is_file():
        return [root]
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    return found


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's warnings here (why: the module docstring); others still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        yield


_QUOTED = re.compile(r"(?<!\w)b?('[^']*'|\"[^\"]*\")(?!\w)")
_ADVICE = re.compile(r"\s*(To replace this error|Please see <|This occurred while).*$")  # pydicom's, not ours


def brief(exc: BaseException | str) -> str:
    """An exception's message as one short line: its first line, long quoted values cut out
    (they may hold other elements' bytes), at most 160 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    line = _QUOTED.sub(lambda m: m[0] if len(m[1]) <= 26 else "'...'", line)
    line = _ADVICE.sub("", line) or type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def element_name(tag_or_keyword: int | str) -> str:
    """'(0028,1053) RescaleSlope': how every message names an element."""
    tag = tag_for_keyword(tag_or_keyword) if isinstance(tag_or_keyword, str) else int(tag_or_keyword)
    if tag is None:
        return str(tag_or_keyword)
    keyword = keyword_for_tag(tag) or ("private" if tag >> 16 & 1 else "unknown")
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


_PRINTABLE = re.compile(r"[ -~]{0,40}")


def _shown(value) -> str:
    """``value`` quoted when short and printable, else only its size."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return repr(text) if _PRINTABLE.fullmatch(text) else f"(an unprintable value of {len(text)} characters)"


def _looks_like_headerless_dicom(path: Path) -> bool:
    """Old files without preamble and file meta start with a group 0x0008 tag (little endian)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return len(head) == 8 and head[:2] == b"\x08\x00"


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file; headerless old files are read as Implicit VR Little Endian.

    A file cut short says so: in its header, or in its pixel data (``stop_before_pixels``
    False), never a damaged header for a cut in the pixels.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = _dcmread(path, stop_before_pixels=stop_before_pixels)
    except DicomError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the file's content
            raise DicomError(path, f"cannot read: {exc.strerror or exc}") from None
        raise DicomError(path, f"damaged DICOM file ({brief(exc)})") from None
    except (EOFError, struct.error) as exc:  # a length or a tag runs past the end of the file
        raise DicomError(path, f"truncated or damaged header: an element runs past the end of the file "
                               f"({path.stat().st_size} bytes; {brief(exc)})") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DicomError(path, f"damaged DICOM file ({type(exc).__name__}: {brief(exc)})") from None
    if any("End of file reached before delimiter" in str(w.message) for w in caught):
        # pydicom then returns what it read before (often nothing but the file meta).
        if not stop_before_pixels and "Rows" in read_dataset(path, stop_before_pixels=True):
            raise DicomError(path, "Pixel Data truncated: the file ends inside its encapsulated pixel data")
        raise DicomError(path, "truncated or damaged header: the file ends inside a sequence or an item")
    return ds


def _dcmread(path: Path, *, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        if not _looks_like_headerless_dicom(path):
            raise NotDicomError(path, "not a DICOM file") from None
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "Modality" not in ds and "SOPClassUID" not in ds:
            raise NotDicomError(path, "not a DICOM file") from None
        if "TransferSyntaxUID" not in ds.file_meta:
            # No file meta: the encoding pydicom detected is the transfer syntax.
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit else
                pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        return ds


def uid_of(ds: Dataset | None, keyword: str) -> str:
    """The text of a UID element; "" when absent, or when pydicom cannot parse it."""
    try:
        return str(ds.get(keyword, "") or "") if ds is not None else ""
    except Exception:
        return ""


def sop_class_of(ds: Dataset) -> str:
    """SOP Class UID, from the dataset or else the file meta (some exports leave one empty)."""
    return uid_of(ds, "SOPClassUID") or uid_of(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID")


def sop_instance_of(ds: Dataset) -> str:
    """SOP Instance UID, from the dataset or else the file meta."""
    return uid_of(ds, "SOPInstanceUID") or uid_of(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID")


def transfer_syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return value or pydicom.uid.ImplicitVRLittleEndian


def check_ct_image(ds: Dataset, path: Path) -> None:
    """Raise NotCTError unless ``ds`` is a single-frame, single-sample CT image."""
    sop_class = sop_class_of(ds)
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        raise NotCTError(path, "Enhanced CT (multi-frame) is not supported yet")
    if sop_class and not UID(sop_class).is_valid:  # a flipped byte, not another kind of object
        raise DicomError(path, f"{element_name('SOPClassUID')} {_shown(sop_class)}: not a valid UID "
                               "(damaged header)")
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        raise NotCTError(path, f"not a CT image ({UID(sop_class).name})")
    if not sop_class:
        modality = _element(ds, "Modality", path)
        if modality != "CT":
            raise NotCTError(path, f"not a CT image (modality {_shown(modality or 'missing')})")
    if "Rows" not in ds or "Columns" not in ds:
        # A CT image always has them: the header is cut short or damaged.
        raise DicomError(path, "CT image without Rows/Columns (truncated or damaged header)")
    image_type = _element(ds, "ImageType", path) or []
    if isinstance(image_type, (str, bytes)) or not hasattr(image_type, "__iter__"):
        image_type = [image_type]  # one value, or a number where a code string belongs
    image_type = [str(v).upper() for v in image_type]
    if len(image_type) > 2 and image_type[2] == "LOCALIZER":
        raise NotCTError(path, "localizer (scout) image")
    for keyword in ("Rows", "Columns"):
        size = _int_element(ds, keyword, path, None)
        if size is None or size < 1:
            raise DicomError(path, f"{element_name(keyword)} {size}: not a positive matrix size")
    if _int_element(ds, "SamplesPerPixel", path, 1) != 1 or (_int_element(ds, "NumberOfFrames", path, 1) or 1) != 1:
        raise NotCTError(path, "not a single-frame grayscale image")
    bits = _int_element(ds, "BitsAllocated", path, 16)
    if bits != 16:  # the CT Image module allows only 16
        raise DicomError(path, f"{element_name('BitsAllocated')} {bits}: a CT image has 16")
    # The decoders and the writer do arithmetic with these: a wrong type would fail there,
    # as a message about lists and ints.
    stored = _int_element(ds, "BitsStored", path, None)
    if stored is None or not 1 <= stored <= 16:
        raise DicomError(path, f"{element_name('BitsStored')} {stored}: not between 1 and 16")
    high_bit = _int_element(ds, "HighBit", path, stored - 1)
    if not 0 <= high_bit <= 15:
        raise DicomError(path, f"{element_name('HighBit')} {high_bit}: not between 0 and 15")
    representation = _int_element(ds, "PixelRepresentation", path, None)
    if representation not in (0, 1):
        raise DicomError(path, f"{element_name('PixelRepresentation')} {representation}: not 0 or 1")
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        _int_element(ds, keyword, path, None)
    photometric = _element(ds, "PhotometricInterpretation", path)
    if photometric is not None and str(photometric).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"{element_name('PhotometricInterpretation')} {_shown(photometric)}: "
                               "a CT image is MONOCHROME2")
    _rescale_checked(ds, path)


def _element(ds: Dataset, keyword: str, path: Path, default=None):
    """The value of ``keyword``, or DicomError naming the element when pydicom cannot read it."""
    try:
        value = ds.get(keyword, default)
    except Exception as exc:  # a damaged element: bad VR, bad length, undecodable value
        raise DicomError(path, f"{element_name(keyword)}: unreadable element ({brief(exc)})") from None
    return default if value in (None, "") else value


def _int_element(ds: Dataset, keyword: str, path: Path, default: int | None) -> int | None:
    """An integer element (IS or US), or DicomError naming it and its value."""
    value = _element(ds, keyword, path, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise DicomError(path, f"{element_name(keyword)} {_shown(value)}: not an integer")
    return int(number)


def _rescale_checked(ds: Dataset, path: Path) -> tuple[float, float]:
    """(slope, intercept), or DicomError when either is not a finite number or the slope is 0."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = _element(ds, keyword, path, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DicomError(path, f"{element_name(keyword)} {_shown(value)}: not a finite number, so no HU")
        values.append(number)
    if values[0] == 0:
        raise DicomError(path, f"{element_name('RescaleSlope')} 0: every pixel would be the intercept, so no HU")
    return values[0], values[1]


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def slice_header(ds: Dataset, path: Path) -> SliceHeader:
    """Check the header ``ds`` read from ``path`` (without pixels) and take what discovery
    needs of it. Raises DicomError and its kinds."""
    with quiet_pydicom():
        check_ct_image(ds, path)
        return _slice_header(ds, path)


def _slice_header(ds: Dataset, path: Path) -> SliceHeader:
    return SliceHeader(
        path=path,
        sop_instance_uid=sop_instance_of(ds),
        series_uid=str(_element(ds, "SeriesInstanceUID", path, "") or ""),
        rows=_int_element(ds, "Rows", path, None),
        columns=_int_element(ds, "Columns", path, None),
        instance_number=_int_element(ds, "InstanceNumber", path, None),
        position=_floats(_element(ds, "ImagePositionPatient", path), 3),
        orientation=_floats(_element(ds, "ImageOrientationPatient", path), 6),
        transfer_syntax=transfer_syntax_of(ds),
    )


def _fallback_key(header: SliceHeader, root: Path) -> str:
    """A stand-in series key for files with no Series Instance UID: folder + geometry.

    The folder is taken relative to the input root, so the key (and the UIDs minted
    from it) do not depend on where the tree lies or how the user named it.
    """
    orientation = tuple(round(v, 3) for v in header.orientation) if header.orientation else None
    folder = header.path.parent.relative_to(root if root.is_dir() else root.parent).as_posix()
    text = f"{folder}|{header.rows}x{header.columns}|{orientation}"
    return "nouid-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return np.cross(row, col)


def sort_slices(slices: list[SliceHeader]) -> list[SliceHeader]:
    """Order along the slice normal; fall back to Instance Number, then file name.

    Positions are projected on the normal of the first slice, so gantry tilt and
    uneven spacing sort correctly (no constant z step is assumed).
    """
    first = slices[0]
    if first.orientation and all(s.position for s in slices):
        normal = slice_normal(first.orientation)
        return sorted(slices, key=lambda s: (float(np.dot(normal, s.position)),
                                             s.instance_number or 0, str(s.path)))
    return sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, str(s.path)))


def discover(root: Path) -> Discovery:
    """Find every CT series under ``root`` (a file, a series folder, or a tree of studies).

    One bad file never hides a series, but it makes its series incomplete: a file whose
    header fails is tied to its series by its Series Instance UID, or else by its folder
    when that holds one series only, and listed in the series' ``bad`` (and in ``failed``);
    so is a slice whose matrix size differs from most of its series'. An exact duplicate (the
    same SOP Instance UID at the same position, or the same position and pixel data) is
    skipped, naming the file it repeats.
    """
    root = Path(root)
    grouped: dict[str, Series] = {}
    at_position: dict[tuple, list[SliceHeader]] = {}
    pixel_digests: dict[Path, bytes | None] = {}  # of slices sharing a position only
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    unplaced: list[tuple[Path, str, str]] = []  # failed files: path, reason, their Series Instance UID
    for path in iter_files(root):
        if not path.is_file():  # a FIFO, socket or device: reading it could block forever
            skipped.append((path, "not a regular file"))
            continue
        ds = None
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            header = slice_header(ds, path)
            number = _int_element(ds, "SeriesNumber", path, None)
        except (NotDicomError, NotCTError) as exc:
            skipped.append((path, exc.reason))
            continue
        except DicomError as exc:
            failed.append((path, exc.reason))
            unplaced.append((path, exc.reason, uid_of(ds, "SeriesInstanceUID")))
            continue
        key = header.series_uid or _fallback_key(header, root)
        series = grouped.get(key)
        if series is None:
            series = grouped[key] = Series(
                key=key, series_uid=header.series_uid, folder=path.parent,
                description=_description(ds), number=number,
            )
        place = (key, header.position if header.position is not None else ("instance", header.instance_number))
        repeated = _duplicate_of(header, at_position.setdefault(place, []), pixel_digests)
        if repeated is not None:
            skipped.append((path, repeated))
            continue
        at_position[place].append(header)
        series.slices.append(header)
    for series in grouped.values():
        _set_aside_odd_matrices(series, failed)
        series.slices = sort_slices(series.slices)
        series.folder = Path(os.path.commonpath([s.path.parent for s in series.slices]))
    for path, reason, uid in unplaced:
        if uid:
            owners = [grouped[uid]] if uid in grouped else []
        else:  # unreadable: the series of its folder, when there is exactly one
            owners = [s for s in grouped.values() if any(h.path.parent == path.parent for h in s.slices)]
        if len(owners) == 1:
            owners[0].bad.append((path, reason))
    ordered = sorted(grouped.values(), key=lambda s: (str(s.folder), s.number or 0, s.key))
    return Discovery(series=ordered, skipped=skipped, failed=failed)


def _description(ds: Dataset) -> str:
    try:
        return str(ds.get("SeriesDescription", "") or "")
    except Exception:  # unreadable: the output folder is named without it
        return ""


def _duplicate_of(header: SliceHeader, same_place: list[SliceHeader],
                  digests: dict[Path, bytes | None]) -> str | None:
    """Why ``header`` repeats a slice found before at its place in its series, or None.

    Real archives hold files that share a SOP Instance UID at different positions: those
    are distinct slices, kept. Pixel data is read (once per file, into ``digests``) only
    for slices that share a position.
    """
    for earlier in same_place:
        if header.sop_instance_uid and header.sop_instance_uid == earlier.sop_instance_uid:
            return f"duplicate of {earlier.path} (the same SOP Instance UID and position)"
        if header.position is not None:
            mine, theirs = (_pixel_digest(h.path, digests) for h in (header, earlier))
            if mine is not None and mine == theirs:
                return f"duplicate of {earlier.path} (the same position and pixel data)"
    return None


def _pixel_digest(path: Path, digests: dict[Path, bytes | None]) -> bytes | None:
    """SHA-256 of the file's Pixel Data bytes; None when it has none or cannot be read (that
    failure is reported when the slice is read)."""
    if path not in digests:
        try:
            item = read_dataset(path).get_item(0x7FE00010)
        except DicomError:
            item = None
        value = item.value if item is not None else None
        digests[path] = hashlib.sha256(value).digest() if isinstance(value, bytes) else None
    return digests[path]


def _set_aside_odd_matrices(series: Series, failed: list[tuple[Path, str]]) -> None:
    """Move the slices whose matrix is not the series' most common one to its ``bad`` files
    (ties: the larger matrix is the series')."""
    sizes = Counter((s.rows, s.columns) for s in series.slices)
    if len(sizes) < 2:
        return
    (rows, columns), count = max(sizes.items(), key=lambda item: (item[1], item[0][0] * item[0][1]))
    kept = []
    for header in series.slices:
        if (header.rows, header.columns) == (rows, columns):
            kept.append(header)
            continue
        reason = (f"matrix {header.rows}x{header.columns}, but {count} of the series' {len(series.slices)} "
                  f"slices are {rows}x{columns}: not one of its images")
        series.bad.append((header.path, reason))
        failed.append((header.path, reason))
    series.slices = kept


def stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The stored pixel values of a slice as a 2D integer array (decoding any syntax)."""
    if "PixelData" not in ds:
        raise DicomError(path, "no Pixel Data element (the file may be truncated)")
    _check_native_length(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message says which and why
        syntax = UID(transfer_syntax_of(ds))
        raise DicomError(path, f"cannot decode pixel data ({syntax.name}): {brief(exc)}") from None
    if pixels.ndim != 2:
        raise DicomError(path, f"expected one 2D frame, got pixel array of shape {pixels.shape}: the "
                               "header (Rows, Columns, Number of Frames) does not match the pixel data")
    return pixels


def _check_native_length(ds: Dataset, path: Path) -> None:
    """Uncompressed pixel data must be as long as its element says (else the file is cut
    short) and hold Rows x Columns 16-bit pixels (else the header does not describe them)."""
    if UID(transfer_syntax_of(ds)).is_encapsulated:
        return
    item = ds.get_item(0x7FE00010)
    if not isinstance(item, RawDataElement) or item.value is None or item.length == 0xFFFFFFFF:
        return
    held = len(item.value)
    if held < item.length:
        raise DicomError(path, f"Pixel Data truncated: the file holds {held} of its {item.length} bytes")
    needed = int(ds.Rows) * int(ds.Columns) * 2  # one frame of 16-bit pixels (checked before)
    if held < needed:  # more is decoded as further frames, or trimmed as padding, by pydicom
        raise DicomError(path, f"{element_name(0x7FE00010)} holds {held} bytes but Rows x Columns "
                               f"{int(ds.Rows)}x{int(ds.Columns)} need {needed}: the header does not match "
                               "the pixels")


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept); missing tags mean 1 and 0."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU (float32) from stored values. float32 holds every 16-bit stored value and its
    image under any common rescale closely enough (< 0.01 of a step) that the inverse
    rounds back exactly (tested on every stored value)."""
    image = stored.astype(np.float32)
    if slope != 1.0:
        image *= np.float32(slope)
    image += np.float32(intercept)
    return image


def padding_mask(ds: Dataset, stored: np.ndarray, image_hu: np.ndarray) -> np.ndarray:
    """Pixels that are not anatomy: Pixel Padding Value (or its range) and far-below-air values."""
    mask = image_hu < PADDING_BELOW_HU
    value = ds.get("PixelPaddingValue")
    if value is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is None:
            mask |= stored == int(value)
        else:
            lo, hi = sorted((int(value), int(limit)))
            mask |= (stored >= lo) & (stored <= hi)
    return mask


def load_slice(path: Path) -> tuple[Dataset, np.ndarray]:
    """Read one CT slice: its header (pixel data removed) and its stored values.

    Runs in worker processes: both results pickle cheaply.
    """
    ds = read_dataset(path)
    with quiet_pydicom():
        check_ct_image(ds, path)
        stored = stored_pixels(ds, path)
    del ds["PixelData"]
    return ds, stored


def read_hu(series: Series, indices) -> list[np.ndarray]:
    """The HU images (float32) of the slices at ``indices`` of ``series``."""
    images = []
    for index in indices:
        header, stored = load_slice(series.slices[index].path)
        images.append(stored_to_hu(stored, *rescale_of(header)))
    return images
