"""Write a new (original) CT series from an HU volume: what ``ldct phantom`` produces.

Realistic CT Image Storage headers: 12-bit unsigned stored values with Rescale Intercept
-1024 (HU -1024..3071), the image plane of an axial head-first-supine scan, and UIDs
derived deterministically from a key, so the same phantom is the same series every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ldct_cli._version import __version__
from ldct_cli.dicom.read import CT_IMAGE_STORAGE
from ldct_cli.dicom.write import new_file_meta, write_dataset

INTERCEPT = -1024.0
BITS_STORED = 12


@dataclass(frozen=True)
class NewSeries:
    """Identity and geometry of a series to create."""

    key: str  # seeds every UID: same key, same UIDs
    pixel_mm: float
    slice_mm: float
    description: str = "LDCT PHANTOM"
    series_number: int = 1
    patient_name: str = "LDCT^Phantom"
    patient_id: str = "LDCT-PHANTOM"
    study_description: str = "Synthetic abdomen (ldct phantom)"
    date: str = "20260101"
    time: str = "120000"
    kvp: str = "120"
    tube_current_ma: int = 200
    ctdi_vol_mgy: float = 10.0
    kernel: str = "STANDARD"


def _uid(series: NewSeries, *parts: str) -> str:
    return generate_uid(entropy_srcs=["ldct-cli new series", series.key, *parts])


def hu_to_new_stored(image_hu: np.ndarray) -> np.ndarray:
    """HU -> 12-bit unsigned stored values with intercept -1024 (clipped to -1024..3071 HU)."""
    return np.clip(np.rint(image_hu - INTERCEPT), 0, (1 << BITS_STORED) - 1).astype(np.uint16)


def new_slice_dataset(series: NewSeries, image_hu: np.ndarray, index: int) -> Dataset:
    """One complete CT Image Storage instance: slice ``index`` of the series, top first."""
    rows, columns = image_hu.shape
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = _uid(series, "instance", str(index))
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = series.date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series.time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ldct-cli"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.SoftwareVersions = __version__
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = series.study_description
    ds.SeriesDescription = series.description
    ds.PatientName = series.patient_name
    ds.PatientID = series.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = f"{series.slice_mm:g}"
    ds.KVP = series.kvp
    ds.ConvolutionKernel = series.kernel
    ds.PatientPosition = "HFS"
    ds.XRayTubeCurrent = series.tube_current_ma
    ds.CTDIvol = series.ctdi_vol_mgy
    ds.StudyInstanceUID = _uid(series, "study")
    ds.SeriesInstanceUID = _uid(series, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    # Head first, supine: slice 0 at the top (highest z), z decreasing towards the feet.
    z = -index * series.slice_mm
    half_width = (columns - 1) / 2 * series.pixel_mm
    half_height = (rows - 1) / 2 * series.pixel_mm
    ds.ImagePositionPatient = [f"{-half_width:.3f}", f"{-half_height:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(series, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [f"{series.pixel_mm:g}", f"{series.pixel_mm:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.add_new(0x7FE00010, "OW", hu_to_new_stored(image_hu).astype("<u2").tobytes())

    ds.file_meta = new_file_meta(ds)
    return ds


def write_new_series(volume_hu: np.ndarray, folder: Path, series: NewSeries) -> list[Path]:
    """Write ``volume_hu`` (n, H, W) as files ``folder/0001.dcm``... (each atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(volume_hu):
        path = folder / f"{index + 1:04d}.dcm"
        write_dataset(new_slice_dataset(series, image, index), path)
        paths.append(path)
    return paths
