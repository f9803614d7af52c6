"""Calibrate DEFAULT_I0 on a real abdomen series: ``python tools/calibrate_i0.py [SERIES_DIR]``.

The target is the quarter dose of the Mayo / AAPM Low Dose CT Grand Challenge, taken as
27.5 dB PSNR against full dose in the [-160, 240] HU window (L = 400; published figures
vary with window and test slices, e.g. 26.07 dB in Shan et al.'s 2017 transfer-learning
study). The script measures that PSNR for a few photon counts on ``n_slices`` middle
slices and picks the I0 whose interpolated PSNR hits the target. The full-dose images
keep their own noise: only the added part is simulated, as in the challenge data.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from ldct_cli.dicom.read import read_dataset
from ldct_cli.evaluate import load_input
from ldct_cli.metrics import get_window, psnr
from ldct_cli.physics.lowdose import LowDoseSimulator

WINDOW = get_window("redcnn")  # [-160, 240] HU, L = 400
TARGET_PSNR_DB = 27.5
DEFAULT_SERIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "philips_abdomen_rle_275"


def read_middle_slices(folder: Path, n_slices: int) -> tuple[np.ndarray, float]:
    """(n, H, W) float32 HU of the ``n_slices`` slices around the middle of a series (sorted
    along the slice normal), and the pixel size [mm]."""
    inputs = load_input(folder)
    if len(inputs) != 1:
        raise ValueError(f"{folder}: {len(inputs)} CT series found, calibration takes one")
    series = inputs[0]
    middle = series.n_slices // 2
    chosen = list(range(series.n_slices))[max(0, middle - n_slices // 2):][:n_slices]
    header = read_dataset(series.series.slices[chosen[0]].path, stop_before_pixels=True)
    spacing = [float(v) for v in header.PixelSpacing]
    if not math.isclose(spacing[0], spacing[1], rel_tol=1e-3):
        raise ValueError(f"{folder}: non-square pixels {spacing} are not supported")
    return series.read_hu(chosen), spacing[0]


def quarter_dose_psnr(slices_hu: np.ndarray, pixel_mm: float, *, i0: float, dose: float = 0.25,
                      seed: int = 0, n_views: int = 720) -> float:
    """Mean over slices of the windowed PSNR of the simulated ``dose`` against the input."""
    simulator = LowDoseSimulator(dose=dose, i0=i0, seed=seed, n_views=n_views, pixel_mm=pixel_mm)
    low_dose = simulator(slices_hu[:, None])
    return float(np.mean(psnr(low_dose, slices_hu, WINDOW)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="?", type=Path, default=DEFAULT_SERIES)
    parser.add_argument("--n-slices", type=int, default=10)
    parser.add_argument("--i0", type=float, nargs="+", default=[1e4, 2e4, 5e4, 1e5, 2e5])
    args = parser.parse_args(argv)

    slices_hu, pixel_mm = read_middle_slices(args.series, args.n_slices)
    print(f"{args.series}: {len(slices_hu)} slices {slices_hu.shape[1:]}, {pixel_mm:.4g} mm pixels")
    measured = []
    for i0 in sorted(args.i0):
        start = time.perf_counter()
        value = quarter_dose_psnr(slices_hu, pixel_mm, i0=i0)
        measured.append((i0, value))
        print(f"I0 = {i0:9.3g}  quarter-dose PSNR = {value:6.2f} dB  ({time.perf_counter() - start:.1f} s)")
    # PSNR grows ~ 10 log10(I0) (noise variance ~ 1 / I0): interpolate in log I0.
    log_i0 = np.log10([i0 for i0, _ in measured])
    psnrs = np.array([value for _, value in measured])
    chosen = 10 ** float(np.interp(TARGET_PSNR_DB, psnrs, log_i0))
    chosen = float(f"{chosen:.2g}")
    print(f"chosen I0 = {chosen:.3g}: quarter-dose PSNR = {quarter_dose_psnr(slices_hu, pixel_mm, i0=chosen):.2f} dB "
          f"(target {TARGET_PSNR_DB} dB)")


if __name__ == "__main__":
    main()
