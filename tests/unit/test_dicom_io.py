"""Reading CT series (discovery, sorting, HU, padding) and the stored-value arithmetic of writing."""

from __future__ import annotations


import numpy as np
import pydicom
import pytest

from ldct_cli.dicom.read import discover, load_slice, padding_mask, rescale_of, sort_slices, stored_to_hu
from ldct_cli.dicom.write import Derivation, hu_to_stored, output_transfer_syntax, stored_range
from ldct_cli.errors import DicomError
from tests.synth import SeriesSpec, write_mixed_folder, write_series


def _header(**attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("signed, bits, slope, intercept", [
    (True, 12, 1.0, -1024.0), (False, 12, 1.0, -1000.0), (False, 16, 1.0, 0.0), (True, 16, 1.0, 0.0),
    (True, 14, 0.5, -1024.0), (False, 16, 0.25, -8192.0), (True, 16, 1.7, -3.3),
])
def test_stored_to_hu_and_back_is_exact_on_every_stored_value(signed, bits, slope, intercept):
    ds = _header(BitsStored=bits, BitsAllocated=16, PixelRepresentation=int(signed),
                 RescaleSlope=slope, RescaleIntercept=intercept)
    lo, hi = stored_range(ds)
    stored = np.arange(lo, hi + 1, dtype=np.int32).astype(np.int16 if signed else np.uint16)
    hu = stored_to_hu(stored, *rescale_of(ds))
    back, n_clipped = hu_to_stored(hu, ds)
    assert n_clipped == 0 and back.dtype == stored.dtype
    assert np.array_equal(back, stored)


def test_hu_to_stored_rounds_and_clips_to_bits_stored_not_dtype():
    ds = _header(BitsStored=12, BitsAllocated=16, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1024)
    hu = np.array([[-1024.4, -1023.6, 0.5, 1.49, 5000.0, -4000.0]], dtype=np.float32)
    stored, n_clipped = hu_to_stored(hu, ds)
    # rounded, never truncated (np.rint: halves to even); clipped at the 12-bit signed range
    assert stored.tolist() == [[0, 0, 1024, 1025, 2047, -2048]]
    assert n_clipped == 2


def test_missing_rescale_means_identity():
    assert rescale_of(_header()) == (1.0, 0.0)


def test_padding_mask_uses_padding_value_range_and_far_below_air():
    stored = np.array([[-2000, -1500, 0, 100]], dtype=np.int16)
    ds = _header(PixelPaddingValue=-1500)
    hu = stored.astype(np.float32)  # intercept 0
    assert padding_mask(ds, stored, hu).tolist() == [[True, True, False, False]]
    stored = np.array([[-2000, -1100, 0, 100, 200]], dtype=np.int16)
    hu = stored.astype(np.float32)
    ds = _header(PixelPaddingValue=0, PixelPaddingRangeLimit=100)
    assert padding_mask(ds, stored, hu).tolist() == [[True, False, True, True, False]]


def test_sorting_follows_the_slice_normal_not_file_order_or_instance_number(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(n_slices=4, gantry_tilt_deg=20.0,
                                              slice_positions_mm=(7.0, 0.0, 12.0, 1.5)))
    for path, number in zip(paths, (1, 2, 3, 4)):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 5 - number  # misleading instance numbers
        ds.save_as(path)
    [series] = discover(tmp_path).series
    z = [pydicom.dcmread(s.path).ImagePositionPatient[2] for s in series.slices]
    assert z == sorted(z) and len(z) == 4


def test_sorting_falls_back_to_instance_number(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(n_slices=3))
    for path, number in zip(paths, (3, 1, 2)):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.InstanceNumber = number
        ds.save_as(path)
    [series] = discover(tmp_path).series
    assert [s.instance_number for s in series.slices] == [1, 2, 3]
    assert sort_slices(list(reversed(series.slices))) == series.slices


def test_files_without_series_uid_group_by_folder_and_geometry(tmp_path):
    write_series(tmp_path / "a", SeriesSpec(n_slices=2, empty_uids=True))
    write_series(tmp_path / "b", SeriesSpec(n_slices=3, empty_uids=True))
    series = discover(tmp_path).series
    assert sorted(s.n_slices for s in series) == [2, 3]
    assert all(s.key.startswith("nouid-") and s.series_uid == "" for s in series)


def test_several_series_in_one_folder_are_separated(tmp_path):
    write_mixed_folder(tmp_path, [SeriesSpec(series_description="A", n_slices=2),
                                  SeriesSpec(series_description="B", n_slices=3)])
    found = discover(tmp_path)
    assert sorted((s.description, s.n_slices) for s in found.series) == [("A", 2), ("B", 3)]
    assert found.skipped == [] and found.failed == []


def test_headerless_file_reads_as_implicit_little_endian(tmp_path):
    [path] = write_series(tmp_path, SeriesSpec(n_slices=1, no_preamble=True))
    assert path.read_bytes()[128:132] != b"DICM"
    header, stored = load_slice(path)
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert stored.shape == (64, 64) and "PixelData" not in header


def test_undecodable_pixels_name_the_file_and_the_syntax(tmp_path):
    from tests.synth import write_undecodable

    [path] = write_series(tmp_path, SeriesSpec(n_slices=1))
    write_undecodable(path, path, kind="unsupported_syntax")
    with pytest.raises(DicomError) as info:
        load_slice(path)
    assert str(path) in str(info.value) and "cannot decode pixel data" in str(info.value)
    assert "\n" not in str(info.value)


def test_error_messages_never_hold_patient_tags(tmp_path):
    from tests.synth import write_truncated

    [path] = write_series(tmp_path, SeriesSpec(n_slices=1))
    write_truncated(path, path)
    with pytest.raises(DicomError) as info:
        load_slice(path)
    for value in ("Synthetic", "SYN0001", "19700101"):
        assert value not in str(info.value)


def test_output_transfer_syntax_choice():
    keep = lambda ts: output_transfer_syntax(ts, "keep")
    assert keep("1.2.840.10008.1.2.5") == "1.2.840.10008.1.2.5"  # RLE
    assert keep("1.2.840.10008.1.2.4.80") == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    assert keep("1.2.840.10008.1.2.4.90") == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert keep("1.2.840.10008.1.2.4.70") == "1.2.840.10008.1.2.4.80"  # JPEG Lossless -> JPEG-LS
    assert keep("1.2.840.10008.1.2.4.91") == "1.2.840.10008.1.2.1"  # lossy J2K: never re-encode lossy
    assert keep("1.2.840.10008.1.2.4.81") == "1.2.840.10008.1.2.1"  # JPEG-LS near-lossless
    assert keep("1.2.840.10008.1.2.2") == "1.2.840.10008.1.2.1"  # big endian (retired)
    assert output_transfer_syntax("1.2.840.10008.1.2.5", "explicit") == "1.2.840.10008.1.2.1"


def test_derivation_uids_are_deterministic_valid_and_depend_on_what_changes_pixels():
    a = Derivation.denoising(model="redcnn", weights_sha256="ab" * 32, processed_time="101010")
    same = Derivation.denoising(model="redcnn", weights_sha256="ab" * 32, processed_time="235959")
    other_weights = Derivation.denoising(model="redcnn", weights_sha256="cd" * 32)
    other_blend = Derivation.denoising(model="redcnn", weights_sha256="ab" * 32, blend=0.3)
    uid = a.uid("instance", "1.2.3")
    assert uid == same.uid("instance", "1.2.3")  # the processing time is not part of it
    assert len({uid, other_weights.uid("instance", "1.2.3"), other_blend.uid("instance", "1.2.3"),
                a.uid("instance", "1.2.4"), a.uid("series", "1.2.3")}) == 5
    assert len(uid) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                  for p in uid.split("."))


def test_derived_series_number_stays_in_the_is_range():
    from ldct_cli.dicom.write import IS_MAX, derived_series_number

    assert derived_series_number(3, 1000) == 1003
    assert derived_series_number(None, 1000) == 1000
    assert derived_series_number(IS_MAX, 1000) == 1000 + IS_MAX % 10**6
    assert derived_series_number("12345678901234567890", 2000) == 2000 + 567890  # its last six digits
    for value in (IS_MAX, "12345678901234567890", -IS_MAX - 1):
        assert len(str(derived_series_number(value, 1000))) <= 12


def test_an_element_pydicom_cannot_encode_is_named_and_is_not_the_disks_fault(tmp_path):
    """pydicom reports it as a multi-line OSError; written into memory first, it is the data's."""
    import warnings

    from ldct_cli.dicom.write import EncodeError, write_dataset

    [path] = write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds["Rows"].value = 70000  # more than a US holds
    with pytest.raises(EncodeError) as info:
        write_dataset(ds, tmp_path / "out.dcm")
    assert str(info.value).startswith("(0028,0010) Rows: cannot be encoded (") and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing half-written


def test_brief_keeps_one_short_line_without_long_values():
    from ldct_cli.dicom.read import brief

    message = ("Invalid value for VR UI: '1.2.826.0.1.3680043.8.498.41309794043272209405486248512604'. "
               "Please see <https://dicom.nema.org> for allowed values\nfor data_element:\n(0010,0010) ...")
    assert brief(message) == "Invalid value for VR UI: '...'."
    assert brief(ValueError()) == "ValueError"
    assert len(brief("x" * 500)) == 160


@pytest.mark.parametrize("syntax, flag, lossy", [
    ("1.2.840.10008.1.2.4.50", "00", True),    # JPEG baseline is lossy whatever the header says
    ("1.2.840.10008.1.2.4.81", None, True),    # near-lossless JPEG-LS
    ("1.2.840.10008.1.2.4.91", None, True),    # JPEG 2000 either way: unsaid is taken as lossy
    ("1.2.840.10008.1.2.4.91", "00", False),   # ... unless the source says it was not
    ("1.2.840.10008.1.2.4.203", "00", False),  # HTJ2K, either way
    ("1.2.840.10008.1.2.4.203", "01", True),
    ("1.2.840.10008.1.2.4.201", None, False),  # HTJ2K Lossless Only
    ("1.2.840.10008.1.2.4.202", None, False),  # HTJ2K RPCL Lossless Only
    ("1.2.840.10008.1.2.4.90", None, False),   # JPEG 2000 Lossless Only
    ("1.2.840.10008.1.2.1", None, False),
])
def test_which_source_syntaxes_mark_the_output_lossy(syntax, flag, lossy):
    from ldct_cli.dicom.write import went_through_lossy_compression

    assert went_through_lossy_compression(syntax, flag) is lossy
