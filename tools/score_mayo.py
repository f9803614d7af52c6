"""PSNR / SSIM of a model on every real quarter-dose group of ../shared/data/mayo_dev.

    python tools/score_mayo.py                       # the bundled redcnn
    python tools/score_mayo.py RUN_OR_CHECKPOINT     # any checkpoint or `ldct train` run folder

Every slice of each group, PSNR in [-160, 240] HU (L = 400) and SSIM as `ldct evaluate`
computes them, against the full dose paired by position. Validation only (the data's terms):
for choosing checkpoints, never for training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ldct_cli.api import build_denoiser
from ldct_cli.evaluate import load_input, pair_by_position
from ldct_cli.metrics import get_window, psnr, ssim

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mayo_dev"


def score(weights: str | None, root: Path = DEFAULT_ROOT, model: str = "redcnn") -> dict:
    denoiser, _ = build_denoiser(model=model if weights is None else None, weights=weights, device="cpu")
    window = get_window("redcnn")
    rows = {}
    for group in sorted(p for p in root.iterdir() if (p / "FD").is_dir() and (p / "QD").is_dir()):
        low, = load_input(group / "QD")
        full, = load_input(group / "FD")
        pairs = pair_by_position(low, full)
        q = low.read_hu([i for i, _ in pairs])
        f = full.read_hu([j for _, j in pairs])
        out = np.concatenate([denoiser(q[k:k + 2, None], pixel_mm=low.pixel_mm) for k in range(0, len(q), 2)])
        rows[group.name] = {"slices": len(pairs),
                            "input_psnr": round(float(np.mean(psnr(q, f, window))), 2),
                            "psnr": round(float(np.mean(psnr(out, f, window))), 2),
                            "input_ssim": round(float(np.mean(ssim(q, f, window))), 3),
                            "ssim": round(float(np.mean(ssim(out, f, window))), 3)}
    rows["mean_gain_db"] = round(float(np.mean([r["psnr"] - r["input_psnr"] for r in rows.values()])), 2)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--model", default="redcnn", help="bundled model, when no weights are given")
    args = parser.parse_args(argv)
    print(json.dumps(score(args.weights, args.root, args.model), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
