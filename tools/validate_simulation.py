"""Check the low-dose simulator against real quarter-dose scans (AAPM/Mayo pairs in ../shared/data/mayo_dev).

For every group (a folder with FD/ and QD/ series): the full dose is taken through
``ldct simulate``'s simulator (scan-matched by default, or with --i0/--filter fixed), and
SD in the body and NPS f_avg of (simulated - FD) are compared with those of (QD - FD).

    python tools/validate_simulation.py [ROOT] [--dose 0.25] [--i0 N] [--filter F] [--json OUT]

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


def within(row: dict, tolerance: float = TOLERANCE) -> bool:
    return abs(row["sd_ratio"] - 1) <= tolerance and abs(row["f_avg_ratio"] - 1) <= tolerance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--dose", type=float, default=0.25)
    parser.add_argument("--i0", type=float, default=None)
    parser.add_argument("--filter", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
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
