"""``ldct phantom``, ``ldct simulate`` and their use by ``ldct prepare``, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.synth import SeriesSpec, write_series


def _by_z(folder: Path) -> dict[float, pydicom.Dataset]:
    out = {}
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        out[round(float(ds.ImagePositionPatient[2]), 3)] = ds
    return out


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory):
    """A small phantom with its quarter-dose partner, made once through the CLI."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    out = tmp_path_factory.mktemp("phantom") / "study"
    result = CliRunner().invoke(app, ["phantom", str(out), "--slices", "3", "--size", "128",
                                      "--pixel-mm", "2.8", "--dose", "0.25", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_phantom_writes_a_valid_full_dose_series(phantom_study):
    from tests.dicomcheck import dcentvfy_errors, dciodvfy_errors

    files = sorted((phantom_study / "full_dose").glob("*.dcm"))
    assert len(files) == 3
    first = pydicom.dcmread(files[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.Rows, first.Columns) == (128, 128) and float(first.PixelSpacing[0]) == 2.8
    assert float(first.SliceThickness) == 3.0
    z = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files)
    assert np.allclose(np.diff(z), 3.0)
    assert dciodvfy_errors(files[0]) == set()
    assert dcentvfy_errors(files) == []
    image = _hu(first)
    assert image.min() >= -1024 and np.median(image[image > -500]) > -200  # a body, in HU


def test_phantom_low_dose_is_a_derived_series_with_more_noise(phantom_study):
    from tests.dicomcheck import new_errors

    full = _by_z(phantom_study / "full_dose")
    [low_folder] = (phantom_study / "dose25").iterdir()
    low = _by_z(low_folder)
    assert sorted(full) == sorted(low)
    for z, ds in low.items():
        source = full[z]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ds.SeriesDescription.endswith("[ldct dose25]")
        assert "Simulated 25% dose" in ds.DerivationDescription
        assert "DerivationCodeSequence" not in ds  # no CID 7203 code means noise insertion
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        difference = _hu(ds) - _hu(source)
        body = _hu(source) > -500
        assert difference[body].std() > 5 and abs(difference[body].mean()) < 10
    z = next(iter(low))
    assert new_errors(next((phantom_study / "full_dose").glob("0001.dcm")),
                      next(low_folder.glob("*.dcm"))) == set()


def test_phantom_refuses_to_overwrite(phantom_study, cli):
    result = cli("phantom", phantom_study, "--slices", "1", "--size", "64")
    assert result.exit_code == 2 and "exists already" in result.stderr


def test_simulate_is_deterministic_per_seed(tmp_path, cli):
    write_series(tmp_path / "in", SeriesSpec(n_slices=2, rows=96, columns=96, pixel_spacing_mm=(2.0, 2.0),
                                             bits_stored=16, intercept=-1024))
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result = cli("simulate", tmp_path / "in", tmp_path / name, "--dose", "0.25", "--seed", seed,
                     "--views", "180", "--json", "--quiet", "--workers", "0")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["kind"] == "simulate" and summary["dose"] == 0.25  # numbers are numbers
        runs[name] = {z: ds.pixel_array for z, ds in _by_z(tmp_path / name).items()}
    assert all(np.array_equal(runs["a"][z], runs["b"][z]) for z in runs["a"])
    assert not all(np.array_equal(runs["a"][z], runs["c"][z]) for z in runs["a"])


@pytest.mark.parametrize("args, message", [
    (("--dose", "1.5"), "--dose"),
    (("--dose", "0"), "--dose"),
    (("--dose", "0.25", "--i0", "-3"), "--i0"),
    (("--dose", "0.25", "--views", "4"), "--views"),
])
def test_simulate_bad_options_exit_2(tmp_path, cli, args, message):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("simulate", tmp_path / "in", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_prepare_paired_mode_on_a_phantom(phantom_study, tmp_path, cli):
    [low] = (phantom_study / "dose25").iterdir()
    result = cli("prepare", tmp_path / "data", "--low", low, "--full", phantom_study / "full_dose",
                 "--quiet", "--split-by", "block", "--split", "0.34,0.33,0.33", "--gap", "0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    [case] = manifest["cases"]
    low_arr = np.load(tmp_path / "data" / "cases" / case["id"] / "low.npy")
    full_arr = np.load(tmp_path / "data" / "cases" / case["id"] / "full.npy")
    assert low_arr.shape == full_arr.shape == (3, 128, 128)
    assert not np.array_equal(low_arr, full_arr)
    assert [len(manifest["split"][s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_prepare_simulated_mode(tmp_path, cli):
    write_series(tmp_path / "fd" / "a", SeriesSpec(n_slices=2, rows=64, columns=64, pixel_spacing_mm=(3.0, 3.0),
                                                   series_description="A"))
    write_series(tmp_path / "fd" / "b", SeriesSpec(n_slices=2, rows=64, columns=64, pixel_spacing_mm=(3.0, 3.0),
                                                   series_description="B"))
    result = cli("prepare", tmp_path / "data", "--full", tmp_path / "fd", "--simulate-dose", "0.25",
                 "--split", "0.5,0.5,0", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["simulated"] and manifest["simulation"]["dose"] == "0.25"
    assert len(manifest["cases"]) == 2
    for case in manifest["cases"]:
        low = np.load(tmp_path / "data" / "cases" / case["id"] / "low.npy").astype(float)
        full = np.load(tmp_path / "data" / "cases" / case["id"] / "full.npy").astype(float)
        body = full > -500
        assert (low - full)[body].std() > 2  # noise was added (a small, 19 cm wide object) ...
        assert abs((low - full)[body].mean()) < 2  # ... without shifting HU


@pytest.mark.realdata
def test_prepare_simulated_mode_on_real_abdomen_slices(tmp_path, cli, shared_ct):
    """Scan-matched by default: a quarter of this scan's own dose adds sqrt(3) x its own noise."""
    import math

    from ldct_cli.physics import noise

    source = shared_ct / "philips_abdomen_rle_275"
    subset = tmp_path / "abdomen"
    subset.mkdir()
    # three slices from the middle along z (file names are not in z order)
    by_z = sorted(source.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                           .ImagePositionPatient[2]))
    for path in by_z[len(by_z) // 2 - 1:len(by_z) // 2 + 2]:
        shutil.copy(path, subset / path.name)
    result = cli("prepare", tmp_path / "data", "--full", subset, "--simulate-dose", "0.25", "--quiet",
                 "--device", "cpu", "--split", "1,0,0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    [case] = manifest["cases"]
    assert case["slices"] == 3 and (case["rows"], case["columns"]) == (512, 512)
    [details] = case["simulation"]
    assert details["i0"] == "matched" and details["recon_filter"].startswith("gauss:")
    assert len(details["i0_per_slice"]) == 3
    low = np.load(tmp_path / "data" / "cases" / case["id"] / "low.npy").astype(float)
    full = np.load(tmp_path / "data" / "cases" / case["id"] / "full.npy").astype(float)
    own_sd, _ = noise.series_noise_sd(list(full))
    for lo, fu in zip(low, full):
        stats, mask = noise.measure_slice(fu)
        # the matched statistic exactly; the SD as far as the fitted texture holds
        assert noise.noise_level(lo - fu, mask) == pytest.approx(math.sqrt(3) * stats.level_hu, rel=0.03)
        assert (lo - fu)[mask].std() == pytest.approx(math.sqrt(3) * own_sd, rel=0.15)
    window = lambda x: np.clip(x, -160, 240)
    psnr = 20 * np.log10(400 / np.sqrt(np.mean((window(low) - window(full)) ** 2)))
    print(f"real abdomen, scan-matched quarter dose: PSNR {psnr:.2f} dB in [-160, 240] (L=400), "
          f"own noise {own_sd:.1f} HU, {details['recon_filter']}")
    assert 24 <= psnr <= 28
