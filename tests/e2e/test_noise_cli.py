"""``ldct noise``: the noise a series shows, as a table, JSON and an NPS picture (in-process CLI)."""

from __future__ import annotations

import json

import pytest

from tests.synth import SeriesSpec, write_series


@pytest.fixture
def study(tmp_path):
    # the synthetic phantom carries white noise of SD 20 HU (tests/synth.py)
    write_series(tmp_path / "in" / "a", SeriesSpec(n_slices=3, rows=256, columns=256, series_description="A"))
    write_series(tmp_path / "in" / "b", SeriesSpec(n_slices=2, rows=256, columns=256, series_number=5,
                                                   series_description="B", seed=4))
    return tmp_path / "in"


def test_noise_json_reports_each_series(study, cli, tmp_path):
    result = cli("noise", study, "--json", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["series"]) == 2 and payload["failed_files"] == []
    for series in payload["series"]:
        assert series["error"] is None and series["measured"] == series["slices"]
        assert series["noise_sd_hu"] == pytest.approx(20, rel=0.1)  # white noise, 20 HU
        assert series["recon_filter"].startswith("gauss:") and series["nps_f_avg_mm"] > 0
        assert len(series["rows"]) == series["slices"]
        assert all(row["noise_sd_hu"] == pytest.approx(20, rel=0.15) for row in series["rows"])
    assert json.loads((tmp_path / "report" / "noise.json").read_text()) == payload
    assert (tmp_path / "report" / "nps.png").stat().st_size > 1000


def test_noise_table_fits_80_columns(study, cli):
    result = cli("noise", study, "--per-slice", "--quiet")
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    assert "a" in result.stdout and "gauss:" in result.stdout and "…" not in result.stdout


def test_noise_every_and_errors(study, cli, tmp_path):
    result = cli("noise", study / "a", "--every", "2", "--json")
    assert result.exit_code == 0
    [series] = json.loads(result.stdout)["series"]
    assert [row["index"] for row in series["rows"]] == [0, 2]
    assert cli("noise", tmp_path / "nope").exit_code == 2
    assert cli("noise", study, "--every", "0").exit_code == 2
    inside = cli("noise", study, "--out", study / "a" / "report")
    assert inside.exit_code == 2 and "inside the input" in inside.stderr
    assert not (study / "a" / "report").exists()


def test_noise_says_when_nothing_is_measurable(tmp_path, cli):
    write_series(tmp_path / "small", SeriesSpec(n_slices=2, rows=32, columns=32))  # too few tissue pixels
    result = cli("noise", tmp_path / "small", "--json")
    assert result.exit_code == 1
    [series] = json.loads(result.stdout)["series"]
    assert series["noise_sd_hu"] is None and "enough soft tissue" in series["error"]


def _first_file(folder):
    import pydicom

    return pydicom.dcmread(sorted(p for p in folder.rglob("*") if p.is_file())[0])


def test_simulate_is_scan_matched_by_default(study, cli, tmp_path):
    result = cli("simulate", study / "a", tmp_path / "sim", "--dose", "0.25", "--json", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["i0"] == "matched" and payload["recon_filter"] == "fitted"
    [series] = payload["series"]
    measured = series["measured"]
    assert measured["i0"] == "matched" and measured["recon_filter"].startswith("gauss:")
    assert len(measured["i0_per_slice"]) == 3 and measured["noise_level_hu"] > 0
    ds = _first_file(tmp_path / "sim")
    assert "I0 per slice matched" in ds.DerivationDescription
    assert f"fitted window {measured['recon_filter']}" in ds.DerivationDescription

    fixed = cli("simulate", study / "a", tmp_path / "fixed", "--dose", "0.25", "--i0", "1e5", "--filter", "hann",
                "--json", "--quiet", "--device", "cpu")
    assert fixed.exit_code == 0, fixed.output
    payload = json.loads(fixed.stdout)
    assert payload["i0"] == 100000.0 and payload["recon_filter"] == "hann"
    assert payload["series"][0]["measured"] is None
    ds_fixed = _first_file(tmp_path / "fixed")
    assert "I0 1e+05 photons/ray" in ds_fixed.DerivationDescription
    assert ds_fixed.SeriesInstanceUID != ds.SeriesInstanceUID

    bad = cli("simulate", study / "a", tmp_path / "bad", "--dose", "0.25", "--filter", "gauss:abc")
    assert bad.exit_code == 2 and "TAU must be a number" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_nlm_strength_follows_each_series_noise(tmp_path, cli):
    from tests.synth import SeriesSpec, write_series

    write_series(tmp_path / "in" / "a", SeriesSpec(n_slices=2, rows=256, columns=256, series_description="A"))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "nlm", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["strength_hu"] == "auto"
    [series] = payload["series"]
    measured = series["measured"]
    assert measured["noise_sd_hu"] == pytest.approx(20, rel=0.1)
    assert measured["strength_hu"] == pytest.approx(0.9 * measured["noise_sd_hu"], abs=0.1)
    ds = _first_file(tmp_path / "out")
    assert f"h {measured['strength_hu']:g} HU = 0.9 x the series' measured noise SD" in ds.DerivationDescription

    fixed = cli("denoise", tmp_path / "in", tmp_path / "fixed", "--model", "nlm", "--strength", "35", "--json",
                "--quiet")
    payload = json.loads(fixed.stdout)
    assert payload["strength_hu"] == 35.0 and payload["series"][0]["measured"] is None


def test_prepare_spreads_textures_around_each_scans_own(study, cli, tmp_path):
    result = cli("prepare", tmp_path / "data", "--full", study / "a", "--simulate-dose", "0.1,0.25",
                 "--realizations", "3", "--texture-spread", "0,-1,2", "--quiet", "--device", "cpu",
                 "--split-by", "block", "--split", "0.34,0.33,0.33", "--gap", "0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["low_doses"] == [0.1, 0.25] * 3
    assert manifest["simulation"]["texture_offsets"] == [0, 0, -1, -1, 2, 2]
    [case] = manifest["cases"]
    details = case["simulation"]
    assert [d["texture_offset"] for d in details] == [0, 0, -1, -1, 2, 2]
    fitted = details[0]["texture"]["tau"]
    from ldct_cli.physics.projector import check_filter

    for d in details:  # one measurement of the scan, windows shifted around it
        assert d["texture"]["tau"] == fitted
        assert check_filter(d["recon_filter"]) == pytest.approx(fitted + d["texture_offset"], abs=0.01)


@pytest.mark.parametrize("args, message", [
    (("--realizations", "2", "--texture-spread", "0,-1,2"), "need --realizations 3"),
    (("--texture-spread", "0,x"), "TAU offsets separated by commas"),
    (("--texture-spread", "0,-1", "--realizations", "2", "--filter", "hann"), "leave --filter out"),
])
def test_prepare_texture_spread_errors(study, cli, tmp_path, args, message):
    result = cli("prepare", tmp_path / "data", "--full", study / "a", "--simulate-dose", "0.25", *args,
                 "--quiet", "--device", "cpu")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "data").exists()


def test_simulate_texture_offset(study, cli, tmp_path):
    result = cli("simulate", study / "a", tmp_path / "sim", "--dose", "0.25", "--texture-offset", "-1",
                 "--json", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["series"][0]["measured"]
    assert measured["texture_offset"] == -1
    assert "shifted by TAU -1 to" in _first_file(tmp_path / "sim").DerivationDescription
    bad = cli("simulate", study / "a", tmp_path / "bad", "--dose", "0.25", "--texture-offset", "1", "--filter", "hann")
    assert bad.exit_code == 2 and "leave --filter out" in bad.stderr
