"""``ldct prepare``: paired, Mayo-layout and simulated datasets from DICOM folders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ldct_cli.prepare import PatchSettings, SplitSettings, load_manifest, open_case, split_cases
from tests.synth import SeriesSpec, write_series


def _pair(root: Path, *, n: int = 5, low_seed: int = 1, shuffle_low: bool = True, **spec) -> tuple[Path, Path]:
    """A full-dose and a low-dose series at the same positions (the low one noisier)."""
    full = root / "full_3mm"
    low = root / "quarter_3mm"
    write_series(full, SeriesSpec(n_slices=n, seed=0, series_description="FD", **spec))
    paths = write_series(low, SeriesSpec(n_slices=n, seed=low_seed, series_description="QD", **spec))
    if shuffle_low:  # file names must not matter: rename in another order
        names = [p.name for p in paths]
        random.Random(0).shuffle(names)
        for path, name in zip(paths, names):
            path.rename(path.with_name("tmp_" + name))
    return low, full


def _hu(path: Path) -> np.ndarray:
    """A slice's HU as the dataset stores them: rounded, clipped to [-1024, 3071], int16."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def test_paired_mode_pairs_by_position_and_keeps_hu(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=5, pixel_padding_value=-2000, intercept=0, bits_stored=16)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--quiet",
                 "--split-by", "block", "--split", "0.6,0.2,0.2", "--gap", "0")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "data")
    [case] = manifest["cases"]
    assert case["slices"] == 5 and (case["rows"], case["columns"]) == (64, 64)
    assert case["z_mm"] == sorted(case["z_mm"])
    low_arr, full_arr = open_case(tmp_path / "data", case["id"])
    assert low_arr.dtype == np.int16 and isinstance(low_arr, np.memmap)
    # slice k of both arrays is the same position; values are the files' HU, padding -> air
    sources_full = sorted(full.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    sources_low = sorted(low.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k in range(5):
        expected = _hu(sources_full[k])
        padded = pydicom.dcmread(sources_full[k]).pixel_array == -2000
        assert padded.any()
        assert np.array_equal(full_arr[k][~padded], expected[~padded])
        assert (full_arr[k][padded] == -1000).all()
        assert np.array_equal(low_arr[k][~padded], _hu(sources_low[k])[~padded])
    split = manifest["split"]
    assert [(r["start"], r["stop"]) for r in split["train"]] == [(0, 3)]
    assert [(r["start"], r["stop"]) for r in split["val"]] == [(3, 4)]
    assert [(r["start"], r["stop"]) for r in split["test"]] == [(4, 5)]
    assert manifest["patch"] == {"patch_size": 64, "patches_per_slice": 16, "body_threshold_hu": -500.0,
                                 "min_body_fraction": 0.5}
    assert manifest["cases"][0]["full_series_uid"] == pydicom.dcmread(sources_full[0]).SeriesInstanceUID


def test_rerun_gives_the_same_dataset_and_refuses_to_overwrite(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=3)
    args = ("--low", low, "--full", full, "--quiet")
    assert cli("prepare", tmp_path / "a", *args).exit_code == 0
    again = cli("prepare", tmp_path / "a", *args)
    assert again.exit_code == 2 and "exists already" in again.stderr
    assert cli("prepare", tmp_path / "b", *args).exit_code == 0
    for name in ("full.npy", "low.npy"):
        [a] = (tmp_path / "a").rglob(name)
        [b] = (tmp_path / "b").rglob(name)
        assert a.read_bytes() == b.read_bytes()
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}
    assert strip(load_manifest(tmp_path / "a")) == strip(load_manifest(tmp_path / "b"))


@pytest.mark.parametrize("problem, message", [
    ("count", "low-dose slices but"),
    ("position", "no low-dose slice at z"),
    ("matrix", "matrices differ"),
])
def test_mismatched_pairs_are_clear_errors_and_leave_nothing(tmp_path, cli, problem, message):
    full = tmp_path / "fd"
    write_series(full, SeriesSpec(n_slices=4))
    low = tmp_path / "qd"
    spec = {"count": SeriesSpec(n_slices=3), "position": SeriesSpec(n_slices=4, slice_positions_mm=(0, 2.5, 5, 9)),
            "matrix": SeriesSpec(n_slices=4, rows=32, columns=32)}[problem]
    write_series(low, spec)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--quiet")
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "data").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldct-partial")]


def test_mayo_layout_one_case_per_patient(tmp_path, cli):
    for patient in ("L067", "L096"):
        _pair(tmp_path / "mayo" / patient, n=3)
    result = cli("prepare", tmp_path / "data", "--mayo", tmp_path / "mayo", "--quiet", "--split", "0.5,0.5,0")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "data")
    assert sorted(c["id"] for c in manifest["cases"]) == ["L067", "L096"]
    assert sorted(r["case"] for name in ("train", "val") for r in manifest["split"][name]) == ["L067", "L096"]
    assert manifest["split"]["test"] == []


def test_mayo_patient_without_a_low_dose_series_is_named(tmp_path, cli):
    _pair(tmp_path / "mayo" / "L067", n=2)
    write_series(tmp_path / "mayo" / "L109" / "full_3mm", SeriesSpec(n_slices=2))
    result = cli("prepare", tmp_path / "data", "--mayo", tmp_path / "mayo", "--quiet")
    assert result.exit_code == 1 and "patient L109" in result.stderr


def test_mode_must_be_one_of_three(tmp_path, cli):
    result = cli("prepare", tmp_path / "data", "--full", tmp_path, "--quiet")
    assert result.exit_code == 2 and "choose one mode" in result.stderr


def test_split_by_case_is_deterministic_and_complete():
    from ldct_cli.prepare import CaseRecord

    records = [CaseRecord(id=f"c{i}", slices=10, rows=8, columns=8, pixel_mm=1, slice_mm=1, z_mm=[],
                          full_series_uid="", low_series_uid="", full_source="", low_source="")
               for i in range(10)]
    a = split_cases(records, SplitSettings(seed=3))
    assert a == split_cases(records, SplitSettings(seed=3))
    assert a != split_cases(records, SplitSettings(seed=4))
    cases = [r["case"] for name in ("train", "val", "test") for r in a[name]]
    assert sorted(cases) == sorted(r.id for r in records)
    assert [len(a[name]) for name in ("train", "val", "test")] == [8, 1, 1]


def test_patch_settings_are_recorded_for_the_trainer(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=2)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--quiet",
                 "--patch-size", "55", "--patches-per-slice", "4", "--min-body-fraction", "0.3")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["patch"] == {
        "patch_size": 55, "patches_per_slice": 4, "body_threshold_hu": -500.0, "min_body_fraction": 0.3}
    assert PatchSettings(patch_size=55, patches_per_slice=4, min_body_fraction=0.3).patch_size == 55


def test_resampling_to_a_common_pixel_spacing(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=2, pixel_spacing_mm=(0.5, 0.5))
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--spacing", "1.0", "--quiet")
    assert result.exit_code == 0, result.output
    [case] = load_manifest(tmp_path / "data")["cases"]
    assert (case["rows"], case["columns"], case["pixel_mm"]) == (32, 32, 1.0)
    low_arr, full_arr = open_case(tmp_path / "data", case["id"])
    original = _hu(sorted(full.glob("*.dcm"))[0]).astype(float)
    # a 2x2 block average is what linear resampling to twice the spacing gives, roughly
    assert abs(full_arr[0].astype(float).mean() - original.mean()) < 15


def test_missing_slice_thickness_is_inferred_from_positions(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=3, slice_positions_mm=(0.0, 1.5, 3.0))
    for folder in (low, full):
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            del ds.SliceThickness
            ds.save_as(path)
    assert cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--quiet").exit_code == 0
    [case] = load_manifest(tmp_path / "data")["cases"]
    assert case["slice_mm"] == 1.5


def test_one_case_is_split_by_blocks_by_default_so_training_has_val_slices(tmp_path, cli):
    from ldct_cli.training.data import validation_slices

    low, full = _pair(tmp_path / "src", n=20)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full)
    assert result.exit_code == 0, result.output
    assert "note: 1 case: split by contiguous blocks" in result.stderr and "(split by block)" in result.stderr
    manifest = load_manifest(tmp_path / "data")
    settings = manifest["split_settings"]
    assert (settings["asked"], settings["by"]) == ("auto", "block") and "blocks" in settings["note"]
    blocks = {name: [(r["start"], r["stop"]) for r in manifest["split"][name]] for name in ("train", "val", "test")}
    assert blocks == {"train": [(0, 10)], "val": [(14, 15)], "test": [(19, 20)]}  # 4 slices apart
    assert len(validation_slices(tmp_path / "data", split="val")) == 1  # what `ldct train` needed


def test_split_by_case_of_one_case_is_refused_before_any_work(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=20)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--split-by", "case")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "1 case cannot fill the 3 splits train, val, test; use --split-by block" in result.stderr
    assert not (tmp_path / "data").exists()
    # one split asked for: a single case fills it
    ok = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--split-by", "case", "--split", "1,0,0",
             "--quiet")
    assert ok.exit_code == 0 and load_manifest(tmp_path / "data")["split_settings"]["note"] == ""


def test_a_case_too_short_for_blocks_says_what_to_do(tmp_path, cli):
    low, full = _pair(tmp_path / "src", n=3)
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", full, "--quiet")
    assert result.exit_code == 0
    assert "too few to split into train, val, test, every slice is in train" in result.stderr
    assert "a smaller --gap" in result.stderr
    assert load_manifest(tmp_path / "data")["split"]["train"] == [
        {"case": load_manifest(tmp_path / "data")["cases"][0]["id"], "start": 0, "stop": 3}]


def test_auto_split_by_case_with_enough_cases():
    from ldct_cli.prepare import resolve_split

    settings, note = resolve_split(SplitSettings(), [10, 10, 10])
    assert settings.by == "case" and note == ""
    settings, note = resolve_split(SplitSettings(fractions=(0.5, 0.5, 0.0)), [10, 10])
    assert settings.by == "case" and note == ""
    settings, note = resolve_split(SplitSettings(), [20, 30])
    assert settings.by == "block" and note.startswith("2 cases: split by contiguous blocks")
