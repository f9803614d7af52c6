"""`make demo` (tools/demo.sh): phantom, quarter dose, every bundled model, evaluation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldct_cli import bundled

REPO = Path(__file__).resolve().parents[2]


def _demo(tmp_path, weights: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "LDCT": f"{sys.executable} -m ldct_cli", "PYTHON": sys.executable,
               "DEMO_OUT": str(tmp_path / "demo"), "DEMO_SLICES": "2", "DEMO_SIZE": "128", "LDCT_WEIGHTS_DIR": str(weights),
               **env}
    return subprocess.run(["bash", str(REPO / "tools" / "demo.sh")], capture_output=True, text=True,
                          env=environ, cwd=REPO)


@pytest.mark.slow
def test_demo_denoises_with_every_bundled_model_and_scores_them(tmp_path, checkpoints):
    weights = tmp_path / "weights"
    weights.mkdir()
    entries = {}
    for name in ("redcnn", "wgan_vgg"):
        shutil.copyfile(checkpoints[name], weights / f"{name}.safetensors")
        path = weights / f"{name}.safetensors"
        entries[name] = {"file": path.name, "sha256": bundled.file_sha256(path), "model": name}
    bundled.write_manifest(entries, weights)
    result = _demo(tmp_path, weights)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo"
    for name in ("redcnn", "wgan_vgg"):
        assert f"--model {name}" in result.stderr
        assert len(list((out / "denoised" / name).glob("*/*.dcm"))) == 2
        assert name in result.stdout  # a row of the printed table
    assert "quarter" in result.stdout and "pictures:" in result.stdout
    assert (out / "report" / "nps.png").is_file() and (out / "report" / "scores.json").is_file()
    # A second run replaces the demo folder it made.
    assert _demo(tmp_path, weights).returncode == 0


def test_demo_without_bundled_denoisers_says_so(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    result = _demo(tmp_path, empty)
    assert result.returncode == 1 and "no bundled denoising weights" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path, checkpoints):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copyfile(checkpoints["redcnn"], weights / "redcnn.safetensors")
    bundled.write_manifest({"redcnn": {"file": "redcnn.safetensors", "model": "redcnn",
                                       "sha256": bundled.file_sha256(weights / "redcnn.safetensors")}},
                           weights)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    result = _demo(tmp_path, weights)
    assert result.returncode == 2 and "not a demo folder" in result.stderr
    assert (tmp_path / "demo" / "keep.txt").read_text() == "mine"
