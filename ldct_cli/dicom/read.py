"""Discover CT series in a file tree, sort their slices, and read stored pixels and HU.

Follows ``DICOM.md``: group by Series Instance UID (by folder and geometry when it is
empty), sort along the slice normal, HU = stored * slope + intercept, and mark padding
pixels so they are written back unchanged. Every transfer syntax with an installed
decoder reads (GDCM, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, pydicom's own).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
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

    @property
    def n_slices(self) -> int:
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


def _looks_like_headerless_dicom(path: Path) -> bool:
    """Old files without preamble and file meta start with a group 0x0008 tag (little endian)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return len(head) == 8 and head[:2] == b"\x08\x00"


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file; headerless old files are read as Implicit VR Little Endian."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
    except DicomError:
        raise
    except (OSError, EOFError) as exc:
        raise DicomError(path, f"cannot read: {exc}") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DicomError(path, f"damaged DICOM file ({type(exc).__name__}: {exc})") from None


def sop_class_of(ds: Dataset) -> str:
    """SOP Class UID, from the dataset or else the file meta (some exports leave one empty)."""
    value = str(ds.get("SOPClassUID", "") or "")
    if not value and getattr(ds, "file_meta", None) is not None:
        value = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return value


def sop_instance_of(ds: Dataset) -> str:
    """SOP Instance UID, from the dataset or else the file meta."""
    value = str(ds.get("SOPInstanceUID", "") or "")
    if not value and getattr(ds, "file_meta", None) is not None:
        value = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return value


def transfer_syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return value or pydicom.uid.ImplicitVRLittleEndian


def check_ct_image(ds: Dataset, path: Path) -> None:
    """Raise NotCTError unless ``ds`` is a single-frame, single-sample CT image."""
    sop_class = sop_class_of(ds)
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        raise NotCTError(path, "Enhanced CT (multi-frame) is not supported yet")
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        raise NotCTError(path, f"not a CT image ({UID(sop_class).name})")
    if not sop_class and ds.get("Modality") != "CT":
        raise NotCTError(path, f"not a CT image (modality {ds.get('Modality', 'missing')})")
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
            raise DicomError(path, f"{keyword} {size}: not a positive matrix size")
    if _int_element(ds, "SamplesPerPixel", path, 1) != 1 or (_int_element(ds, "NumberOfFrames", path, 1) or 1) != 1:
        raise NotCTError(path, "not a single-frame grayscale image")
    bits = _int_element(ds, "BitsAllocated", path, 16)
    if bits != 16:  # the CT Image module allows only 16
        raise DicomError(path, f"Bits Allocated {bits} (a CT image has 16)")
    _rescale_checked(ds, path)


def _element(ds: Dataset, keyword: str, path: Path, default=None):
    """The value of ``keyword``, or DicomError naming the element when pydicom cannot read it."""
    try:
        value = ds.get(keyword, default)
    except Exception as exc:  # a damaged element: bad VR, bad length, undecodable value
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DicomError(path, f"{keyword}: unreadable element ({detail})") from None
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
        raise DicomError(path, f"{keyword} {str(value)[:40]!r}: not an integer")
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
            raise DicomError(path, f"{keyword} {str(value)[:40]!r}: not a finite number, so no HU")
        values.append(number)
    if values[0] == 0:
        raise DicomError(path, "Rescale Slope 0: every pixel would be the intercept, so no HU")
    return values[0], values[1]


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_slice_header(path: Path) -> tuple[SliceHeader, Dataset]:
    """Read and check one slice's header (no pixels). Raises DicomError and its kinds."""
    ds = read_dataset(path, stop_before_pixels=True)
    check_ct_image(ds, path)
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
    ), ds


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
    """Find every CT series under ``root`` (a file, a series folder, or a tree of studies)."""
    root = Path(root)
    grouped: dict[str, Series] = {}
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    for path in iter_files(root):
        if not path.is_file():  # a FIFO, socket or device: reading it could block forever
            skipped.append((path, "not a regular file"))
            continue
        try:
            header, ds = read_slice_header(path)
            number = _int_element(ds, "SeriesNumber", path, None)
        except (NotDicomError, NotCTError) as exc:
            skipped.append((path, exc.reason))
            continue
        except DicomError as exc:
            failed.append((path, exc.reason))
            continue
        key = header.series_uid or _fallback_key(header, root)
        series = grouped.get(key)
        if series is None:
            series = grouped[key] = Series(
                key=key, series_uid=header.series_uid, folder=path.parent,
                description=str(ds.get("SeriesDescription", "") or ""), number=number,
            )
        series.slices.append(header)
    for series in grouped.values():
        series.slices = sort_slices(series.slices)
        series.folder = Path(os.path.commonpath([s.path.parent for s in series.slices]))
    ordered = sorted(grouped.values(), key=lambda s: (str(s.folder), s.number or 0, s.key))
    return Discovery(series=ordered, skipped=skipped, failed=failed)


def stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The stored pixel values of a slice as a 2D integer array (decoding any syntax)."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message says which and why
        syntax = UID(transfer_syntax_of(ds))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DicomError(path, f"cannot decode pixel data ({syntax.name}): {reason}") from None
    if pixels.ndim != 2:
        raise DicomError(path, f"expected one 2D frame, got pixel array of shape {pixels.shape}")
    return pixels


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
