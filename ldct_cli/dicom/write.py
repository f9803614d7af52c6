"""Write a denoised slice as a new, standards-correct derived CT instance (``DICOM.md``).

Must change: new deterministic SOP/Series Instance UIDs, Image Type DERIVED\\SECONDARY,
Series Number and Description, creation and content date/time, transfer syntax, pixel
value statistics, no icon. Should add: Derivation Description and Code Sequence, Source
Image Sequence and Referenced Series Sequence, Contributing Equipment. Everything else
(patient, study, frame of reference, image plane, acquisition, dose, rescale, windows,
padding, private tags) is kept as it was.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    UID,
    RLELossless,
    generate_uid,
)

from ldct_cli._version import __version__
from ldct_cli.dicom.read import (
    CT_IMAGE_STORAGE,
    brief,
    element_name,
    load_slice,
    quiet_pydicom,
    rescale_of,
    sop_class_of,
    sop_instance_of,
    transfer_syntax_of,
    uid_of,
)
from ldct_cli.errors import DicomError
from ldct_cli.fsutil import atomic_path

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
# Lossless syntaxes that --transfer-syntax keep writes again as they were.
_KEEP_AS_IS = {DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless}
# JPEG Lossless has no encoder in pydicom's plugins: JPEG-LS lossless is its nearest kin.
_KEEP_AS_JPEG_LS = {JPEG_LOSSLESS, JPEGLosslessSV1}
# Syntaxes that may be lossy and the Lossy Image Compression Method each one implies. JPEG
# baseline/extended and near-lossless JPEG-LS always are; JPEG 2000 and HTJ2K (.91, .203)
# may be either, so the source's own Lossy Image Compression "00" is believed there. The
# HTJ2K "Lossless Only" syntaxes (.201, .202) are never lossy.
_LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}
_LOSSLESS_OR_LOSSY = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}


def went_through_lossy_compression(source_syntax: str, source_flag) -> bool:
    """Whether pixels stored in ``source_syntax`` (with the source's Lossy Image Compression
    value ``source_flag``) were lossy-compressed: where the syntax allows both, the source's
    "00" is believed, and a missing value is taken as lossy (the safe answer)."""
    if source_syntax not in _LOSSY_METHOD:
        return False
    return not (source_syntax in _LOSSLESS_OR_LOSSY and str(source_flag or "").strip() == "00")


IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["ldct-cli implementation"])
IMPLEMENTATION_VERSION_NAME = ("LDCT_" + __version__.replace(".", "_"))[:16]
TRANSFER_SYNTAX_CHOICES = ("explicit", "keep")


@dataclass(frozen=True)
class Derivation:
    """What made a derived series (denoising, simulated dose), written into every slice.

    ``settings`` hold everything that changes the output pixels; hashed, they seed the
    output UIDs, so the same input and settings give the same UIDs on every rerun and
    other settings give other UIDs. The processing time is not part of them.
    """

    label: str  # short: "[ldct LABEL]" in the Series Description, and the output folder name
    description: str  # Derivation Description (the clipped-pixel count is appended)
    settings: tuple[tuple[str, str], ...]
    code: tuple[str, str] | None = ("113087", "Smoothing")  # Derivation Code (CID 7203), if any
    transfer_syntax: str = "explicit"  # or "keep"
    series_number_offset: int = 1000
    processed_date: str = "19700101"  # DA, the same for every slice of a run
    processed_time: str = "000000"  # TM
    tool_version: str = __version__

    @classmethod
    def denoising(cls, *, model: str, weights_sha256: str, blend: float = 0.0,
                  precision: str = "fp32", **common) -> "Derivation":
        description = (f"Denoised by ldct-cli {common.get('tool_version', __version__)}: model {model}, "
                       f"weights sha256 {weights_sha256[:16]}, blend {blend:g} of the input, {precision}")
        settings = (("kind", "denoise"), ("model", model), ("weights_sha256", weights_sha256),
                    ("blend", repr(float(blend))), ("precision", precision))
        return cls(label=model, description=description, settings=settings, **common)

    @classmethod
    def filtering(cls, *, model: str, description: str, strength_hu: float | None, blend: float = 0.0,
                  **common) -> "Derivation":
        """A classical filter's derivation: no weights, its parameter instead."""
        text = (f"Denoised by ldct-cli {common.get('tool_version', __version__)}: {description}, "
                f"blend {blend:g} of the input")
        settings = (("kind", "denoise"), ("model", model), ("strength_hu", "auto" if strength_hu is None else repr(float(strength_hu))),
                    ("blend", repr(float(blend))))
        return cls(label=model, description=text, settings=settings, **common)

    def setting(self, key: str) -> str:
        return dict(self.settings)[key]

    @functools.cached_property
    def fingerprint(self) -> str:
        payload = json.dumps([list(self.settings), self.tool_version])
        return hashlib.sha256(payload.encode()).hexdigest()

    def uid(self, *sources: str) -> str:
        """A deterministic UID (<= 64 chars, digits and dots) for an output object."""
        return generate_uid(entropy_srcs=["ldct-cli", self.fingerprint, *sources])


IS_MAX = 2**31 - 1  # Integer String: a signed 32-bit value, at most 12 characters


def derived_series_number(number, offset: int) -> int:
    """The input's Series Number + ``offset``; when that leaves the IS range (or the input is
    not a number), ``offset`` + the input's last six digits, so it still tells series apart."""
    text = str(number).strip() if number not in (None, "") else "0"
    try:
        base = int(text)
    except ValueError:
        try:
            base = int(float(text))
        except (ValueError, OverflowError):
            base = 0
    result = base + offset
    if -IS_MAX - 1 <= result <= IS_MAX:
        return result
    return offset + abs(base) % 10**6


def output_transfer_syntax(source_syntax: str, mode: str) -> str:
    """Explicit VR Little Endian, or with ``keep`` a lossless input syntax pydicom can encode."""
    if mode == "keep":
        if source_syntax in _KEEP_AS_IS:
            return source_syntax
        if source_syntax in _KEEP_AS_JPEG_LS:
            return JPEGLSLossless
    return ExplicitVRLittleEndian


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The values Bits Stored allows for the Pixel Representation (not the dtype's range)."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def hu_to_stored(image_hu: np.ndarray, ds: Dataset) -> tuple[np.ndarray, int]:
    """round((HU - intercept) / slope), clipped to the Bits Stored range; and how many clipped."""
    slope, intercept = rescale_of(ds)
    values = np.array(image_hu, dtype=np.float32)  # a copy; float32 rounds 16-bit values exactly
    values -= np.float32(intercept)
    if slope != 1.0:
        values /= np.float32(slope)
    np.rint(values, out=values)
    lo, hi = stored_range(ds)
    n_clipped = int(np.count_nonzero(values < lo)) + int(np.count_nonzero(values > hi))
    dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16  # CT: Bits Allocated 16
    return np.clip(values, lo, hi).astype(dtype), n_clipped


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@dataclass(frozen=True)
class OutputUIDs:
    """UIDs of one output slice and the series it belongs to."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str  # the source's, or minted once per series when it is empty
    frame_of_reference_uid: str  # likewise

    @classmethod
    def for_slice(cls, ds: Dataset, *, derivation: Derivation, series_key: str, index: int,
                  unique_source_uid: bool = True) -> "OutputUIDs":
        """New SOP and Series UIDs from the source's (plus the derivation); study and frame
        of reference kept, or minted from the series key when the source left them empty
        (the same for every slice and every model, so the outputs still belong together).

        A source SOP Instance UID that is empty, or shared by several files of the series
        (``unique_source_uid=False``: it happens in real archives), is replaced in the
        entropy by the slice's place in the series, so output UIDs stay unique.
        """
        source_sop = sop_instance_of(ds)
        if not source_sop or not unique_source_uid:
            source_sop = f"{series_key}/{index}/{source_sop}"
        study = uid_of(ds, "StudyInstanceUID")
        frame = uid_of(ds, "FrameOfReferenceUID")
        return cls(
            sop_instance_uid=derivation.uid("instance", source_sop),
            series_instance_uid=derivation.uid("series", series_key),
            study_instance_uid=study or generate_uid(entropy_srcs=["ldct-cli", "study", series_key]),
            frame_of_reference_uid=frame or generate_uid(entropy_srcs=["ldct-cli", "frame", series_key]),
        )


def derive_dataset(ds: Dataset, stored: np.ndarray, *, uids: OutputUIDs, derivation: Derivation,
                   n_clipped: int) -> Dataset:
    """Turn the source slice ``ds`` (modified in place) into the derived instance holding ``stored``."""
    source_sop_class = sop_class_of(ds) or CT_IMAGE_STORAGE
    source_sop_uid = sop_instance_of(ds)
    source_series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    source_syntax = transfer_syntax_of(ds)

    ds.SOPClassUID = source_sop_class
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.StudyInstanceUID = uids.study_instance_uid
    if uids.frame_of_reference_uid:
        ds.FrameOfReferenceUID = uids.frame_of_reference_uid

    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", image_type[2] if len(image_type) > 2 else "AXIAL",
                    *image_type[3:]]  # vendors' further values kept
    ds.SeriesNumber = derived_series_number(ds.get("SeriesNumber"), derivation.series_number_offset)
    suffix = f" [ldct {derivation.label}]"
    description = str(ds.get("SeriesDescription", "") or "")
    ds.SeriesDescription = (description[: 64 - len(suffix)] + suffix).strip()
    ds.InstanceCreationDate = ds.ContentDate = derivation.processed_date
    ds.InstanceCreationTime = ds.ContentTime = derivation.processed_time

    if went_through_lossy_compression(source_syntax, ds.get("LossyImageCompression")):
        # The pixels went through lossy compression once: that fact is never reset.
        ds.LossyImageCompression = "01"
        methods = [str(m) for m in (ds.get("LossyImageCompressionMethod") or []) if m]
        if _LOSSY_METHOD[source_syntax] not in methods:
            ds.LossyImageCompressionMethod = methods + [_LOSSY_METHOD[source_syntax]]

    # The source's own derivation (e.g. its lossy compression) is history: append to it.
    ours = f"{derivation.description}; {n_clipped} pixels clipped to the Bits Stored range"
    earlier = str(ds.get("DerivationDescription", "") or "").strip()
    ds.DerivationDescription = (f"{earlier}; {ours}" if earlier else ours)[-1024:]
    if derivation.code is not None:
        ds.DerivationCodeSequence = Sequence(list(ds.get("DerivationCodeSequence") or [])
                                             + [_code(*derivation.code)])
    # References the source made (to raw data, say) are not ours to repeat.
    for keyword in ("SourceImageSequence", "ReferencedSeriesSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    if UID(source_sop_uid).is_valid:  # a malformed source UID cannot be referenced validly
        source = Dataset()
        source.ReferencedSOPClassUID = source_sop_class
        source.ReferencedSOPInstanceUID = source_sop_uid
        source.PurposeOfReferenceCodeSequence = Sequence(
            [_code("121322", "Source image for image processing operation")])
        ds.SourceImageSequence = Sequence([source])
        if UID(source_series_uid).is_valid:
            instance = Dataset()
            instance.ReferencedSOPClassUID = source_sop_class
            instance.ReferencedSOPInstanceUID = source_sop_uid
            series = Dataset()
            series.SeriesInstanceUID = source_series_uid
            series.ReferencedInstanceSequence = Sequence([instance])
            ds.ReferencedSeriesSequence = Sequence([series])
    equipment = Dataset()
    equipment.Manufacturer = "ldct-cli"
    equipment.SoftwareVersions = derivation.tool_version
    equipment.ContributionDateTime = derivation.processed_date + derivation.processed_time
    equipment.ContributionDescription = derivation.description[:64]
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code("109102", "Processing Equipment")])
    ds.ContributingEquipmentSequence = Sequence(list(ds.get("ContributingEquipmentSequence") or [])
                                                + [equipment])

    for keyword in ("IconImageSequence", "LargestPixelValueInSeries", "SmallestPixelValueInSeries"):
        if keyword in ds:
            delattr(ds, keyword)
    if "SmallestImagePixelValue" in ds or "LargestImagePixelValue" in ds:
        ds.SmallestImagePixelValue = int(stored.min())
        ds.LargestImagePixelValue = int(stored.max())

    _set_pixels(ds, stored, output_transfer_syntax(source_syntax, derivation.transfer_syntax))
    return ds


def new_file_meta(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    """Fresh Part 10 file meta for ``ds``: its SOP class and instance, ldct-cli as implementation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _set_pixels(ds: Dataset, stored: np.ndarray, syntax: str) -> None:
    """Store ``stored`` as the pixel data, encoded in ``syntax``, and build fresh file meta."""
    for tag in (0x7FE00001, 0x7FE00002):  # extended offset table (+ lengths) of the old payload
        if tag in ds:
            del ds[tag]
    ds.file_meta = new_file_meta(ds)
    little = stored.astype(stored.dtype.newbyteorder("<"), copy=False)
    if "PixelData" in ds:
        del ds["PixelData"]
    ds.add_new(0x7FE00010, "OW", little.tobytes())
    if syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        plugin = {RLELossless: "pylibjpeg", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg"}
        ds.compress(syntax, stored, encoding_plugin=plugin[syntax], generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax


class EncodeError(ValueError):
    """pydicom cannot encode a dataset: one of its elements is at fault, not the disk."""

    def __init__(self, element: str | None, detail: str):
        super().__init__(element, detail)
        self.element, self.detail = element, detail

    def __str__(self) -> str:
        return f"{self.element + ': ' if self.element else ''}cannot be encoded ({self.detail})"


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file, atomically (temp file, then rename).

    It is encoded in memory first, so an element that cannot be encoded raises
    ``EncodeError`` (the data's fault) and only the file system raises ``OSError``.
    """
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # pydicom wraps some in OSError: into memory, none is the disk's
        raise EncodeError(_unencodable_element(ds), brief(exc)) from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _unencodable_element(ds: Dataset) -> str | None:
    """The name of the first element of ``ds`` that pydicom cannot decode or encode, or None."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            if element.VR == "SQ":
                for item in element.value:
                    inner = _unencodable_element(item)
                    if inner is not None:
                        return f"{element_name(tag)} > {inner}"
            else:
                write_data_element(fp, element)
        except Exception:
            return element_name(tag)
    return None


@dataclass
class SliceJob:
    """One derived slice to write: the source header, the new stored values, where it goes."""

    header: Dataset  # the source slice without pixel data
    stored: np.ndarray  # output stored values (padding already restored)
    n_clipped: int
    uids: OutputUIDs
    derivation: Derivation
    path: Path
    source: Path  # the input file: named when its elements cannot be written


def write_slice(job: SliceJob) -> int:
    """Write one derived slice (atomically); return how many pixels were clipped.

    An element of the source that cannot be carried into the output is the source's fault:
    DicomError naming ``job.source``; OSError is the output's. Runs in worker processes.
    """
    with quiet_pydicom():
        try:
            ds = derive_dataset(job.header, job.stored, uids=job.uids, derivation=job.derivation,
                                n_clipped=job.n_clipped)
            write_dataset(ds, job.path)
        except EncodeError as exc:
            raise DicomError(job.source, _not_writable(exc.element, exc.detail)) from None
        except OSError:  # the disk's: it fails the series
            raise
        except Exception as exc:  # a source element the derivation cannot use (a wrong type, a bad VR)
            detail = f"{type(exc).__name__}: {brief(exc)}"
            raise DicomError(job.source, _not_writable(_unencodable_element(job.header), detail)) from None
    return job.n_clipped


def _not_writable(element: str | None, detail: str) -> str:
    return f"{element + ': ' if element else ''}cannot be written into a derived slice ({detail})"


@dataclass(frozen=True)
class CopyJob:
    """``--blend 1``: write a source slice's own pixels as a derived slice (no model)."""

    source: Path
    series_key: str
    index: int
    derivation: Derivation
    path: Path
    unique_source_uid: bool = True


def copy_slice(job: CopyJob) -> int:
    """Read, derive and write one slice entirely in a worker: no pixels cross processes."""
    header, stored = load_slice(job.source)
    with quiet_pydicom():
        uids = OutputUIDs.for_slice(header, derivation=job.derivation, series_key=job.series_key,
                                    index=job.index, unique_source_uid=job.unique_source_uid)
    return write_slice(SliceJob(header=header, stored=stored, n_clipped=0, uids=uids,
                                derivation=job.derivation, path=job.path, source=job.source))
