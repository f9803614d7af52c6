"""Bundled weights: the manifest, checksums, where an installed package finds them, the bar."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ldct_cli import bundled
from ldct_cli.errors import CheckpointError
from ldct_cli.models.registry import get_model_info, list_models

REPO = Path(__file__).resolve().parents[2]


def _entry(path: Path, model: str) -> dict:
    return {"file": path.name, "sha256": bundled.file_sha256(path), "bytes": path.stat().st_size,
            "model": model, "training": {"commands": ["ldct train ..."], "steps": 1, "minutes": 0.1,
                                         "hardware": "test"},
            "data": {"series": [{"folder": "synthetic"}]}, "held_out": []}


@pytest.fixture
def weights(tmp_path, checkpoints, monkeypatch):
    """A weights folder holding a random redcnn checkpoint and its manifest, in $LDCT_WEIGHTS_DIR."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copyfile(checkpoints["redcnn"], folder / "redcnn.safetensors")
    bundled.write_manifest({"redcnn": _entry(folder / "redcnn.safetensors", "redcnn")}, folder)
    monkeypatch.setenv("LDCT_WEIGHTS_DIR", str(folder))
    return folder


def test_listed_and_intact_weights_are_found(weights):
    assert bundled.weights_dir() == weights
    assert bundled.bundled_checkpoint("redcnn") == weights / "redcnn.safetensors"
    assert bundled.bundled_checkpoint("pix2pix") is None  # not listed: not bundled


def test_a_damaged_bundled_file_is_a_clear_error(weights):
    path = weights / "redcnn.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        bundled.bundled_checkpoint("redcnn")


def test_a_listed_but_missing_file_is_a_clear_error(weights):
    (weights / "redcnn.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        bundled.bundled_checkpoint("redcnn")


def test_a_malformed_manifest_is_a_clear_error(weights):
    (weights / bundled.MANIFEST).write_text('{"format": "something else", "weights": {}}')
    with pytest.raises(CheckpointError, match="bad weights manifest"):
        bundled.read_manifest()


def test_denoise_with_damaged_bundled_weights_fails_before_writing(weights, tmp_path, cli):
    from tests.synth import SeriesSpec, write_series

    path = weights / "redcnn.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "redcnn")
    assert result.exit_code == 2 and "checksum mismatch" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_installed_package_finds_its_weights_inside_itself(tmp_path, weights):
    """The wheel layout (pyproject maps weights/ to ldct_cli/weights): copy the package there."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "ldct_cli", site / "ldct_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(weights, site / "ldct_cli" / "weights")
    code = ("from ldct_cli.bundled import weights_dir, bundled_checkpoint; "
            "print(weights_dir()); print(bundled_checkpoint('redcnn'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "LDCT_WEIGHTS_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True).stdout.split()
    assert out == [str(site / "ldct_cli" / "weights"), str(site / "ldct_cli" / "weights" / "redcnn.safetensors")]


def test_pyproject_ships_the_weights_and_every_subpackage():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["ldct_cli.weights"] == "weights"
    assert {"*.safetensors", "manifest.json"} <= set(config["package-data"]["ldct_cli.weights"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ldct_cli").rglob("__init__.py")}
    on_disk |= {"ldct_cli.training.recipes", "ldct_cli.weights"}
    assert set(config["packages"]) == on_disk


def _rows(**model):
    low = {"psnr_db": 20.0, "ssim": 0.80, "noise_sd_hu": 80.0, "hu_bias": 0.0, "f_avg": 0.19}
    out = {"psnr_db": 23.5, "ssim": 0.84, "noise_sd_hu": 40.0, "hu_bias": -2.0, "f_avg": 0.15}
    out.update(model)
    return {"low dose": low, "m": out, "reference": {"noise_sd_hu": 45.0, "f_avg": 0.17}}


def test_quality_bar_for_an_mse_model():
    assert bundled.quality_bar(_rows(), "m", objective="mse", classical_psnr=22.0)["pass"]
    for change, failing in [({"psnr_db": 22.9}, "psnr_gain_db"), ({"ssim": 0.79}, "ssim_gain"),
                            ({"noise_sd_hu": 50.0}, "noise_reduction"), ({"hu_bias": 5.5}, "abs_hu_bias")]:
        bar = bundled.quality_bar(_rows(**change), "m", objective="mse", classical_psnr=22.0)
        assert not bar["pass"] and [k for k, c in bar["checks"].items() if not c["pass"]] == [failing]
    assert not bundled.quality_bar(_rows(), "m", objective="mse", classical_psnr=23.6)["pass"]
    # No classical row to compare with: the bar is not shown met.
    assert not bundled.quality_bar(_rows(), "m", objective="mse")["pass"]


def test_quality_bar_for_an_adversarial_model_compares_texture_with_the_mse_model():
    bar = bundled.quality_bar(_rows(f_avg=0.16), "m", objective="adversarial", mse_model_f_avg=0.13)
    assert bar["pass"]
    bar = bundled.quality_bar(_rows(f_avg=0.12), "m", objective="adversarial", mse_model_f_avg=0.13)
    assert not bar["checks"]["f_avg_closer_than_mse_model"]["pass"]
    assert not bundled.quality_bar(_rows(), "m", objective="adversarial")["pass"]


def _real_groups(out_psnr=(24.5, 32.0, 27.7), bias=1.0, ssim=0.74, low_psnr=(19.2, 28.0, 22.9)) -> dict:
    """Three real groups (the mayo_dev shape): input, best-swept filters, the model."""
    groups = {}
    for k, (low, nlm, out) in enumerate(zip(low_psnr, (23.9, 31.4, 27.1), out_psnr)):
        row = {"noise_sd_hu": 20.0, "f_avg": 0.2, "hu_bias": 0.0}
        groups[f"g{k + 1}"] = {"slices": 10, "rows": {
            "low dose": {**row, "psnr_db": low, "ssim": 0.68},
            "gaussian": {**row, "psnr_db": nlm - 0.5, "ssim": 0.70},
            "nlm": {**row, "psnr_db": nlm, "ssim": 0.72},
            "tv": {**row, "psnr_db": nlm - 0.3, "ssim": 0.71},
            "redcnn": {**row, "psnr_db": out, "ssim": ssim, "hu_bias": bias},
            "reference": {"noise_sd_hu": 10.0, "f_avg": 0.25}}}
    return groups


def _real_bar(**kwargs) -> dict:
    return bundled.real_data_bar({g: v["rows"] for g, v in _real_groups(**kwargs).items()}, "redcnn")


def test_real_data_bar_needs_every_group_above_the_best_nlm_and_a_mean_gain():
    bar = _real_bar()
    assert bar["pass"] and round(bar["checks"]["mean_psnr_gain_db"]["value"], 2) == 4.70
    # one group only 0.4 dB above its best NLM fails, although the mean gain is met
    missed = _real_bar(out_psnr=(24.3, 32.0, 27.7))
    assert not missed["pass"] and [k for k, c in missed["checks"].items() if not c["pass"]] == [
        "g1 psnr_over_best_nlm_db"]
    # every group 0.5 dB above NLM but the mean gain under 4.5 dB
    low_gain = _real_bar(out_psnr=(24.4, 31.9, 27.6), low_psnr=(19.5, 28.0, 23.0))  # mean gain 4.47
    assert [k for k, c in low_gain["checks"].items() if not c["pass"]] == ["mean_psnr_gain_db"]
    assert not _real_bar(ssim=0.71)["pass"]  # under the best classical SSIM (NLM's 0.72)
    assert not _real_bar(bias=-5.5)["pass"]
    groups = _real_groups()
    del groups["g2"]["rows"]["nlm"]  # a comparison row missing fails its check, never passes
    assert not bundled.real_data_bar({g: v["rows"] for g, v in groups.items()}, "redcnn")["pass"]


def test_meets_bar_needs_the_real_data_bar_and_the_held_out_one():
    rows = {"low dose": {"psnr_db": 20.0, "ssim": 0.8, "noise_sd_hu": 80.0, "hu_bias": 0.0, "f_avg": 0.19},
            "redcnn": {"psnr_db": 23.5, "ssim": 0.84, "noise_sd_hu": 40.0, "hu_bias": -1.0, "f_avg": 0.14},
            "reference": {"noise_sd_hu": 45.0, "f_avg": 0.17}}
    held = [{"name": "block", "series": "s", "rows": rows,
             "bar": bundled.quality_bar(rows, "redcnn", objective="mse", classical_psnr=21.0)}]

    def entry(**record):
        return bundled.BundledWeights("redcnn", "f", "x", record)

    assert entry().meets_bar is None  # nothing scored (a feature extractor)
    assert entry(held_out=held).meets_bar is False  # the simulated held-out bar alone is not enough
    assert entry(held_out=held, real_data={"name": "m", "bar": _real_bar()}).meets_bar is True
    failing = entry(held_out=held, real_data={"name": "m", "bar": _real_bar(out_psnr=(24.3, 32.0, 27.7))})
    assert failing.meets_bar is False and failing.failed_checks() == ["m: g1 psnr_over_best_nlm_db 0.4"]


def test_models_lists_bundled_weights_with_training_data(weights, cli):
    listed = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)}
    assert listed["redcnn"]["bundled_weights"] == str(weights / "redcnn.safetensors")
    assert listed["redcnn"]["bundled"]["data"]["series"] == [{"folder": "synthetic"}]
    assert listed["pix2pix"]["bundled"] is None
    assert json.loads(cli("models", "redcnn", "--json").stdout)["name"] == "redcnn"  # one, not a list
    text = cli("models", "redcnn").stdout
    assert "redcnn.safetensors" in text and "trained on: synthetic" in text


def test_models_is_a_table_of_80_columns_with_details_by_name(weights, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    entry = bundled.read_manifest(weights)["redcnn"].record
    rows = {"low dose": {"psnr_db": 20.0, "ssim": 0.8, "noise_sd_hu": 80.0, "hu_bias": 0.0, "f_avg": 0.19},
            "redcnn": {"psnr_db": 23.5, "ssim": 0.84, "noise_sd_hu": 40.0, "hu_bias": -1.0, "f_avg": 0.14},
            "reference": {"noise_sd_hu": 45.0, "f_avg": 0.17}}
    entry["held_out"] = [{"name": "block", "series": "s", "rows": rows,
                          "bar": bundled.quality_bar(rows, "redcnn", objective="mse", classical_psnr=21.0)}]
    groups = _real_groups(out_psnr=(24.5, 32.0, 27.7))
    entry["real_data"] = {"name": "mayo", "groups": groups,
                          "bar": bundled.real_data_bar({g: v["rows"] for g, v in groups.items()}, "redcnn")}
    bundled.write_manifest({"redcnn": entry}, weights)
    result = cli("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    by_name = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
               list_models(None)}
    assert list(by_name) == list_models(None)  # one row each, in the registry's order
    assert by_name["redcnn"][1:] == ["generator", "yes", "+4.70", "+3.50", "met"]
    assert by_name["pix2pix"][1:3] == ["generator", "no"]
    assert by_name["nlm"][1:4] == ["classical", "no", "weights"]
    assert "paper:" not in result.stdout and "details: ldct models NAME" in " ".join(result.stdout.split())
    detail = cli("models", "redcnn").stdout
    detail = " ".join(detail.split())
    assert "paper: H. Chen" in detail and "held out, block (s): PSNR 23.50 dB (+3.50)" in detail
    assert ("real data, mayo (g1, 10 slices): PSNR 24.50 dB (input 19.20, +5.30; best NLM 23.90), "
            "SSIM 0.740 (best classical 0.720)") in detail and "real-data bar met" in detail
    unknown = cli("models", "nope")
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.stderr


def test_models_names_every_simulated_dose_trained_on(weights, cli):
    entry = bundled.read_manifest(weights)["redcnn"].record
    lines = {}
    for doses in ([0.25], [0.25, 0.1, 0.5]):
        entry["data"].update(simulated_dose=doses[0], simulated_doses=doses, i0=48000.0)
        bundled.write_manifest({"redcnn": entry}, weights)
        lines[len(doses)] = " ".join(cli("models", "redcnn").stdout.split())  # one line, however wrapped
    assert "), simulated dose 0.25 (I0 48000) " in lines[1]
    assert "), simulated doses 0.25, 0.1, 0.5 (I0 48000; validated at 0.25) " in lines[3]


def test_weights_that_miss_the_bar_are_flagged_as_a_preview(weights, tmp_path, cli):
    from tests.synth import SeriesSpec, write_series

    entries = {n: e.record for n, e in bundled.read_manifest(weights).items()}
    rows = {"low dose": {"psnr_db": 20.0, "ssim": 0.8, "noise_sd_hu": 80.0, "hu_bias": 0.0, "f_avg": 0.19},
            "redcnn": {"psnr_db": 22.5, "ssim": 0.84, "noise_sd_hu": 44.0, "hu_bias": -1.0, "f_avg": 0.14},
            "reference": {"noise_sd_hu": 45.0, "f_avg": 0.17}}
    entries["redcnn"]["held_out"] = [{"name": "block", "series": "s", "rows": rows,
                                      "bar": bundled.quality_bar(rows, "redcnn", objective="mse",
                                                                 classical_psnr=21.0)}]
    bundled.write_manifest(entries, weights)
    assert bundled.read_manifest(weights)["redcnn"].meets_bar is False
    assert bundled.read_manifest(weights)["redcnn"].failed_checks() == ["real data: not scored",
                                                                        "block: psnr_gain_db 2.5"]
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "redcnn", "--quiet")
    assert result.exit_code == 0
    assert "warning: the bundled redcnn weights are a preview" in result.stderr
    assert "quality bar NOT met: psnr_gain_db" in " ".join(cli("models", "redcnn").stdout.split())
    assert "NOT met" in cli("models").stdout  # the table says so too


def test_models_reports_a_damaged_bundled_file_and_fails(weights, cli):
    (weights / "redcnn.safetensors").write_bytes(b"not the file")
    result = cli("models")
    assert result.exit_code == 1 and "checksum mismatch" in result.stderr


# --- the real bundled weights of this checkout --------------------------------------------

MANIFEST = bundled.read_manifest(REPO / "weights")


def test_the_bundled_manifest_lists_every_file_and_nothing_else():
    files = {p.name for p in (REPO / "weights").glob("*.safetensors")}
    assert files == {entry.file for entry in MANIFEST.values()}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_each_bundled_checkpoint_is_intact_documented_and_made_by_ldct_train(name):
    from ldct_cli.checkpoint import load_checkpoint

    entry = MANIFEST[name]
    path = bundled.bundled_checkpoint(name, REPO / "weights")
    model, info = load_checkpoint(path)
    record = entry.record
    assert info.model == name == record["model"] and info.model_kwargs == record["model_kwargs"]
    assert info.tensors_sha256 == record["tensors_sha256"]
    assert info.config["model"] == name and info.training["step"] > 0  # written by ldct train
    assert path.stat().st_size < 50e6  # small enough for git
    training = record["training"]
    assert any(c.startswith("ldct train") for c in training["commands"])
    assert training["steps"] > 0 and training["minutes"] > 0
    for series in record["data"]["series"]:
        assert series["source"] and series["licence"] and series["scanner"]
    assert record["data"]["simulated_dose"] and record["data"]["i0"]
    if get_model_info(name).kind == "generator":
        # Every bundled denoiser was scored on held-out real CT, the bar checked from those
        # numbers; one that misses it is a preview, and ldct denoise / models say so.
        assert record["held_out"], f"{name}: no held-out scores"
        for test in record["held_out"]:
            rows = test["rows"]
            assert {"low dose", name, "reference"} <= set(rows)
            recheck = bundled.quality_bar(rows, name, objective=get_model_info(name).objective,
                                          classical_psnr=max((rows[f]["psnr_db"] for f in ("gaussian", "nlm", "tv")),
                                                             default=None))
            if get_model_info(name).objective == "mse":
                assert recheck == test["bar"]
        # ... and on real quarter-dose scans it never saw: the bar recomputed from the rows
        real = record.get("real_data")
        assert real and real["groups"], f"{name}: no real-data scores (tools/bundle_weights.py --real)"
        assert real["bar"] == bundled.real_data_bar({g: v["rows"] for g, v in real["groups"].items()}, name)
        assert entry.meets_bar is not None


def test_bundled_generators_are_registered_generators():
    for name in MANIFEST:
        assert name in list_models(None)


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if get_model_info(n).kind == "generator"))
def test_denoise_with_each_bundled_model_needs_no_other_argument(name, tmp_path, cli, monkeypatch):
    """`ldct denoise in/ out/ --model NAME`, the real bundled weights, a synthetic noisy series."""
    import numpy as np
    import pydicom

    from tests.synth import SeriesSpec, write_series

    monkeypatch.delenv("LDCT_WEIGHTS_DIR", raising=False)
    write_series(tmp_path / "in", SeriesSpec(n_slices=2, rows=128, columns=128))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", name, "--quiet")
    assert result.exit_code == 0, result.stderr
    files = sorted((tmp_path / "out").glob("*/*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert name in ds.SeriesDescription or name in str(ds.get("DerivationDescription", ""))
    assert np.isfinite(ds.pixel_array).all()
