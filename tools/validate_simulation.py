"""Check the low-dose simulator against real quarter-dose scans (AAPM/Mayo pairs in ../shared/data/mayo_dev).

For every group (a folder with FD/ and QD/ series): the full dose is taken through
``ldct simulate``'s simulator (scan-matched by default, or with --i0/--filter fixed), and
SD in the body and NPS f_avg of (simulated - FD) are compared with those of (QD - FD).

    python tools/validate_simulation.py [ROOT] [--dose 0.25] [--i0 N] [--filter F] [--json OUT]
    python tools/validate_simulation.py --series ../shared/data/ct   # what each series measures and gets
    python tools/validate_simulation.py --classical   # NLM/TV: automatic strength vs a sweep, on the real QD
    python tools/validate_simulation.py --factors ../shared/data/ct   # how the auto factors were chosen

Validation only: nothing derived from these pixels is written but the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldct_cli.scan_noise import simulation_realism

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mayo_dev"
TOLERANCE = 0.15


def validate_group(folder: Path, **kwargs) -> dict:
    return {"group": folder.name, **simulation_realism(folder / "FD", folder / "QD", **kwargs)}


def series_rows(root: Path, *, dose: float = 0.25, n_sample: int = 4) -> list[dict]:
    """Per full-dose series under ``root``: its measured noise, and the I0 and window the
    scan-matched simulator gives it (on ``n_sample`` slices spread over the series)."""
    import numpy as np

    from ldct_cli.dicom.read import discover
    from ldct_cli.evaluate import load_input
    from ldct_cli.physics.lowdose import LowDoseSimulator
    from ldct_cli.physics.noise import sample_indices, series_noise_sd

    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if len(discover(folder).series) != 1:
            continue  # folders of single test files
        series, = load_input(folder)
        full = series.read_hu(sample_indices(series.n_slices, n_sample))
        found = series_noise_sd(list(full))
        sim = LowDoseSimulator(dose=dose, i0=None, recon_filter=None).for_series(list(full))
        sim(full[:, None], pixel_mm=series.pixel_mm)
        i0s = [m["i0"] for m in sim.matches]
        rows.append({"series": folder.name, "slices": series.n_slices,
                     "noise_sd_hu": None if found is None else round(found[0], 1),
                     "recon_filter": sim.recon_filter, "i0_range": (min(i0s), max(i0s)),
                     "own_estimates": sum(1 for m in sim.matches if m.get("own"))})
    return rows


SWEEP = {"nlm": (20, 30, 40, 50, 60, 70, 80, 100, 120, 150, 180, 220),
         "tv": (10, 15, 20, 30, 40, 60, 80, 100, 130)}


def classical_rows(folder: Path) -> dict:
    """PSNR ([-160, 240] HU) of the real QD of ``folder``, of NLM and TV at each SWEEP strength,
    and at their automatic strength, against the FD."""
    import numpy as np

    from ldct_cli.api import build_classical
    from ldct_cli.evaluate import load_input, pair_by_position
    from ldct_cli.metrics import get_window, psnr
    from ldct_cli.models.registry import create_model

    low, = load_input(folder / "QD")
    full, = load_input(folder / "FD")
    pairs = pair_by_position(low, full)
    q = low.read_hu([i for i, _ in pairs])
    f = full.read_hu([j for _, j in pairs])
    window = get_window("-160,240")

    def score(denoiser) -> float:
        return round(float(np.mean(psnr(denoiser(q[:, None]), f, window))), 2)

    row = {"group": folder.name, "input": round(float(np.mean(psnr(q, f, window))), 2)}
    for name, grid in SWEEP.items():
        sweep = {h: score(create_model(name, strength_hu=h)) for h in grid}
        auto, derivation = build_classical(name)
        auto, _ = auto.adapt_to_series(low.series, derivation)
        best = max(sweep, key=sweep.get)
        row[name] = {"sweep": sweep, "best": best, "best_psnr": sweep[best],
                     "auto": auto.strength_hu, "auto_psnr": score(auto), "noise_sd_hu": round(auto.noise_sd_hu, 1)}
    return row


FACTOR_CASES = (("philips_abdomen_rle_275", 0.25), ("philips_abdomen_rle_275", 0.1),
                ("ge_discoveryls_body_soft_60", 0.25), ("ge_lightspeed_chest_lung_100", 0.25))
FACTORS = {"nlm": (0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5), "tv": (0.3, 0.45, 0.6, 0.75, 0.9)}


def factor_rows(root: Path) -> list[dict]:
    """PSNR of NLM / TV at strength = factor x the measured SD, on scan-matched simulated doses
    of real full-dose series (4 slices each): where the auto factors come from."""
    import numpy as np

    from ldct_cli.evaluate import load_input
    from ldct_cli.metrics import get_window, psnr
    from ldct_cli.models.registry import create_model
    from ldct_cli.physics.lowdose import LowDoseSimulator
    from ldct_cli.physics.noise import sample_indices, series_noise_sd

    window = get_window("-160,240")
    rows = []
    for name, dose in FACTOR_CASES:
        series, = load_input(root / name)
        full = series.read_hu(sample_indices(series.n_slices, 4))
        sim = LowDoseSimulator(dose=dose, i0=None, recon_filter=None, seed=5).for_series(list(full))
        low = sim(full[:, None], pixel_mm=series.pixel_mm)
        sd = series_noise_sd(list(low))[0]
        row = {"series": name, "dose": dose, "noise_sd_hu": round(sd, 1),
               "input": round(float(np.mean(psnr(low, full, window))), 2)}
        for model, grid in FACTORS.items():
            row[model] = {k: round(float(np.mean(psnr(create_model(model, strength_hu=k * sd)(low[:, None]), full,
                                                          window))), 2) for k in grid}
        rows.append(row)
    return rows


def within(row: dict, tolerance: float = TOLERANCE) -> bool:
    return abs(row["sd_ratio"] - 1) <= tolerance and abs(row["f_avg_ratio"] - 1) <= tolerance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--dose", type=float, default=0.25)
    parser.add_argument("--i0", type=float, default=None)
    parser.add_argument("--filter", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--series", type=Path, default=None, help="a folder of full-dose series folders")
    parser.add_argument("--classical", action="store_true", help="NLM/TV auto strength vs a sweep")
    parser.add_argument("--factors", type=Path, default=None, help="a folder of full-dose series folders")
    args = parser.parse_args(argv)
    if args.factors:
        rows = factor_rows(args.factors)
        for r in rows:
            print(json.dumps(r))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    if args.classical:
        groups = sorted(p for p in args.root.iterdir() if (p / "FD").is_dir() and (p / "QD").is_dir())
        rows = [classical_rows(g) for g in groups]
        print("| group | input | NLM best of sweep (h) | NLM auto (h) | TV best of sweep (weight) | TV auto (weight) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            n, t = r["nlm"], r["tv"]
            print(f"| {r['group']} | {r['input']} | {n['best_psnr']} ({n['best']}) | {n['auto_psnr']} ({n['auto']}) | "
                  f"{t['best_psnr']} ({t['best']}) | {t['auto_psnr']} ({t['auto']}) |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0 if all(r[k]["auto_psnr"] >= r[k]["best_psnr"] - 0.5 for r in rows for k in ("nlm",)) else 1
    if args.series:
        rows = series_rows(args.series, dose=args.dose)
        print("| series | slices | measured FD noise SD (HU) | fitted window | I0 per slice (4 sampled) |")
        print("|---|---|---|---|---|")
        for r in rows:
            lo, hi = r["i0_range"]
            missing = 4 - r["own_estimates"]
            note = f" ({missing} from the series level)" if missing else ""
            print(f"| {r['series']} | {r['slices']} | {r['noise_sd_hu']} | {r['recon_filter']} | {lo:.3g}-{hi:.3g}{note} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    groups = sorted(p for p in args.root.iterdir() if (p / "FD").is_dir() and (p / "QD").is_dir())
    if not groups:
        print(f"{args.root}: no FD/QD groups", file=sys.stderr)
        return 2
    rows = [validate_group(g, dose=args.dose, i0=args.i0, recon_filter=args.filter) for g in groups]
    print("| group | slices | fitted filter | median I0 | SD sim / real (HU) | ratio | f_avg sim / real (cyc/px) | ratio | ±15% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        i0 = "-" if r["i0_median"] is None else f"{r['i0_median']:.3g}"
        print(f"| {r['group']} | {r['slices']} | {r['recon_filter']} | {i0} | {r['sd_sim_hu']} / {r['sd_real_hu']} | "
              f"{r['sd_ratio']:.2f} | {r['f_avg_sim']:.3f} / {r['f_avg_real']:.3f} | {r['f_avg_ratio']:.2f} | "
              f"{'yes' if within(r) else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(within(r) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
