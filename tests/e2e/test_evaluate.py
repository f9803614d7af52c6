"""``ldct evaluate`` end to end on a phantom study: reference, reference-free and dataset modes."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def study(tmp_path_factory, checkpoints):
    """A phantom with its quarter dose, and the quarter dose 'denoised' two ways:
    by a WGAN-VGG checkpoint, and with --blend 1 (which must score exactly like the input)."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    root = tmp_path_factory.mktemp("evaluate")
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    result = run("phantom", root / "ph", "--slices", "4", "--size", "128", "--pixel-mm", "2.8",
                 "--dose", "0.25", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    [low] = (root / "ph" / "dose25").iterdir()
    for name, extra in (("wgan", ()), ("copy", ("--blend", "1"))):
        result = run("denoise", low, root / name, "--weights", checkpoints["wgan_vgg"], "--workers", "0",
                     "--quiet", *extra)
        assert result.exit_code == 0, result.output
    return {"root": root, "full": root / "ph" / "full_dose", "low": low,
            "wgan": next((root / "wgan").iterdir()), "copy": next((root / "copy").iterdir())}


def _run(cli, *args):
    result = cli("evaluate", *args)
    assert result.exit_code == 0, result.output
    return result


def test_reference_mode_scores_tables_and_pictures(study, cli, tmp_path):
    report_dir = tmp_path / "report"
    result = _run(cli, "--reference", study["full"], study["low"], study["wgan"], study["copy"],
                  "--label", "low dose", "--label", "wgan", "--label", "copy", "--out", report_dir,
                  "--device", "cpu", "--roi-size", "8")
    assert "L = 400" in result.stdout and "PSNR" in result.stdout
    for name in ("scores.json", "scores_per_series.csv", "scores_per_slice.csv", "nps.png", "psnr_z.png",
                 "report.html"):
        assert (report_dir / name).is_file(), name
    assert list(report_dir.glob("montage_*.png"))
    report = json.loads((report_dir / "scores.json").read_text())
    settings = report["settings"]
    assert settings["window_hu"] == [-160, 240] and settings["data_range_L"] == 400
    assert "Gaussian 11x11" in settings["ssim_variant"]
    by_label = {s["label"]: s for s in report["series"] if s["role"] == "test"}
    assert set(by_label) == {"low dose", "wgan", "copy"}
    # The reference's own noise and NPS, in the same ROIs, for the physicist to compare with.
    [ref] = [s for s in report["series"] if s["role"] == "reference"]
    assert ref["label"].endswith("(reference)") and len(ref["per_slice"]) == 4
    assert "psnr_db" not in ref["summary"] and "hu_bias" not in ref["summary"]
    assert ref["summary"]["noise_sd_hu"]["mean"] < 0.8 * by_label["low dose"]["summary"]["noise_sd_hu"]["mean"]
    assert 0 < ref["summary"]["f_avg"] and ref["nps"] is not None
    low, copy = by_label["low dose"]["summary"], by_label["copy"]["summary"]
    # --blend 1 wrote the input's pixels: every score is the input's
    for key in ("psnr_db", "ssim", "rmse_hu"):
        assert copy[key]["mean"] == pytest.approx(low[key]["mean"], abs=1e-9), key
    assert len(by_label["low dose"]["per_slice"]) == 4
    assert 10 < low["psnr_db"]["mean"] < 40 and 0 < low["ssim"]["mean"] < 1
    with open(report_dir / "scores_per_series.csv") as handle:
        lines = list(csv.reader(handle))
    assert lines[0][0] == "series" and len(lines) == 5  # a header line, then a row per series
    [reference_row] = [row for row in lines if row[0].endswith("(reference)")]
    assert reference_row[lines[0].index("psnr_db_mean")] == ""
    html = (report_dir / "report.html").read_text()
    assert "data:image/png;base64" in html and "wgan" in html


def test_reference_against_itself_is_perfect(study, cli):
    result = _run(cli, "--reference", study["full"], study["full"], "--json", "--device", "cpu")
    [series] = [s for s in json.loads(result.stdout)["series"] if s["role"] == "test"]
    for row in series["per_slice"]:
        assert row["psnr_db"] == float("inf") and row["ssim"] == pytest.approx(1.0) and row["rmse_hu"] == 0


def test_reference_free_mode_pairs_each_output_with_its_source(study, cli):
    result = _run(cli, study["low"], study["wgan"], "--json", "--device", "cpu", "--roi-size", "8")
    report = json.loads(result.stdout)
    by_label = {s["label"]: s for s in report["series"]}
    assert report["settings"]["mode"] == "reference-free"
    [denoised] = [s for s in report["series"] if s["against"]]
    assert denoised["against"] == [s["label"] for s in report["series"] if not s["against"]][0]
    assert "psnr_db" not in denoised["summary"] and "hu_bias" in denoised["summary"]
    assert len(by_label) == 2


def test_custom_window_and_bad_window(study, cli):
    result = _run(cli, "--reference", study["full"], study["low"], "--window", "-1000,1000", "--json",
                  "--device", "cpu")
    assert json.loads(result.stdout)["settings"]["data_range_L"] == 2000
    bad = cli("evaluate", "--reference", study["full"], study["low"], "--window", "nope")
    assert bad.exit_code == 2


def test_dataset_mode_runs_models_on_the_test_split(study, cli, tmp_path, checkpoints):
    assert cli("prepare", tmp_path / "data", "--low", study["low"], "--full", study["full"], "--quiet",
               "--split-by", "block", "--split", "0.5,0,0.5", "--gap", "0").exit_code == 0
    result = _run(cli, "--data", tmp_path / "data", "--split", "test", "--weights", checkpoints["wgan_vgg"],
                  "--model", "nlm", "--json", "--device", "cpu", "--roi-size", "8")
    report = json.loads(result.stdout)
    tests = [s for s in report["series"] if s["role"] == "test"]
    labels = [s["label"] for s in tests]
    assert labels[0] == "low dose" and labels[1] == "nlm" and labels[2].startswith("wgan_vgg")
    assert len(labels) == 3
    # The classical baseline denoises: less noise than the quarter dose it was given.
    noise = {s["label"]: s["summary"]["noise_sd_hu"]["mean"] for s in tests}
    assert noise["nlm"] < 0.8 * noise["low dose"]
    assert all(len(s["per_slice"]) == 2 for s in report["series"])
    assert all(s["against"] == "full dose" for s in tests)
    assert [s["label"] for s in report["series"] if s["role"] == "reference"] == ["full dose (reference)"]
    # Two runs whose files share a name keep a row each.
    twin = tmp_path / "elsewhere" / checkpoints["wgan_vgg"].name
    twin.parent.mkdir()
    shutil.copy(checkpoints["wgan_vgg"], twin)
    both = json.loads(_run(cli, "--data", tmp_path / "data", "--weights", checkpoints["wgan_vgg"], "--weights",
                           twin, "--json", "--device", "cpu", "--roi-size", "8").stdout)
    rows = [s["label"] for s in both["series"] if s["role"] == "test"]
    assert len(rows) == 3 and len(set(rows)) == 3 and str(twin) in rows[2]


def test_dataset_mode_every_nth_slice(study, cli, tmp_path):
    assert cli("prepare", tmp_path / "data", "--low", study["low"], "--full", study["full"], "--quiet",
               "--split-by", "block", "--split", "1,0,0", "--gap", "0").exit_code == 0

    def scored(*extra):
        report = json.loads(_run(cli, "--data", tmp_path / "data", "--split", "train", "--model", "nlm",
                                 "--json", "--device", "cpu", "--roi-size", "8", *extra).stdout)
        return {s["label"]: s["per_slice"] for s in report["series"]}
    every, each = scored("--every", "3"), scored()
    assert len(each["low dose"]) == 4 and len(every["low dose"]) == 2
    for label in ("low dose", "nlm"):
        # slices 0 and 3 of the split, so numbered, with the very scores the whole split gives them
        assert every[label] == [each[label][0], each[label][3]], label
    zero = cli("evaluate", "--data", tmp_path / "data", "--split", "train", "--every", "0")
    without_data = cli("evaluate", "--reference", study["full"], study["low"], "--every", "2")
    for result in (zero, without_data):
        assert result.exit_code == 2 and "--every" in result.output


def test_roi_file_gives_fixed_rois_and_cnr(study, cli, tmp_path):
    from ldct_cli.phantom import PhantomSpec, structure_masks

    # liver against the air corner, located on the phantom's own masks (128 px, 2.8 mm pixels)
    masks = structure_masks(PhantomSpec(size=128, n_slices=4, pixel_mm=2.8), 2)
    liver = np.argwhere(masks["liver"])
    r, c = liver[len(liver) // 2]
    rois = {"roi_px": 4, "uniform": [[int(r) - 2, int(c) - 2]],
            "cnr": [{"name": "liver_vs_air", "a": [int(r) - 2, int(c) - 2], "b": [2, 2]}]}
    path = tmp_path / "rois.json"
    path.write_text(json.dumps(rois))
    result = _run(cli, "--reference", study["full"], study["low"], "--roi-file", path, "--json", "--device", "cpu")
    report = json.loads(result.stdout)
    [series] = [s for s in report["series"] if s["role"] == "test"]
    assert "cnr_liver_vs_air" in series["summary"] and "liver_vs_air" in report["settings"]["cnr"]
    assert report["settings"]["roi_selection"].startswith("given by the user")
    # liver (~100 HU) against air (-1000 HU) with ~40 HU of noise: a large contrast-to-noise ratio
    assert all(row["cnr_liver_vs_air"] > 5 for row in series["per_slice"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli("evaluate", "--reference", study["full"], study["low"], "--roi-file", bad).exit_code == 2


def test_montage_at_chosen_positions(study, cli, tmp_path):
    _run(cli, "--reference", study["full"], study["low"], "--out", tmp_path / "r", "--montage-z", "-3,-6",
         "--device", "cpu", "--roi-size", "8")
    from matplotlib.image import imread

    [montage] = (tmp_path / "r").glob("montage_*.png")
    two_rows = imread(montage).shape[0]
    _run(cli, "--reference", study["full"], study["low"], "--out", tmp_path / "s", "--montage-slices", "3",
         "--device", "cpu", "--roi-size", "8")
    [montage] = (tmp_path / "s").glob("montage_*.png")
    three_rows = imread(montage).shape[0]
    assert two_rows < three_rows  # one row per asked position
    assert cli("evaluate", "--reference", study["full"], study["low"], "--montage-z", "x").exit_code == 2


def test_csv_holds_numbers_in_columns_of_their_own(study, cli, tmp_path):
    result = _run(cli, "--reference", study["full"], study["low"], study["wgan"], "--label", "low dose",
                  "--label", "wgan", "--out", tmp_path / "r", "--device", "cpu", "--roi-size", "8", "--json")
    report = json.loads(result.stdout)
    with open(tmp_path / "r" / "scores_per_series.csv", newline="") as handle:
        rows = {row["series"]: row for row in csv.DictReader(handle)}  # the first line is the header
    summary = {s["label"]: s["summary"] for s in report["series"]}
    assert set(rows) == set(summary)
    for label in ("low dose", "wgan"):
        for key in ("psnr_db", "ssim", "rmse_hu", "noise_sd_hu", "hu_bias"):
            assert float(rows[label][f"{key}_mean"]) == pytest.approx(summary[label][key]["mean"], rel=1e-9)
            assert float(rows[label][f"{key}_sd"]) == pytest.approx(summary[label][key]["sd"], rel=1e-9)
        assert float(rows[label]["nps_f_avg_per_mm"]) == pytest.approx(summary[label]["f_avg"])
        assert rows[label]["role"] == "test" and int(rows[label]["slices"]) == 4
    with open(tmp_path / "r" / "scores_per_slice.csv", newline="") as handle:
        per_slice = list(csv.DictReader(handle))
    assert len(per_slice) == 3 * 4 and list(per_slice[0])[:3] == ["series", "slice", "z_mm"]
    for name in ("scores_per_series.csv", "scores_per_slice.csv"):
        text = (tmp_path / "r" / name).read_text()
        assert "±" not in text and not text.startswith(("#", '"#'))
    # what the numbers depend on is in the JSON report instead
    settings = json.loads((tmp_path / "r" / "scores.json").read_text())["settings"]
    assert settings["window_hu"] == [-160, 240] and settings["device"] == "cpu" and "ssim_variant" in settings


def test_terminal_table_fits_80_columns_and_wide_shows_every_column(study, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    args = ("--reference", study["full"], study["low"], study["wgan"], "--label", "low dose [ld]",
            "--label", "wgan", "--device", "cpu", "--roi-size", "8")
    report = json.loads(_run(cli, *args, "--json").stdout)
    text = _run(cli, *args).stdout
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "[ld]" in text  # a label is text, never rich markup
    assert "PSNR (dB)" in text and "RMSE" not in text and "--wide" in text
    for series in report["series"]:
        if series["role"] == "test":
            psnr, ssim = series["summary"]["psnr_db"], series["summary"]["ssim"]
            assert f"{psnr['mean']:.2f}±{psnr['sd']:.2f}" in text  # numbers whole, on one line
            assert f"{ssim['mean']:.4f}±{ssim['sd']:.4f}" in text
    header = next(line for line in text.splitlines() if "series" in line)
    row = next(line for line in text.splitlines() if line.strip().startswith("wgan"))
    # right-aligned: a number ends where its column's header ends
    assert row.rstrip().endswith(f"{report['series'][1]['summary']['f_avg']:.3f}")
    assert len(row.rstrip()) == len(header.rstrip())
    wide = _run(cli, *args, "--wide").stdout
    assert "RMSE" in " ".join(wide.split()) and "f_peak" in wide and "slices" in wide


def test_reference_free_montage_shows_each_residual(study, cli, tmp_path):
    from matplotlib.image import imread

    from ldct_cli.report import DPI, PANEL_INCHES

    _run(cli, study["low"], study["wgan"], "--out", tmp_path / "r", "--device", "cpu", "--roi-size", "8")
    [montage] = (tmp_path / "r").glob("montage_*.png")
    # the low dose, the denoised series and |low dose - denoised| side by side
    assert imread(montage).shape[1] == 3 * PANEL_INCHES * DPI
