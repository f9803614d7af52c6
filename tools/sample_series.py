"""Copy up to N evenly spaced slices of every single-series folder under ROOT into OUT/<folder>.

    python tools/sample_series.py ../shared/data/ct ../runs/fd_sample --slices 24

For training sets that cover many scanners within a CPU budget: `ldct prepare` simulates
every slice it is given, so a sample of each series costs a fraction of the whole. The
slices keep their headers (positions, UIDs); file names get the slice's index in front.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ldct_cli.dicom.read import discover
from ldct_cli.physics.noise import sample_indices


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--slices", type=int, default=24)
    args = parser.parse_args(argv)
    for folder in sorted(p for p in args.root.iterdir() if p.is_dir()):
        found = discover(folder).series
        if len(found) != 1:
            print(f"{folder.name}: skipped ({len(found)} series, not one)")
            continue
        series = found[0]
        dest = args.out / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        picked = sample_indices(series.n_slices, args.slices)
        for i in picked:
            source = series.slices[i].path
            shutil.copy(source, dest / f"{i:04d}_{source.name}")
        print(f"{folder.name}: {len(picked)} of {series.n_slices} slices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
