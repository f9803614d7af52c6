"""Checks for the synthetic DICOM builders in tests/synth.py."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError

try:
    from tests.synth import (
        CT_IMAGE_STORAGE,
        MR_IMAGE_STORAGE,
        SUPPORTED_TRANSFER_SYNTAXES,
        SeriesSpec,
        phantom_hu,
        stored_values,
        write_mixed_folder,
        write_non_ct,
        write_non_image,
        write_not_dicom,
        write_series,
        write_study,
        write_truncated,
        write_undecodable,
    )
except ModuleNotFoundError:  # run from somewhere the repo root is not importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.synth import (  # noqa: E402
        CT_IMAGE_STORAGE,
        MR_IMAGE_STORAGE,
        SUPPORTED_TRANSFER_SYNTAXES,
        SeriesSpec,
        phantom_hu,
        stored_values,
        write_mixed_folder,
        write_non_ct,
        write_non_image,
        write_not_dicom,
        write_series,
        write_study,
        write_truncated,
        write_undecodable,
    )

REQUIRED_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate",
    "AcquisitionTime", "ContentDate", "ContentTime", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "Manufacturer", "ImageType", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SliceLocation", "KVP", "XRayTubeCurrent", "ExposureTime", "CTDIvol",
    "ConvolutionKernel", "PatientPosition", "SamplesPerPixel", "PhotometricInterpretation",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
    "BurnedInAnnotation", "GantryDetectorTilt", "PixelData",
)


def expected_stored(spec: SeriesSpec, z: float) -> np.ndarray:
    return stored_values(phantom_hu(spec.rows, spec.columns, z=z, seed=spec.seed), spec)


# ---------------------------------------------------------------- phantom


def test_phantom_shapes_levels_and_seed() -> None:
    img = phantom_hu(128, 128, z=0.0, seed=1)
    assert img.dtype == np.float32 and img.shape == (128, 128)
    assert np.array_equal(img, phantom_hu(128, 128, z=0.0, seed=1))
    assert not np.array_equal(img, phantom_hu(128, 128, z=0.0, seed=2))
    assert not np.array_equal(img, phantom_hu(128, 128, z=30.0, seed=1))
    assert abs(float(np.median(img[:4, :4])) + 1000) < 15  # air corner
    assert 15 < float(img[:4, :].std()) < 25  # noise sigma about 20 HU
    assert abs(float(np.median(img[64, 60:68])) - 40) < 30  # soft tissue at the centre
    assert float(img.max()) > 600 and float(img.min()) < -950
    assert (img < -700).sum() > (img < -950).sum()  # a lung region exists
    assert phantom_hu(512, 640).shape == (512, 640)
    assert phantom_hu(7, 5, z=-3.3, seed=4).shape == (7, 5)


# ---------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES)
@pytest.mark.parametrize(
    "signed, bits_stored, intercept",
    [(True, 12, 0.0), (False, 16, -1024.0)],
    ids=["signed12-icpt0", "unsigned16-icpt1024"],
)
def test_transfer_syntax_round_trip(
    tmp_path: Path, transfer_syntax: str, signed: bool, bits_stored: int, intercept: float
) -> None:
    spec = SeriesSpec(
        n_slices=2,
        transfer_syntax=transfer_syntax,
        signed=signed,
        bits_stored=bits_stored,
        intercept=intercept,
    )
    paths = write_series(tmp_path, spec)
    assert [p.name for p in paths] == ["IM0001.dcm", "IM0002.dcm"]
    for path, z in zip(paths, spec.z_positions):
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        # compress() must not have replaced the SOP Instance UID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        arr = ds.pixel_array
        expected = expected_stored(spec, z)
        assert arr.shape == expected.shape
        assert np.array_equal(arr, expected)
        if signed:
            assert (expected < 0).any()  # negative stored values really exercised


def test_big_endian_bytes_are_swapped(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=1, transfer_syntax="1.2.840.10008.1.2.2")
    ds = pydicom.dcmread(write_series(tmp_path, spec)[0])
    expected = expected_stored(spec, 0.0)
    assert bytes(ds.PixelData) == expected.astype(">i2").tobytes()
    assert ds[0x00091011].value == 42  # private US element also big endian


# ---------------------------------------------------------------- rescale / signedness


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("intercept", [-1024.0, -1000.0, 0.0])
@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_rescale_and_pixel_representation(
    tmp_path: Path, signed: bool, intercept: float, slope: float
) -> None:
    spec = SeriesSpec(n_slices=1, signed=signed, intercept=intercept, slope=slope)
    ds = pydicom.dcmread(write_series(tmp_path, spec)[0])
    assert ds.PixelRepresentation == int(signed)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert float(ds.RescaleIntercept) == intercept
    assert float(ds.RescaleSlope) == slope
    assert ds.RescaleType == "HU"
    arr = ds.pixel_array
    lo, hi = spec.stored_range
    assert arr.dtype == (np.int16 if signed else np.uint16)
    assert lo <= int(arr.min()) and int(arr.max()) <= hi
    assert np.array_equal(arr, expected_stored(spec, 0.0))
    # Where not clipped, the stored values map back to the phantom within rounding.
    hu = phantom_hu(spec.rows, spec.columns)
    back = arr.astype(np.float64) * slope + intercept
    inside = (arr > lo) & (arr < hi)
    # unsigned with intercept 0 cannot hold negative HU: those pixels clip to 0
    assert inside.mean() > (0.25 if (not signed and intercept == 0.0) else 0.5)
    assert np.abs(back[inside] - hu[inside]).max() <= slope / 2 + 1e-3


def test_unsigned_minus_1024_is_representable(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=1, signed=False, intercept=-1024.0)
    ds = pydicom.dcmread(write_series(tmp_path, spec)[0])
    # air (-1000 HU +- noise) lands near stored 24, clipped at 0 at worst
    assert int(ds.pixel_array.min()) >= 0
    assert abs(float(np.median(ds.pixel_array[:4, :4])) - 24) < 15


def test_no_rescale_tags_when_intercept_none(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=1, intercept=None)
    ds = pydicom.dcmread(write_series(tmp_path, spec)[0])
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
        assert keyword not in ds
    assert np.array_equal(ds.pixel_array, np.rint(phantom_hu(64, 64)).astype(np.int16))


@pytest.mark.parametrize("signed, value, vr", [(True, -2000, "SS"), (False, 0, "US")])
def test_pixel_padding_value(tmp_path: Path, signed: bool, value: int, vr: str) -> None:
    spec = SeriesSpec(n_slices=1, signed=signed, intercept=-1024.0, pixel_padding_value=value)
    path = write_series(tmp_path, spec)[0]
    ds = pydicom.dcmread(path)
    assert ds[0x00280120].VR == vr
    assert ds.PixelPaddingValue == value
    arr = ds.pixel_array
    assert (arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]) == (value,) * 4
    assert (arr[24:40, 24:40] != value).all()
    assert 0.1 < (arr == value).mean() < 0.4  # roughly 1 - pi/4 outside the circle
    # the VR also survives implicit VR (dictionary lookup gives US or SS)
    imp = write_series(tmp_path / "imp", replace(spec, transfer_syntax="1.2.840.10008.1.2"))
    assert pydicom.dcmread(imp[0]).PixelPaddingValue == value


def test_padding_value_outside_stored_range_rejected() -> None:
    with pytest.raises(ValueError):
        SeriesSpec(signed=False, pixel_padding_value=-1)


# ---------------------------------------------------------------- attributes and geometry


def test_required_attributes_and_uids(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=3)
    paths = write_series(tmp_path, spec, study_uid="1.2.3.4.5")
    datasets = [pydicom.dcmread(p) for p in paths]
    for i, ds in enumerate(datasets):
        missing = [k for k in REQUIRED_KEYWORDS if k not in ds]
        assert not missing
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT"
        assert ds.InstanceNumber == i + 1
        assert str(ds.PatientName) == "Synthetic^Patient"
        assert ds.PatientID == "SYN0001" and ds.PatientBirthDate == "19700101"
        assert ds.Manufacturer == "ldct-tests"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.KVP == 120 and ds.PatientPosition == "HFS"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert (ds.WindowCenter, ds.WindowWidth) == (40, 400)
        assert ds.ReferringPhysicianName == "" and ds.BurnedInAnnotation == "NO"
        assert ds.SeriesDescription == "SYNTH ABDOMEN" and ds.SeriesNumber == 3
        block = ds.private_block(0x0009, "LDCT TEST")
        assert block[0x10].value == "synthetic phantom" and block[0x11].value == 42
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4.5"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3


def test_default_geometry(tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path, SeriesSpec(n_slices=3))]
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [0.0, 2.5, 5.0]
    assert [float(ds.SliceLocation) for ds in datasets] == [0.0, 2.5, 5.0]
    assert float(datasets[0].SliceThickness) == 2.5
    assert [float(v) for v in datasets[0].PixelSpacing] == [0.7, 0.7]
    assert [float(v) for v in datasets[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(datasets[0].GantryDetectorTilt) == 0.0


def test_tilt_and_uneven_spacing(tmp_path: Path) -> None:
    positions = (-10.0, -7.5, -2.5, 0.0, 1.25)
    spec = SeriesSpec(
        n_slices=5, gantry_tilt_deg=15.0, slice_positions_mm=positions, pixel_spacing_mm=(0.8, 0.6)
    )
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path, spec)]
    t = math.radians(15.0)
    for ds, z in zip(datasets, positions):
        assert float(ds.GantryDetectorTilt) == 15.0
        iop = [float(v) for v in ds.ImageOrientationPatient]
        assert np.allclose(iop, [1, 0, 0, 0, math.cos(t), math.sin(t)], atol=1e-6)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        assert ipp[2] == pytest.approx(z) and float(ds.SliceLocation) == pytest.approx(z)
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.6]
    # x0/y0 stay fixed: the series steps along z while the plane is tilted
    assert len({tuple(float(v) for v in ds.ImagePositionPatient[:2]) for ds in datasets}) == 1
    assert float(datasets[0].SliceThickness) == 1.25  # smallest gap


@pytest.mark.parametrize("rows, columns, n_slices", [(256, 256, 2), (512, 640, 1), (1024, 1024, 1)])
def test_non_default_sizes(tmp_path: Path, rows: int, columns: int, n_slices: int) -> None:
    spec = SeriesSpec(rows=rows, columns=columns, n_slices=n_slices)
    paths = write_series(tmp_path, spec)
    ds = pydicom.dcmread(paths[-1])
    assert (ds.Rows, ds.Columns) == (rows, columns)
    assert ds.pixel_array.shape == (rows, columns)
    assert np.array_equal(ds.pixel_array, expected_stored(spec, spec.z_positions[-1]))


# ---------------------------------------------------------------- odd files


def test_no_preamble(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=1, no_preamble=True)
    path = write_series(tmp_path, spec)[0]
    raw = path.read_bytes()
    assert raw[128:132] != b"DICM"
    assert raw[:2] == b"\x08\x00"  # starts directly with a (0008,xxxx) tag
    assert b"\x02\x00\x10\x00" not in raw[:300]  # no (0002,0010)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(path)
    ds = pydicom.dcmread(path, force=True)
    assert ds.SOPClassUID == CT_IMAGE_STORAGE
    assert ds.original_encoding == (True, True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", FileMetaDataset())
    # pydicom 3 needs a Transfer Syntax UID to decode the pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    assert np.array_equal(ds.pixel_array, expected_stored(spec, 0.0))


def test_no_preamble_rejects_compressed_syntax() -> None:
    with pytest.raises(ValueError):
        SeriesSpec(no_preamble=True, transfer_syntax="1.2.840.10008.1.2.5")


def test_empty_uids(tmp_path: Path) -> None:
    paths = write_series(tmp_path, SeriesSpec(n_slices=2, empty_uids=True))
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            assert keyword in ds
            assert ds[keyword].value == ""
        assert ds.FrameOfReferenceUID != ""
        assert ds.pixel_array.shape == (64, 64)


def test_truncated(tmp_path: Path) -> None:
    source = write_series(tmp_path / "src", SeriesSpec(n_slices=1))[0]
    path = write_truncated(tmp_path / "trunc.dcm", source)
    assert path.stat().st_size == source.stat().st_size // 2
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert header.Rows == 64 and header.Modality == "CT"
    with pytest.raises(Exception):
        pydicom.dcmread(path).pixel_array


@pytest.mark.parametrize("kind", ["garbage_rle", "unsupported_syntax"])
def test_undecodable(tmp_path: Path, kind: str) -> None:
    source = write_series(tmp_path / "src", SeriesSpec(n_slices=1))[0]
    path = write_undecodable(tmp_path / "bad.dcm", source, kind=kind)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.Rows == 64
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    with pytest.raises(Exception):
        ds.pixel_array


def test_non_ct_non_image_not_dicom(tmp_path: Path) -> None:
    mr = pydicom.dcmread(write_non_ct(tmp_path / "mr.dcm"))
    assert mr.Modality == "MR" and mr.SOPClassUID == MR_IMAGE_STORAGE
    assert mr.pixel_array.shape == (16, 16)
    sr = pydicom.dcmread(write_non_image(tmp_path / "sr.dcm"))
    assert "PixelData" not in sr and sr.Modality == "SR"
    assert sr.SOPClassUID.is_valid and sr.StudyInstanceUID
    text = write_not_dicom(tmp_path / "notes.txt")
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(text)


# ---------------------------------------------------------------- studies


def test_write_study_and_mixed_folder(tmp_path: Path) -> None:
    specs = [
        SeriesSpec(n_slices=2, series_description="A", series_number=2),
        SeriesSpec(n_slices=3, series_description="B", series_number=5, signed=False),
    ]
    study = write_study(tmp_path / "study", specs)
    assert set(study) == {"A", "B"}
    assert [p.parent.name for p in study["A"]] == ["series_1"] * 2
    assert [p.parent.name for p in study["B"]] == ["series_2"] * 3
    datasets = [pydicom.dcmread(p) for paths in study.values() for p in paths]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 2

    mixed = write_mixed_folder(tmp_path / "mixed", specs)
    files = sorted((tmp_path / "mixed").iterdir())
    assert len(files) == 5 and {p.parent for p in files} == {tmp_path / "mixed"}
    assert [p.name for p in mixed["B"]] == ["S2_IM0001.dcm", "S2_IM0002.dcm", "S2_IM0003.dcm"]
    datasets = [pydicom.dcmread(p) for p in files]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert {ds.SeriesDescription for ds in datasets} == {"A", "B"}

    with pytest.raises(ValueError):
        write_study(tmp_path / "dup", [SeriesSpec(), SeriesSpec()])
