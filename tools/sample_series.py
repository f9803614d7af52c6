"""Copy up to N evenly spaced slices of every single-series folder under ROOT into OUT/<folder>.

    python tools/sample_series.py ../shared/data/ct ../runs/fd_sample --slices 24 \
        --exclude philips_abdomen_rle_275:245-275

For training sets that cover many scanners within a CPU budget: `ldct prepare` simulates
every slice it is given, so a sample of each series costs a fraction of the whole. The
slices keep their headers (positions, UIDs); file names get the slice's index in front.
`--exclude FOLDER:START-STOP` keeps slices START..STOP-1 of that folder's series (in slice
order) out of the sample: a test block that must stay held out (`ldct prepare --split-by block`
puts the abdomen's last 26 slices in its test block, after a 4-slice gap: 245-275 covers both).
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
    parser.add_argument("--exclude", action="append", default=[], metavar="FOLDER:START-STOP",
                        help="slice range of one folder's series to leave out (repeatable)")
    args = parser.parse_args(argv)
    excluded = {}
    for item in args.exclude:
        try:
            name, span = item.rsplit(":", 1)
            start, stop = (int(v) for v in span.split("-"))
        except ValueError:
            parser.error(f"--exclude {item!r}: expected FOLDER:START-STOP, e.g. abdomen:245-275")
        excluded.setdefault(name, []).append(range(start, stop))
    for folder in sorted(p for p in args.root.iterdir() if p.is_dir()):
        found = discover(folder).series
        if len(found) != 1:
            print(f"{folder.name}: skipped ({len(found)} series, not one)")
            continue
        series = found[0]
        dest = args.out / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        blocks = excluded.get(folder.name, [])
        kept = [i for i in range(series.n_slices) if not any(i in block for block in blocks)]
        picked = [kept[j] for j in sample_indices(len(kept), args.slices)]
        for i in picked:
            source = series.slices[i].path
            shutil.copy(source, dest / f"{i:04d}_{source.name}")
        print(f"{folder.name}: {len(picked)} of {series.n_slices} slices"
              + (f" (outside {', '.join(f'{b.start}-{b.stop}' for b in blocks)})" if blocks else ""))
    if unused := sorted(set(excluded) - {p.name for p in args.root.iterdir()}):
        parser.error(f"--exclude names folders that are not under {args.root}: {', '.join(unused)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
