"""Synthetic CT DICOM series for the test suite.

Everything here builds *real* DICOM Part 10 files with pydicom (plus GDCM for
JPEG Lossless), so the reader code under test sees what an archive would give it:
complete CT Image Storage instances in any of the supported transfer syntaxes,
tilted or unevenly spaced series, padded pixels, files without preamble, empty
UIDs, and a handful of broken or non-CT inputs.

Public API::

    SeriesSpec, phantom_hu, stored_values, write_series, write_study,
    write_mixed_folder, write_non_ct, write_non_image, write_truncated,
    write_undecodable, write_not_dicom, SUPPORTED_TRANSFER_SYNTAXES
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "BASIC_TEXT_SR_STORAGE",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SeriesSpec",
    "phantom_hu",
    "stored_values",
    "write_series",
    "write_study",
    "write_mixed_folder",
    "write_non_ct",
    "write_non_image",
    "write_truncated",
    "write_undecodable",
    "write_not_dicom",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

#: Transfer syntaxes write_series can produce (all round-trip bit-exact).
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)

# pydicom encoder plugin used for each compressed syntax that pydicom can encode.
_PYDICOM_ENCODERS = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}

_IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1478.1"  # arbitrary, test-only
_IMPLEMENTATION_VERSION = "LDCT_SYNTH_1"
_PRIVATE_GROUP = 0x0009
_PRIVATE_CREATOR = "LDCT TEST"


@dataclass(frozen=True)
class SeriesSpec:
    """Parameters of one synthetic CT series (see module docstring)."""

    rows: int = 64
    columns: int = 64
    n_slices: int = 4
    signed: bool = True
    bits_stored: int = 12
    intercept: float | None = -1024.0
    slope: float = 1.0
    pixel_padding_value: int | None = None
    transfer_syntax: str = ExplicitVRLittleEndian
    gantry_tilt_deg: float = 0.0
    slice_positions_mm: tuple[float, ...] | None = None
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7)
    series_description: str = "SYNTH ABDOMEN"
    series_number: int = 3
    modality: str = "CT"
    sop_class_uid: str = CT_IMAGE_STORAGE
    no_preamble: bool = False
    empty_uids: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 12 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be 12..16, got {self.bits_stored}")
        if self.rows < 1 or self.columns < 1 or self.n_slices < 1:
            raise ValueError("rows, columns and n_slices must be >= 1")
        if self.slope == 0:
            raise ValueError("slope must be non-zero")
        if self.slice_positions_mm is not None and len(self.slice_positions_mm) != self.n_slices:
            raise ValueError("slice_positions_mm must have n_slices entries")
        if self.transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            raise ValueError(f"unsupported transfer syntax {self.transfer_syntax}")
        if self.no_preamble and self.transfer_syntax not in (
            ImplicitVRLittleEndian,
            ExplicitVRLittleEndian,
        ):
            raise ValueError("no_preamble files are always implicit VR little endian")
        if self.pixel_padding_value is not None:
            lo, hi = self.stored_range
            if not lo <= self.pixel_padding_value <= hi:
                raise ValueError(
                    f"pixel_padding_value {self.pixel_padding_value} outside the "
                    f"stored range [{lo}, {hi}]"
                )

    @property
    def stored_range(self) -> tuple[int, int]:
        """Inclusive range of stored values allowed by bits_stored and signedness."""
        b = self.bits_stored
        if self.signed:
            return -(1 << (b - 1)), (1 << (b - 1)) - 1
        return 0, (1 << b) - 1

    @property
    def z_positions(self) -> tuple[float, ...]:
        """Slice z positions in mm (explicit, or 0, 2.5, 5, ...)."""
        if self.slice_positions_mm is not None:
            return tuple(float(z) for z in self.slice_positions_mm)
        return tuple(2.5 * i for i in range(self.n_slices))

    @property
    def slice_thickness_mm(self) -> float:
        """Nominal thickness: the smallest gap between slices (2.5 for one slice)."""
        zs = sorted(self.z_positions)
        gaps = [b - a for a, b in zip(zs, zs[1:]) if b - a > 0]
        return round(min(gaps), 4) if gaps else 2.5


def phantom_hu(rows: int, columns: int, *, z: float = 0.0, seed: int = 0) -> np.ndarray:
    """Return a (rows, columns) float32 HU image of an abdomen-like phantom.

    Air outside an elliptical body, a fat rim, soft tissue, a liver-like organ,
    a bright bone disc and a lung-like low region whose sizes vary smoothly with
    ``z`` (mm), plus seeded Gaussian noise (sigma 20 HU).
    """
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    phase = z / 40.0

    img = np.full((rows, columns), -1000.0, dtype=np.float32)
    body = (x / 0.88) ** 2 + (y / 0.70) ** 2
    img[body <= 1.0] = -100.0  # subcutaneous fat rim
    img[body <= 0.80] = 40.0  # soft tissue

    # liver-like organ, slightly denser, size oscillating with z
    r_liver = 0.30 + 0.04 * math.sin(phase)
    liver = ((x + 0.30) / r_liver) ** 2 + ((y + 0.05) / (0.8 * r_liver)) ** 2
    img[liver <= 1.0] = 65.0

    # lung-like low-density region (bases), shrinking/growing with z
    r_lung = 0.16 + 0.05 * math.cos(phase)
    lung = ((x - 0.35) / r_lung) ** 2 + ((y + 0.30) / (0.7 * r_lung)) ** 2
    img[lung <= 1.0] = -800.0

    # vertebral body: bright disc, posterior
    r_bone = 0.10 + 0.015 * math.sin(2.0 * phase)
    bone = (x / r_bone) ** 2 + ((y - 0.45) / r_bone) ** 2
    img[bone <= 1.0] = 700.0

    seed_seq = (abs(int(seed)), abs(int(round(z * 1000.0))), int(z < 0), int(seed < 0))
    rng = np.random.default_rng(seed_seq)
    img += rng.standard_normal((rows, columns), dtype=np.float32) * np.float32(20.0)
    return img


def stored_values(hu: np.ndarray, spec: SeriesSpec) -> np.ndarray:
    """Convert HU to clipped stored values (int16 if signed, uint16 if not)."""
    intercept = 0.0 if spec.intercept is None else float(spec.intercept)
    slope = 1.0 if spec.intercept is None else float(spec.slope)
    lo, hi = spec.stored_range
    values = np.clip(np.rint((hu.astype(np.float64) - intercept) / slope), lo, hi)
    return values.astype(np.int16 if spec.signed else np.uint16)


def _padding_mask(rows: int, columns: int) -> np.ndarray:
    """True outside the inscribed circle (the scanner's reconstruction FOV)."""
    yy = np.arange(rows, dtype=np.float32)[:, None] - (rows - 1) / 2.0
    xx = np.arange(columns, dtype=np.float32)[None, :] - (columns - 1) / 2.0
    radius = min(rows, columns) / 2.0
    return (xx * xx + yy * yy) > radius * radius


def _ds_str(value: float) -> str:
    """Format a float for a DS element (max 16 chars)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # fixed up by pydicom on write
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _save(ds: Dataset, path: Path, *, no_preamble: bool = False) -> None:
    """Write ``ds`` using the transfer syntax in its file_meta (or bare implicit LE)."""
    if no_preamble:
        # Old ACR-NEMA style: no preamble, no 'DICM', no group 0002.
        if hasattr(ds, "file_meta"):
            del ds.file_meta
        ds.preamble = None
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
        return
    ds.preamble = b"\x00" * 128
    # enforce_file_format=False so that empty SOP Instance UIDs survive; the
    # file meta built by _file_meta is complete anyway.
    ds.save_as(path, enforce_file_format=False)


def _encode_jpeg_lossless_sv1(ds: Dataset, arr: np.ndarray) -> bytes:
    """Encode ``arr`` as JPEG Lossless SV1 with GDCM; return encapsulated PixelData."""
    import gdcm  # python-gdcm

    # GDCM only encodes the pixels; everything else stays in the pydicom dataset.
    tmp_ds = Dataset()
    tmp_ds.SOPClassUID = CT_IMAGE_STORAGE
    tmp_ds.SOPInstanceUID = generate_uid()
    for keyword in (
        "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    ):
        setattr(tmp_ds, keyword, ds[keyword].value)
    tmp_ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    tmp_ds["PixelData"].VR = "OW"
    tmp_ds.file_meta = _file_meta(
        CT_IMAGE_STORAGE, tmp_ds.SOPInstanceUID, ExplicitVRLittleEndian
    )
    with tempfile.TemporaryDirectory(prefix="ldct_synth_") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        _save(tmp_ds, src)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        if not reader.Read():
            raise RuntimeError("GDCM could not read the temporary file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG Lossless SV1")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("GDCM could not write the JPEG Lossless file")
        encoded = pydicom.dcmread(dst)
        if encoded.file_meta.TransferSyntaxUID != JPEGLosslessSV1:
            raise RuntimeError(
                f"GDCM wrote {encoded.file_meta.TransferSyntaxUID}, not JPEG Lossless SV1"
            )
        return bytes(encoded.PixelData)


def _apply_transfer_syntax(ds: Dataset, arr: np.ndarray, transfer_syntax: str) -> None:
    """Set PixelData (and file_meta TransferSyntaxUID) for ``transfer_syntax``."""
    ts = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ts
    if ts in _PYDICOM_ENCODERS:
        # generate_instance_uid=False: compress() would otherwise replace the
        # SOP Instance UID (and break empty_uids / the file meta).
        ds.compress(
            ts, arr, encoding_plugin=_PYDICOM_ENCODERS[ts], generate_instance_uid=False
        )
        return
    if ts == JPEGLosslessSV1:
        ds.PixelData = _encode_jpeg_lossless_sv1(ds, arr)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        return
    # Native: pydicom writes OW bytes verbatim, so big endian must be swapped here.
    byte_order = ">" if ts == ExplicitVRBigEndian else "<"
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(byte_order)).tobytes()
    ds["PixelData"].VR = "OW"


def _build_ct_dataset(
    spec: SeriesSpec,
    index: int,
    z: float,
    stored: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
) -> Dataset:
    sop_uid = "" if spec.empty_uids else generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(spec.sop_class_uid, sop_uid, spec.transfer_syntax)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240115"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101712"
    ds.AcquisitionTime = f"1017{12 + index % 40:02d}.{index:06d}"[:13]
    ds.ContentTime = ds.AcquisitionTime
    ds.AccessionNumber = "ACC0001"
    ds.Modality = spec.modality
    ds.Manufacturer = "ldct-tests"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH01"
    ds.StudyDescription = "SYNTH CT STUDY"
    ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = "Synth CT"

    block = ds.private_block(_PRIVATE_GROUP, _PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", "synthetic phantom")
    block.add_new(0x11, "US", 42)

    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"

    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = _ds_str(spec.slice_thickness_mm)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "synth-1"
    ds.ReconstructionDiameter = _ds_str(spec.pixel_spacing_mm[1] * spec.columns)
    ds.GantryDetectorTilt = _ds_str(spec.gantry_tilt_deg)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 60
    ds.Exposure = 30
    ds.FilterType = "BODY FILTER"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.CTDIvol = 2.5

    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1

    row_mm, col_mm = spec.pixel_spacing_mm
    tilt = math.radians(spec.gantry_tilt_deg)
    x0 = -col_mm * (spec.columns - 1) / 2.0
    y0 = -row_mm * (spec.rows - 1) / 2.0 * math.cos(tilt)
    ds.ImagePositionPatient = [_ds_str(x0), _ds_str(y0), _ds_str(z)]
    ds.ImageOrientationPatient = [
        "1", "0", "0", "0", _ds_str(round(math.cos(tilt), 6)), _ds_str(round(math.sin(tilt), 6)),
    ]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds_str(z)

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds_str(row_mm), _ds_str(col_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    if spec.pixel_padding_value is not None:
        ds.add_new(0x00280120, "SS" if spec.signed else "US", int(spec.pixel_padding_value))
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    if spec.intercept is not None:
        ds.RescaleIntercept = _ds_str(spec.intercept)
        ds.RescaleSlope = _ds_str(spec.slope)
        ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"

    _apply_transfer_syntax(ds, stored, spec.transfer_syntax)
    return ds


def write_series(
    folder: Path,
    spec: SeriesSpec = SeriesSpec(),
    *,
    study_uid: str | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """Write ``spec.n_slices`` CT files ``folder/<prefix>0001.dcm``...; return them in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.empty_uids:
        study_uid = series_uid = ""
    else:
        study_uid = study_uid if study_uid is not None else generate_uid()
        series_uid = generate_uid()
    frame_uid = generate_uid()
    padding = _padding_mask(spec.rows, spec.columns) if spec.pixel_padding_value is not None else None

    paths: list[Path] = []
    for i, z in enumerate(spec.z_positions):
        stored = stored_values(phantom_hu(spec.rows, spec.columns, z=z, seed=spec.seed), spec)
        if padding is not None:
            stored[padding] = spec.pixel_padding_value
        ds = _build_ct_dataset(
            spec, i, z, stored, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid
        )
        path = folder / f"{file_prefix}{i + 1:04d}.dcm"
        _save(ds, path, no_preamble=spec.no_preamble)
        paths.append(path)
    return paths


def write_study(root: Path, specs: list[SeriesSpec]) -> dict[str, list[Path]]:
    """Write several series of one study into ``root/series_<k>/`` (k = 1-based position).

    Returns series_description -> paths; descriptions must be unique.
    """
    _check_unique_descriptions(specs)
    study_uid = generate_uid()
    return {
        spec.series_description: write_series(
            Path(root) / f"series_{k}", spec, study_uid=study_uid
        )
        for k, spec in enumerate(specs, start=1)
    }


def write_mixed_folder(folder: Path, specs: list[SeriesSpec]) -> dict[str, list[Path]]:
    """Write several series of one study into ONE folder (prefixes ``S1_IM``, ``S2_IM``...)."""
    _check_unique_descriptions(specs)
    study_uid = generate_uid()
    return {
        spec.series_description: write_series(
            Path(folder), spec, study_uid=study_uid, file_prefix=f"S{k}_IM"
        )
        for k, spec in enumerate(specs, start=1)
    }


def _check_unique_descriptions(specs: list[SeriesSpec]) -> None:
    names = [s.series_description for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"series descriptions must be unique, got {names}")


def _base_patient_study(ds: Dataset, modality: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "ldct-tests"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1


def write_non_ct(path: Path) -> Path:
    """Write a small valid MR Image Storage file (modality MR, 16x16 pixels)."""
    path = Path(path)
    ds = Dataset()
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    _base_patient_study(ds, "MR")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SeriesDescription = "SYNTH MR"
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["1", "1"]
    ds.SliceThickness = "5"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = "10"
    ds.RepetitionTime = "500"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype="<u2") * 8).tobytes()
    ds["PixelData"].VR = "OW"
    _save(ds, path)
    return path


def write_non_image(path: Path) -> Path:
    """Write a minimal Basic Text SR (a valid DICOM object without pixel data)."""
    path = Path(path)
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    _base_patient_study(ds, "SR")
    ds.SeriesDescription = "SYNTH REPORT"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "18782-3"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Radiology Study observation (narrative)"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue = "121071"
    finding.CodingSchemeDesignator = "DCM"
    finding.CodeMeaning = "Finding"
    item.ConceptNameCodeSequence = [finding]
    item.TextValue = "Synthetic report: no findings."
    ds.ContentSequence = [item]
    _save(ds, path)
    return path


def write_truncated(path: Path, source: Path) -> Path:
    """Write the first half of the bytes of ``source`` to ``path``."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_undecodable(
    path: Path,
    source: Path,
    *,
    kind: Literal["garbage_rle", "unsupported_syntax"] = "garbage_rle",
) -> Path:
    """Write a copy of native CT ``source`` whose header is valid but whose pixels cannot decode.

    ``garbage_rle``: Transfer Syntax RLE Lossless with garbage encapsulated bytes.
    ``unsupported_syntax``: Transfer Syntax MPEG2 (no decoder) over the native bytes.
    """
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError("source must use a native (uncompressed) transfer syntax")
    if kind == "garbage_rle":
        # RLE header claiming 2 segments at offsets far beyond the fragment end.
        header = np.zeros(16, dtype="<u4")
        header[0], header[1], header[2] = 2, 0x7FFF0000, 0x7FFF1000
        garbage = header.tobytes() + bytes(range(256)) * 4
        pixel_data = encapsulate([garbage])
        ds.file_meta.TransferSyntaxUID = RLELossless
    elif kind == "unsupported_syntax":
        pixel_data = encapsulate([bytes(ds.PixelData)])
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 MP@ML
    else:
        raise ValueError(f"unknown kind {kind!r}")
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = Path(path)
    _save(ds, path)
    return path


def write_not_dicom(path: Path) -> Path:
    """Write a plain text file (not DICOM) to ``path``."""
    path = Path(path)
    path.write_text("This is not a DICOM file.\nJust some notes about the scan.\n")
    return path
