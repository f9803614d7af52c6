"""ldct_cli.report: valid, non-trivial PNGs; one self-contained, escaped HTML file; atomic writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from ldct_cli.report import Panel, Table, write_html, write_montage, write_nps_plot, write_profile_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, *, min_width: int = 200, min_height: int = 200) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width
    assert float(image[..., :3].std()) > 0.01, "picture is uniform"
    return image


def assert_no_leftovers(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


def phantom(n: int = 96, seed: int = 0, noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n]
    ref = np.where((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.4 * n) ** 2, 40.0, -1000.0)
    ref[(yy - n / 3) ** 2 + (xx - n / 2) ** 2 < (0.08 * n) ** 2] = 150.0
    test = ref + np.random.default_rng(seed).normal(0, noise, ref.shape)
    return ref, test


def montage_rows() -> list[list[Panel]]:
    rows = []
    rois = ((40, 40, 10), (50, 60, 8))
    for k in range(2):
        ref, test = phantom(seed=k)
        rows.append([
            Panel("input $x$", test, note="PSNR 24.1 dB / SSIM 0.512", rois=rois),
            Panel("model A", 0.5 * (test + ref), note="PSNR 30.2 dB / SSIM 0.900", rois=rois),
            Panel("reference", ref, note=f"z = {k * 5.0:.1f} mm", rois=rois),
            Panel("|input - reference|", test - ref, kind="difference"),
        ])
    return rows


def test_montage_png(tmp_path):
    path = write_montage(tmp_path / "montage.png", rows=montage_rows(), window=(-160, 240),
                         window_label="window [-160, 240] HU (L = 400)", title="phantom <test>")
    assert path == tmp_path / "montage.png"
    image = assert_png(path, min_width=4 * 250, min_height=2 * 250)
    # Grayscale image panels and a coloured (magma) difference panel: some pixels are not gray.
    rgb = image[..., :3]
    assert float(np.abs(rgb[..., 0] - rgb[..., 2]).max()) > 0.2
    assert_no_leftovers(tmp_path, {"montage.png"})


def test_montage_uneven_rows_and_overwrite(tmp_path):
    ref, test = phantom()
    path = tmp_path / "m.png"
    path.write_bytes(b"old")
    write_montage(path, rows=[[Panel("a", test), Panel("b", ref)], [Panel("c", test)]], window=(-1000, 1000),
                  window_label="")
    assert_png(path)
    assert_no_leftovers(tmp_path, {"m.png"})


def test_panel_validation():
    with pytest.raises(ValueError):
        Panel("x", np.zeros((4, 4)), kind="other")
    with pytest.raises(ValueError):
        Panel("x", np.zeros((2, 4, 4)))


def test_nps_plot(tmp_path):
    f = np.linspace(0, 1.0, 50)
    curves = {"low dose": (f, 300 * f * np.exp(-3 * f)), "model <A>": (f, 50 * f * np.exp(-5 * f))}
    path = write_nps_plot(tmp_path / "nps.png", curves=curves, f_avg={"low dose": 0.33, "model <A>": None})
    assert_png(path)
    path = write_nps_plot(tmp_path / "nps.png", curves=curves)
    assert_png(path)
    assert_no_leftovers(tmp_path, {"nps.png"})


def test_profile_plot(tmp_path):
    z = np.linspace(-20, 20, 30)
    y = 30 + np.sin(z / 5)
    y[4] = np.inf  # identical slices: infinite PSNR, drawn as a gap
    path = write_profile_plot(tmp_path / "psnr.png", curves={"a": (z, y), "b $c$": (z[::-1], y - 5)},
                              ylabel="PSNR (dB)", title="PSNR along z")
    assert_png(path)
    assert_no_leftovers(tmp_path, {"psnr.png"})


def test_html_self_contained_and_escaped(tmp_path):
    ref, test = phantom()
    montage = write_montage(tmp_path / "montage.png", rows=[[Panel("a", test), Panel("d", test - ref,
                                                                                      kind="difference")]],
                            window=(-160, 240), window_label="window [-160, 240] HU (L = 400)")
    f = np.linspace(0, 1, 20)
    nps = write_nps_plot(tmp_path / "nps.png", curves={"a": (f, f)})
    evil = '<script>alert("x")</script>'
    table = Table(caption="Per series", header=["series", "PSNR (dB)", "SSIM"],
                  rows=[[evil, "31.20 ± 0.40", "0.912"], ["model B & co", "29.05 ± 0.61", "0.880"]])
    path = write_html(tmp_path / "report.html", title=f"ldct evaluate {evil}",
                      settings={"window": "[-160, 240] HU", "L": "400", "ssim_variant": "gaussian σ=1.5",
                                "reference": evil, "tool_version": "0.1.0"},
                      tables=[table], images=[(f"Montage {evil}", montage), ("NPS", nps)])
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("data:image/png;base64,") == 2
    for cell in ("31.20 ± 0.40", "0.912", "29.05 ± 0.61", "PSNR (dB)", "Per series", "model B &amp; co"):
        assert cell in text
    for key, value in (("window", "[-160, 240] HU"), ("ssim_variant", "gaussian σ=1.5"), ("tool_version", "0.1.0")):
        assert key in text and value in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    attributes = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", text, flags=re.IGNORECASE)
    assert attributes and all(a.startswith("data:image/png;base64,") for a in attributes)
    assert not any("http" in a for a in attributes)
    assert "<link" not in text.lower() and "url(" not in text.lower()
    assert_no_leftovers(tmp_path, {"montage.png", "nps.png", "report.html"})


def test_html_rejects_non_image(tmp_path):
    bogus = tmp_path / "x.png"
    bogus.write_text("not a picture")
    with pytest.raises(ValueError):
        write_html(tmp_path / "r.html", title="t", settings={}, tables=[], images=[("x", bogus)])
    assert_no_leftovers(tmp_path, {"x.png"})
