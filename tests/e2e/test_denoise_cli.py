"""``ldct denoise`` end to end, in-process, on synthetic series written with pydicom."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.synth import (
    SeriesSpec,
    write_mixed_folder,
    write_non_ct,
    write_non_image,
    write_not_dicom,
    write_series,
    write_study,
    write_truncated,
    write_undecodable,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

# Every case the reader must handle; --blend 1 must give back each one's stored values exactly.
ROUND_TRIP_CASES = {
    "signed_-1024": SeriesSpec(signed=True, intercept=-1024),
    "unsigned_-1000": SeriesSpec(signed=False, intercept=-1000),
    "unsigned_0_16bit": SeriesSpec(signed=False, intercept=0, bits_stored=16),
    "slope_0.5": SeriesSpec(signed=True, intercept=-1024, slope=0.5, bits_stored=14),
    "no_rescale": SeriesSpec(signed=True, intercept=None),
    "padding": SeriesSpec(signed=True, intercept=0, bits_stored=16, pixel_padding_value=-2000),
    "rle": SeriesSpec(transfer_syntax=RLE),
    "jpeg_ls": SeriesSpec(transfer_syntax=JPEG_LS),
    "j2k": SeriesSpec(transfer_syntax=J2K_LOSSLESS),
    "jpeg_lossless": SeriesSpec(transfer_syntax=JPEG_LOSSLESS_SV1),
    "implicit": SeriesSpec(transfer_syntax="1.2.840.10008.1.2"),
    "big_endian": SeriesSpec(transfer_syntax="1.2.840.10008.1.2.2"),
    "deflated": SeriesSpec(transfer_syntax="1.2.840.10008.1.2.1.99"),
    "no_preamble": SeriesSpec(no_preamble=True),
    "empty_uids": SeriesSpec(empty_uids=True),
    "tilt": SeriesSpec(gantry_tilt_deg=15.0),
    "uneven": SeriesSpec(slice_positions_mm=(0.0, 1.0, 3.5, 4.0)),
    "256x256": SeriesSpec(rows=256, columns=256, n_slices=2),
    "512x640": SeriesSpec(rows=512, columns=640, n_slices=2),
    "1024x1024": SeriesSpec(rows=1024, columns=1024, n_slices=1),
}


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def _tree_snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _summary(result) -> dict:
    return json.loads(result.stdout)


def _denoise(cli, src: Path, out: Path, weights: Path, *extra: str):
    return cli("denoise", src, out, "--weights", weights, "--quiet", "--json", *extra)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, checkpoints):
    """Every ROUND_TRIP_CASES series in one tree, denoised once with --blend 1 (2 workers)."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    root = tmp_path_factory.mktemp("rt")
    src = root / "in"
    for name, spec in ROUND_TRIP_CASES.items():
        write_series(src / name, spec)
    out = root / "out"
    result = CliRunner().invoke(app, ["denoise", str(src), str(out), "--weights",
                                      str(checkpoints["redcnn"]), "--blend", "1", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return src, out, json.loads(result.stdout)


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_blend_one_gives_back_stored_values_exactly(round_trip, case):
    src, out, summary = round_trip
    [entry] = [s for s in summary["series"] if Path(s["input"]).name == case]
    assert entry["status"] == "done" and entry["clipped_pixels"] == 0
    inputs = sorted((src / case).glob("*.dcm"))
    outputs = _series_files(Path(entry["output"]))
    assert len(outputs) == len(inputs) == ROUND_TRIP_CASES[case].n_slices
    for source, derived in zip(inputs, outputs):  # synth writes slices in spatial order
        a, b = pydicom.dcmread(source, force=True), _read(derived)
        if "TransferSyntaxUID" not in a.file_meta:
            a.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        assert np.array_equal(a.pixel_array.astype(np.int64), b.pixel_array.astype(np.int64))
        assert b.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert b.PixelRepresentation == a.PixelRepresentation and b.BitsStored == a.BitsStored


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_dicom3tools_find_no_new_error_in_any_case(round_trip, case):
    """dciodvfy: no error the source did not have; dcentvfy: the output series is consistent."""
    from tests.dicomcheck import dcentvfy_errors, new_errors

    src, out, summary = round_trip
    [entry] = [s for s in summary["series"] if Path(s["input"]).name == case]
    outputs = _series_files(Path(entry["output"]))
    inputs = sorted((src / case).glob("*.dcm"))
    assert new_errors(inputs[0], outputs[0]) == set()
    assert dcentvfy_errors(outputs) == []


def test_output_follows_every_derived_series_rule(tmp_path, cli, checkpoints):
    """DICOM.md: must change, should add, must keep; checked on every output slice."""
    spec = SeriesSpec(n_slices=3, pixel_padding_value=-2000, bits_stored=16, intercept=0)
    sources = write_series(tmp_path / "in" / "abd", spec)
    for path in sources:  # attributes the writer must delete or recompute
        ds = pydicom.dcmread(path)
        ds.SmallestImagePixelValue, ds.LargestImagePixelValue = 0, 1
        ds["SmallestImagePixelValue"].VR = ds["LargestImagePixelValue"].VR = "SS"
        ds.LargestPixelValueInSeries = 1
        ds["LargestPixelValueInSeries"].VR = "SS"
        ds.LossyImageCompression = "01"
        icon = pydicom.Dataset()
        icon.Rows = icon.Columns = 1
        ds.IconImageSequence = [icon]
        ds.save_as(path)
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints["wgan_vgg"],
                      "--series-number-offset", "500", "--workers", "0")
    assert result.exit_code == 0, result.output
    [entry] = _summary(result)["series"]
    outputs = _series_files(Path(entry["output"]))
    assert len(outputs) == 3
    series_uids = set()
    for source_path, out_path in zip(sources, outputs):
        src, out = _read(source_path), _read(out_path)
        # must change
        assert out.SOPInstanceUID != src.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID == src.SOPClassUID
        assert out.SeriesInstanceUID != src.SeriesInstanceUID
        series_uids.add(out.SeriesInstanceUID)
        for uid in (out.SOPInstanceUID, out.SeriesInstanceUID):
            assert len(uid) <= 64 and all(part.isdigit() for part in uid.split("."))
        assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert out.SeriesNumber == src.SeriesNumber + 500
        assert out.SeriesDescription == f"{src.SeriesDescription} [ldct wgan_vgg]"
        assert out.InstanceCreationDate == out.ContentDate and len(out.ContentDate) == 8
        assert "InstanceCreationTime" in out and "ContentTime" in out
        assert out.AcquisitionDate == src.AcquisitionDate and out.AcquisitionTime == src.AcquisitionTime
        assert out.file_meta.TransferSyntaxUID == EXPLICIT_LE
        pixels = out.pixel_array
        assert out.SmallestImagePixelValue == pixels.min() and out.LargestImagePixelValue == pixels.max()
        assert "LargestPixelValueInSeries" not in out and "IconImageSequence" not in out
        # should add
        assert "wgan_vgg" in out.DerivationDescription and "clipped" in out.DerivationDescription
        assert out.DerivationCodeSequence[0].CodeValue == "113087"
        assert out.DerivationCodeSequence[0].CodingSchemeDesignator == "DCM"
        [source_item] = out.SourceImageSequence
        assert source_item.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert source_item.ReferencedSOPClassUID == src.SOPClassUID
        assert source_item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        [ref_series] = out.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        equipment = out.ContributingEquipmentSequence[-1]
        assert equipment.Manufacturer == "ldct-cli"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        # must keep
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID",
                        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                        "SliceThickness", "SliceLocation", "Rows", "Columns", "InstanceNumber", "KVP",
                        "XRayTubeCurrent", "ExposureTime", "CTDIvol", "ConvolutionKernel",
                        "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter",
                        "WindowWidth", "BurnedInAnnotation", "PixelPaddingValue", "BitsStored",
                        "PixelRepresentation", "PatientPosition"):
            assert out.get(keyword) == src.get(keyword), keyword
        assert out.LossyImageCompression == "01"
        private = [e for e in src if e.tag.is_private]
        assert private and all(out[e.tag].value == e.value for e in private)
        # padding pixels written back unchanged
        padded = src.pixel_array == src.PixelPaddingValue
        assert padded.any() and np.array_equal(pixels[padded], src.pixel_array[padded])
    assert len(series_uids) == 1


def test_no_output_uid_equals_an_input_uid_and_reruns_are_idempotent(tmp_path, cli, checkpoints):
    write_study(tmp_path / "in", [SeriesSpec(series_description="A"), SeriesSpec(series_description="B")])
    input_uids = set()
    for path in (tmp_path / "in").rglob("*.dcm"):
        ds = _read(path)
        input_uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID}
    args = (cli, tmp_path / "in", tmp_path / "out", checkpoints["redcnn"], "--workers", "0")
    first = _denoise(*args)
    assert first.exit_code == 0
    outputs = _series_files(tmp_path / "out")
    assert len(outputs) == 8
    made = {}
    for path in outputs:
        ds = _read(path)
        assert ds.SOPInstanceUID not in input_uids and ds.SeriesInstanceUID not in input_uids
        made[path] = (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    assert len({v[0] for v in made.values()}) == 8 and len({v[1] for v in made.values()}) == 2

    again = _denoise(*args)
    assert again.exit_code == 0
    assert {s["status"] for s in _summary(again)["series"]} == {"skipped"}
    redo = _denoise(*args, "--overwrite")
    assert {s["status"] for s in _summary(redo)["series"]} == {"done"}
    assert {p: (_read(p).SOPInstanceUID, _read(p).SeriesInstanceUID) for p in outputs} == made
    # another blend is another derived series: new UIDs, its own folder
    other = _denoise(*args, "--blend", "0.3")
    assert {s["status"] for s in _summary(other)["series"]} == {"done"}
    assert len(_series_files(tmp_path / "out")) == 16


def test_simpleitk_reads_the_output_with_the_input_geometry(tmp_path, cli, checkpoints):
    import SimpleITK as sitk

    write_series(tmp_path / "in", SeriesSpec(n_slices=5, gantry_tilt_deg=0.0, rows=48, columns=40,
                                              pixel_spacing_mm=(0.8, 0.6)))
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints["wgan_vgg"], "--workers", "0")
    assert result.exit_code == 0
    [entry] = _summary(result)["series"]

    def volume(folder: Path):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return reader.Execute()

    a, b = volume(tmp_path / "in"), volume(Path(entry["output"]))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_transfer_syntax_keep(tmp_path, cli, checkpoints):
    for name, syntax in {"rle": RLE, "jls": JPEG_LS, "j2k": J2K_LOSSLESS, "jpegll": JPEG_LOSSLESS_SV1,
                         "deflated": "1.2.840.10008.1.2.1.99", "big": "1.2.840.10008.1.2.2"}.items():
        write_series(tmp_path / "in" / name, SeriesSpec(n_slices=1, transfer_syntax=syntax,
                                                         series_description=name))
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints["redcnn"], "--blend", "1",
                      "--transfer-syntax", "keep", "--workers", "0")
    assert result.exit_code == 0, result.output
    expected = {"rle": RLE, "jls": JPEG_LS, "j2k": J2K_LOSSLESS, "jpegll": JPEG_LS,
                "deflated": "1.2.840.10008.1.2.1.99", "big": EXPLICIT_LE}
    for entry in _summary(result)["series"]:
        name = Path(entry["input"]).name
        [out] = _series_files(Path(entry["output"]))
        [src] = (tmp_path / "in" / name).glob("*.dcm")
        ds = _read(out)
        assert ds.file_meta.TransferSyntaxUID == expected[name], name
        assert np.array_equal(ds.pixel_array, _read(src).pixel_array), name


def test_several_series_in_one_folder_and_a_tree_of_studies(tmp_path, cli, checkpoints):
    write_mixed_folder(tmp_path / "in" / "mixed", [SeriesSpec(series_description="X", series_number=1),
                                                    SeriesSpec(series_description="Y", series_number=2)])
    write_study(tmp_path / "in" / "patient" / "study", [SeriesSpec(series_description="Z")])
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints["redcnn"], "--workers", "0")
    assert result.exit_code == 0
    outputs = sorted(Path(s["output"]).relative_to(tmp_path / "out").parent.as_posix()
                     for s in _summary(result)["series"])
    assert outputs == ["mixed", "mixed", "patient/study/series_1"]  # the input layout, mirrored


def test_a_single_file_as_input(tmp_path, cli, checkpoints):
    [path, *_] = write_series(tmp_path / "in", SeriesSpec(n_slices=2))
    result = _denoise(cli, path, tmp_path / "out", checkpoints["redcnn"], "--workers", "0")
    assert result.exit_code == 0
    [entry] = _summary(result)["series"]
    assert entry["slices"] == 1 and len(_series_files(Path(entry["output"]))) == 1


def test_bad_inputs_are_reported_and_the_good_series_still_written(tmp_path, cli, checkpoints):
    src = tmp_path / "in"
    write_series(src / "good", SeriesSpec(series_description="GOOD"))
    broken = write_series(src / "broken", SeriesSpec(series_description="BROKEN"))
    write_truncated(broken[1], broken[1])  # pixel data cut: that slice is left out
    undecodable = write_series(src / "undecodable", SeriesSpec(series_description="UNDEC", n_slices=2))
    write_undecodable(undecodable[0], undecodable[0])
    write_undecodable(undecodable[1], undecodable[1], kind="unsupported_syntax")
    write_not_dicom(src / "notes.txt")
    (src / "other").mkdir()
    write_non_ct(src / "other" / "mr.dcm")
    write_non_image(src / "other" / "sr.dcm")
    (src / "junk.dcm").write_bytes(b"DICM" * 10)
    before = _tree_snapshot(src)

    result = _denoise(cli, src, tmp_path / "out", checkpoints["redcnn"])
    assert result.exit_code == 1
    summary = _summary(result)
    status = {Path(s["input"]).name: s for s in summary["series"]}
    assert status["good"]["status"] == "done"
    assert status["broken"]["status"] == "incomplete" and status["broken"]["bad_files"] == [str(broken[1])]
    assert len(_series_files(Path(status["broken"]["output"]))) == 3  # the good slices are written
    assert status["undecodable"]["status"] == "failed"  # no slice of it could be used
    failed = {item["path"]: item["error"] for item in summary["failed_files"]}
    assert "Pixel Data truncated" in failed[str(broken[1])]
    assert "cannot decode pixel data" in failed[str(undecodable[0])]
    assert "cannot decode pixel data" in failed[str(undecodable[1])]
    skipped = {Path(item["path"]).name: item["reason"] for item in summary["skipped_files"]}
    assert skipped["notes.txt"] == "not a DICOM file" and skipped["junk.dcm"] == "not a DICOM file"
    assert "not a CT image" in skipped["mr.dcm"] and "not a CT image" in skipped["sr.dcm"]
    assert len(_series_files(Path(status["good"]["output"]))) == 4
    # a failed series leaves nothing behind, and the input tree is untouched
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_dir()) == sorted(
        [Path(status["good"]["output"]).name, "good", Path(status["broken"]["output"]).name, "broken"])
    assert _tree_snapshot(src) == before
    # one line per problem on stderr, naming the file (and one for the series not written)
    errors = [line for line in result.stderr.splitlines() if line.startswith("failed")]
    assert len(errors) == 4 and sum(str(broken[1]) in line for line in errors) == 1


def test_not_dicom_file_as_the_only_input_is_an_error(tmp_path, cli, checkpoints):
    (tmp_path / "in").mkdir()
    path = write_not_dicom(tmp_path / "in" / "notes.txt")
    result = cli("denoise", path, tmp_path / "out", "--weights", checkpoints["redcnn"], "--quiet")
    assert result.exit_code == 1
    assert "not a DICOM file" in result.stderr and "no CT series found" in result.stderr


def test_out_beside_a_single_input_file_is_refused(tmp_path, cli, checkpoints):
    [path] = write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", path, tmp_path / "in" / "out", "--weights", checkpoints["redcnn"], "--quiet")
    assert result.exit_code == 2 and "OUT is inside IN" in result.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [path.name]


def test_header_truncated_file_fails_and_others_are_written(tmp_path, cli, checkpoints):
    src = tmp_path / "in"
    good = write_series(src / "good", SeriesSpec(n_slices=2))
    broken = src / "bad" / "cut.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(good[0].read_bytes()[:300])  # cut inside the header
    result = _denoise(cli, src, tmp_path / "out", checkpoints["redcnn"], "--workers", "0")
    assert result.exit_code == 1
    summary = _summary(result)
    assert [Path(f["path"]).name for f in summary["failed_files"]] == ["cut.dcm"]
    assert [s["status"] for s in summary["series"]] == ["done"]


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_inside_input_and_input_inside_output_are_refused(tmp_path, cli, checkpoints, where):
    src = tmp_path / "in"
    write_series(src, SeriesSpec(n_slices=1))
    before = _tree_snapshot(src)
    out = {"inside": src / "out", "same": src, "parent": tmp_path}[where]
    result = cli("denoise", src, out, "--weights", checkpoints["redcnn"], "--quiet")
    assert result.exit_code == 2
    assert "inside" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _tree_snapshot(src) == before


def test_unwritable_output_place_fails_that_series_only(tmp_path, cli, checkpoints):
    write_study(tmp_path / "in", [SeriesSpec(series_description="A"), SeriesSpec(series_description="B")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "series_1").write_text("a file where a folder must go")
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints["redcnn"], "--workers", "0")
    assert result.exit_code == 1
    status = {Path(s["input"]).name: s for s in _summary(result)["series"]}
    assert status["series_1"]["status"] == "failed" and "cannot write" in status["series_1"]["error"]
    assert status["series_2"]["status"] == "done"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions (the test above covers write failures)")
def test_read_only_output_is_a_clear_error(tmp_path, cli, checkpoints):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = cli("denoise", tmp_path / "in", out, "--weights", checkpoints["redcnn"], "--quiet")
    finally:
        out.chmod(0o700)
    assert result.exit_code == 2 and "cannot write to OUT" in result.stderr


def test_output_that_is_a_file_is_refused(tmp_path, cli, checkpoints):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    (tmp_path / "out").write_text("x")
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--weights", checkpoints["redcnn"])
    assert result.exit_code == 2 and "not a folder" in result.stderr


@pytest.mark.parametrize("args, message", [
    ((), "name a model"),
    (("--model", "nope"), "unknown model"),
    (("--model", "redcnn"), "no bundled weights"),
    (("--blend", "1.5", "--weights", "W"), "--blend"),
    (("--device", "tpu", "--weights", "W"), "--device"),
    (("--transfer-syntax", "jpeg", "--weights", "W"), "--transfer-syntax"),
    (("--weights", "missing.safetensors"), "no such checkpoint"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, cli, checkpoints, args, message, monkeypatch):
    monkeypatch.setenv("LDCT_WEIGHTS_DIR", str(tmp_path / "no_weights"))  # nothing bundled
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    args = tuple(str(checkpoints["redcnn"]) if a == "W" else a for a in args)
    result = cli("denoise", tmp_path / "in", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list((tmp_path).glob("out/*"))


def test_weights_of_another_model_than_named_is_an_error(tmp_path, cli, checkpoints):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "pix2pix",
                 "--weights", checkpoints["redcnn"])
    assert result.exit_code == 2 and "holds a 'redcnn' model" in result.stderr


def test_run_folder_means_its_best_checkpoint(tmp_path, cli, checkpoints):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(checkpoints["wgan_vgg"].read_bytes())
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--weights", run, "--json", "--quiet")
    assert result.exit_code == 0 and _summary(result)["model"] == "wgan_vgg"


@pytest.mark.parametrize("model", ["redcnn", "wgan_vgg", "pix2pix"])
def test_every_model_denoises_odd_matrix_sizes(tmp_path, cli, checkpoints, model):
    write_series(tmp_path / "in", SeriesSpec(rows=72, columns=100, n_slices=2))
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", checkpoints[model], "--workers", "0")
    assert result.exit_code == 0, result.output
    [entry] = _summary(result)["series"]
    for path in _series_files(Path(entry["output"])):
        assert _read(path).pixel_array.shape == (72, 100)


def test_blend_mixes_denoised_and_input(tmp_path, cli, checkpoints):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1, bits_stored=16, intercept=-1024))
    outs = {}
    for blend in ("0", "0.3", "1"):
        result = _denoise(cli, tmp_path / "in", tmp_path / f"out{blend}", checkpoints["wgan_vgg"],
                          "--blend", blend, "--workers", "0")
        [entry] = _summary(result)["series"]
        [path] = _series_files(Path(entry["output"]))
        outs[blend] = _read(path).pixel_array.astype(np.float64)
    expected = 0.7 * outs["0"] + 0.3 * outs["1"]
    assert np.abs(outs["0.3"] - expected).max() <= 1.0  # one rounding step each side


def test_two_point_five_d_feeds_neighbours_in_spatial_order(tmp_path, cli):
    """A 3-slice WGAN-VGG set up to pass its *first* input channel through unchanged must
    return, for slice i, the input slice i-1 (the first slice replicated at the start)."""
    import torch

    from ldct_cli import create_model, save_checkpoint

    model = create_model("wgan_vgg", in_slices=3)
    with torch.no_grad():
        for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # channel 0 -> channel 0, centre tap
    weights = tmp_path / "pass_previous.safetensors"
    save_checkpoint(model, weights)
    # positions given out of file order: the pipeline must sort along the normal
    write_series(tmp_path / "in", SeriesSpec(n_slices=4, slice_positions_mm=(10.0, 0.0, 5.0, 2.5),
                                             signed=True, intercept=-1024, bits_stored=16))
    result = _denoise(cli, tmp_path / "in", tmp_path / "out", weights, "--workers", "0",
                      "--batch-size", "3")
    assert result.exit_code == 0, result.output
    by_z = lambda paths: sorted(paths, key=lambda p: float(_read(p).ImagePositionPatient[2]))
    sources = by_z(sorted((tmp_path / "in").glob("*.dcm")))
    [entry] = _summary(result)["series"]
    outputs = by_z(_series_files(Path(entry["output"])))
    for i, out in enumerate(outputs):
        expected = np.clip(_read(sources[max(i - 1, 0)]).pixel_array, 0, None)  # model range >= -1024 HU
        assert np.array_equal(_read(out).pixel_array, expected), i


def test_interrupted_series_publishes_nothing_and_a_rerun_writes_only_the_rest(tmp_path, checkpoints,
                                                                               monkeypatch):
    from ldct_cli import build_denoiser, run_denoise
    from ldct_cli.dicom import write as writer
    from ldct_cli.pipeline import DenoiseOptions

    write_series(tmp_path / "in", SeriesSpec(n_slices=4))
    calls = []
    real = writer.write_dataset

    def interrupt_on_third(ds, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(ds, path)

    monkeypatch.setattr(writer, "write_dataset", interrupt_on_third)
    options = DenoiseOptions(workers=0)
    denoiser, derivation = build_denoiser(weights=checkpoints["redcnn"], options=options, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_denoise(tmp_path / "in", tmp_path / "out", denoiser=denoiser, derivation=derivation,
                    options=options)
    assert len(calls) == 3
    [staging] = (tmp_path / "out").iterdir()  # nothing under a series' own name ...
    assert staging.name.startswith(".ldct-partial-")
    assert sorted(p.name for p in staging.iterdir()) == ["0001.dcm", "0002.dcm"]  # ... two slices kept

    calls.clear()
    monkeypatch.setattr(writer, "write_dataset", lambda ds, path: (calls.append(path), real(ds, path)))
    summary = run_denoise(tmp_path / "in", tmp_path / "out", denoiser=denoiser, derivation=derivation,
                          options=options)
    [result] = summary.series
    assert result.status == "done" and result.resumed_slices == 2
    assert sorted(Path(p).name for p in calls) == ["0003.dcm", "0004.dcm"]
    [folder] = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["0001.dcm", "0002.dcm", "0003.dcm", "0004.dcm"]


def test_public_api_denoises_one_series(tmp_path, checkpoints):
    from ldct_cli import denoise_series

    write_series(tmp_path / "in", SeriesSpec(n_slices=2))
    result = denoise_series(tmp_path / "in", tmp_path / "out", weights=checkpoints["wgan_vgg"], device="cpu")
    assert result.status == "done" and len(_series_files(Path(result.output))) == 2


def test_help_and_version(cli):
    from ldct_cli import __version__

    assert cli("--version").stdout.strip() == f"ldct-cli {__version__}"
    text = cli("denoise", "--help").stdout
    for option in ("--model", "--weights", "--device", "--batch-size", "--precision", "--tile",
                   "--blend", "--transfer-syntax", "--overwrite", "--json", "Examples"):
        assert option in text
    assert "redcnn" in cli("models").stdout
    listed = json.loads(cli("models", "--json").stdout)
    from ldct_cli import list_models

    assert [m["name"] for m in listed] == list_models(None)
    assert [m["name"] for m in listed if m["kind"] == "generator"] == list_models()
    assert {m["name"]: m["kind"] for m in listed}["ct_features"] == "features"


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_signal_mid_series_keeps_finished_slices_hidden_and_a_rerun_resumes(tmp_path, checkpoints, cli,
                                                                            signal_name):
    """A real `ldct` process, stopped while writing a series: no partial series appears under
    its name; the slices it finished wait in the hidden staging folder, and a rerun writes
    only the others, giving what one uninterrupted run gives."""
    import signal
    import subprocess
    import sys
    import time

    import pydicom

    write_series(tmp_path / "in", SeriesSpec(rows=128, columns=128, n_slices=40))
    command = [sys.executable, "-m", "ldct_cli", "denoise", str(tmp_path / "in"), str(tmp_path / "out"),
               "--weights", str(checkpoints["redcnn"]), "--batch-size", "1", "--quiet"]
    # A background job of a non-interactive shell (`make test &`) starts with SIGINT ignored,
    # and children inherit that: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("out/.ldct-partial-*/0002.dcm")):
        assert process.poll() is None and time.monotonic() < deadline, "never started writing"
        time.sleep(0.05)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, signal_name), stderr  # 130 / 143
    assert "run the same command again to continue" in stderr
    [staging] = (tmp_path / "out").iterdir()
    assert staging.name.startswith(".ldct-partial-"), stderr
    kept = sorted(p.name for p in staging.iterdir())
    assert 2 <= len(kept) < 40 and all(not name.startswith(".") for name in kept)

    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--weights", checkpoints["redcnn"],
                 "--quiet", "--json")
    assert result.exit_code == 0, result.output
    [series] = json.loads(result.stdout)["series"]
    assert series["status"] == "done" and series["resumed_slices"] == len(kept)
    assert cli("denoise", tmp_path / "in", tmp_path / "whole", "--weights", checkpoints["redcnn"],
               "--quiet").exit_code == 0
    [resumed] = [p for p in (tmp_path / "out").iterdir()]
    [whole] = [p for p in (tmp_path / "whole").iterdir()]
    assert not resumed.name.startswith(".") and resumed.name == whole.name
    for a, b in zip(sorted(resumed.iterdir()), sorted(whole.iterdir()), strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.SOPInstanceUID == db.SOPInstanceUID and da.PixelData == db.PixelData, a.name


def test_a_deleted_output_slice_is_redone(tmp_path, checkpoints, cli):
    write_series(tmp_path / "in", SeriesSpec(rows=64, columns=64, n_slices=6))
    args = ("denoise", tmp_path / "in", tmp_path / "out", "--weights", checkpoints["redcnn"], "--quiet", "--json")
    assert cli(*args).exit_code == 0
    [folder] = (tmp_path / "out").iterdir()
    original = (folder / "0003.dcm").read_bytes()
    (folder / "0003.dcm").unlink()
    result = cli(*args)
    assert result.exit_code == 0, result.output
    [series] = json.loads(result.stdout)["series"]
    assert series["status"] == "done" and series["resumed_slices"] == 5
    import pydicom

    again = pydicom.dcmread(folder / "0003.dcm")
    before = pydicom.dcmread(__import__("io").BytesIO(original))
    assert again.PixelData == before.PixelData and again.SOPInstanceUID == before.SOPInstanceUID
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [folder.name]  # no staging left
    [series] = json.loads(cli(*args).stdout)["series"]
    assert series["status"] == "skipped" and "already complete" in series["error"]


def test_two_runs_into_one_out_never_lose_slices(tmp_path, checkpoints):
    """Two real processes write the same series into one OUT at once: one writes it, the
    other says the series is busy (or already complete); the series ends complete."""
    import subprocess
    import sys

    import pydicom

    write_series(tmp_path / "in", SeriesSpec(rows=128, columns=128, n_slices=24))
    command = [sys.executable, "-m", "ldct_cli", "denoise", str(tmp_path / "in"), str(tmp_path / "out"),
               "--weights", str(checkpoints["redcnn"]), "--batch-size", "1", "--quiet", "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    results = [(json.loads(out)["series"][0], run.returncode) for run, (out, _) in zip(runs, outputs)]
    done = [r for r, code in results if r["status"] == "done" and code == 0]
    other = [(r, code) for r, code in results if r not in done]
    assert len(done) == 1 and len(other) == 1, outputs
    [(second, code)] = other
    assert (second["status"], code) in (("failed", 1), ("skipped", 0)), outputs
    if second["status"] == "failed":
        assert "another ldct run is writing this series now" in second["error"]
    [folder] = (tmp_path / "out").iterdir()
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"{i:04d}.dcm" for i in range(1, 25)]
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in files}) == 24


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(tmp_path, checkpoints):
    import signal
    import subprocess
    import sys
    import time

    write_series(tmp_path / "in", SeriesSpec(rows=128, columns=128, n_slices=60))
    process = subprocess.Popen([sys.executable, "-m", "ldct_cli", "denoise", str(tmp_path / "in"),
                                str(tmp_path / "out"), "--weights", str(checkpoints["redcnn"]),
                                "--batch-size", "1", "--workers", "2", "--quiet"],
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("out/.ldct-partial-*/0001.dcm")):
        assert process.poll() is None and time.monotonic() < deadline, "never started writing"
        time.sleep(0.05)
    workers = [pid for pid in _children(process.pid)]
    assert len(workers) >= 2
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
              for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.1)


def test_progress_counts_each_slice_as_its_batch_leaves_the_model(tmp_path):
    """Progress moves batch by batch, not only once the write window has filled (issue 19, 18)."""
    from ldct_cli import run_denoise
    from ldct_cli.api import build_classical
    from ldct_cli.pipeline import DenoiseOptions, NoProgress

    write_series(tmp_path / "in", SeriesSpec(n_slices=8))
    events = []

    class Recorder(NoProgress):
        def slices_done(self, n):
            events.append(("done", n))

    class Counting:
        context_slices, batch_size = 1, 4

        def __call__(self, stack, *, pixel_mm=None):
            events.append(("model", len(stack)))
            return stack[:, 0].astype(np.float32)

    options = DenoiseOptions(workers=0)
    _, derivation = build_classical("tv", strength=10, options=options)
    run_denoise(tmp_path / "in", tmp_path / "out", denoiser=Counting(), derivation=derivation,
                options=options, progress=Recorder())
    assert events == [("model", 4)] + [("done", 1)] * 4 + [("model", 4)] + [("done", 1)] * 4
