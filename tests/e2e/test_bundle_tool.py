"""The maintainers' bundle tool scores weights on real quarter/full-dose groups and records
the real-data bar in the manifest, which `ldct models` then reports (synthetic groups here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ldct_cli import bundled
from tests.synth import SeriesSpec, write_series

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("bundle_weights", REPO / "tools" / "bundle_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _group(root: Path, name: str, noise_hu: float, seed: int) -> None:
    """GROUP/FD, and GROUP/QD: the same slices with Gaussian noise, another series."""
    full = write_series(root / name / "FD", SeriesSpec(rows=160, columns=160, n_slices=3))
    rng = np.random.default_rng(seed)
    series_uid = generate_uid()
    (root / name / "QD").mkdir()
    for path in full:
        ds = pydicom.dcmread(path)
        noisy = ds.pixel_array.astype(np.float64) + rng.normal(0, noise_hu, ds.pixel_array.shape)
        ds.PixelData = np.clip(np.round(noisy), -2048, 2047).astype(ds.pixel_array.dtype).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(root / name / "QD" / path.name)


@pytest.fixture
def real_root(tmp_path):
    root = tmp_path / "real"
    _group(root, "A_sharp", 60.0, 1)
    _group(root, "B_smooth", 25.0, 2)
    return root


def test_real_only_scores_the_bundled_weights_and_records_the_bar(tmp_path, real_root, checkpoints,
                                                                  monkeypatch, cli):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copyfile(checkpoints["redcnn"], folder / "redcnn.safetensors")
    held_rows = {"low dose": {"psnr_db": 20.0, "ssim": 0.7, "noise_sd_hu": 40.0, "hu_bias": 0.0, "f_avg": 0.1},
                 "redcnn": {"psnr_db": 24.0, "ssim": 0.8, "noise_sd_hu": 15.0, "hu_bias": 1.0, "f_avg": 0.1},
                 "reference": {"noise_sd_hu": 10.0, "hu_bias": 0.0, "f_avg": 0.1}}
    entry = {"file": "redcnn.safetensors", "sha256": bundled.file_sha256(folder / "redcnn.safetensors"),
             "model": "redcnn", "held_out": [{"name": "block", "series": "s", "rows": held_rows,
                                              "bar": bundled.quality_bar(held_rows, "redcnn", objective="mse",
                                                                         classical_psnr=21.0)}]}
    bundled.write_manifest({"redcnn": entry}, folder)
    assert _tool().main(["redcnn", "--real-only", "--real", str(real_root), "--weights-dir", str(folder)]) == 0

    record = bundled.read_manifest(folder)["redcnn"]
    real = record.record["real_data"]
    assert set(real["groups"]) == {"A_sharp", "B_smooth"}
    for group in real["groups"].values():
        rows = group["rows"]
        assert group["slices"] == 3
        assert {"low dose", "redcnn", "gaussian", "nlm", "tv", "nlm auto", "reference"} <= set(rows)
        # the swept filters are at their best strength: they gain over the noisy input
        assert rows["nlm"]["psnr_db"] > rows["low dose"]["psnr_db"]
    assert real["bar"] == bundled.real_data_bar({g: v["rows"] for g, v in real["groups"].items()}, "redcnn")
    # a random checkpoint cannot meet the bar: the weights are reported as a preview
    assert record.meets_bar is False and any(m.startswith("real: ") for m in record.failed_checks())
    assert record.record["sha256"] == entry["sha256"] and record.record["held_out"] == entry["held_out"]

    monkeypatch.setenv("LDCT_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("COLUMNS", "100")
    shown = cli("models", "redcnn")
    assert shown.exit_code == 0 and "real data, real (A_sharp" in " ".join(shown.stdout.split())
    assert "NOT met" in shown.stdout
    listed = json.loads(cli("models", "--json").stdout)
    assert next(r for r in listed if r["name"] == "redcnn")["meets_bar"] is False
