"""Maintainers' tool: put a trained checkpoint into weights/ with its manifest entry.

    python tools/bundle_weights.py redcnn --checkpoint runs/redcnn_b \
        --train-data runs/abdomen25 --run runs/redcnn --run runs/redcnn_b \
        --command "ldct prepare ..." --command "ldct train ..." \
        --test runs/abdomen25 --test runs/siemens25 --report-dir runs/bundle_report

It copies the checkpoint, records its sha256, the exact commands (as given, in order),
the config and training summary from the checkpoint, steps and minutes from the run
folders' metrics logs, the training data (series, source, licence, simulated dose and I0,
from the dataset's manifest), and scores the checkpoint on the test split of every
``--test`` dataset with ``ldct evaluate``'s library: the low-dose input, the model, the
full-dose reference, and the classical filters (a Gaussian, and the registered nlm and tv),
each tuned for PSNR on the training dataset's validation slices. The quality bar of
ldct_cli.bundled is checked on each held-out set and recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ldct_cli import bundled
from ldct_cli.checkpoint import load_checkpoint, read_checkpoint_info
from ldct_cli.models.registry import get_model_info

# From ../shared/data/README.md: what each real series is, and where it comes from.
SERIES = {
    "philips_abdomen_rle_275": {
        "what": "patient abdomen, 1 mm, kernel D, 275 slices, 512x512",
        "scanner": "Philips Brilliance 16P",
        "source": "FNNDSC/data (dicom/andrei_abdomen)", "licence": "Apache-2.0"},
    "siemens_j2k_20": {
        "what": "patient CT, 20 slices, 512x512, JPEG 2000 lossless",
        "scanner": "Siemens Biograph40 mCT",
        "source": "wasserth/TotalSegmentator tests", "licence": "Apache-2.0"},
    "philips_phantom_5mm_28": {
        "what": "phantom, 5 mm, 28 slices", "scanner": "Philips Ingenuity CT",
        "source": "neurolabusc/dcm_qa_ct (phantom courtesy Paul Morgan)", "licence": "BSD-2-Clause"},
}
WINDOW = "redcnn"  # [-160, 240] HU, L = 400: the bar's window


class Gaussian:
    """A Gaussian filter (not a registered model: the simplest baseline), Denoiser-shaped."""

    context_slices, batch_size = 1, 1

    def __init__(self, strength_hu: float):  # here the strength is sigma in pixels
        self.strength_hu = float(strength_hu)

    def __call__(self, stack: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray:
        from scipy import ndimage

        return np.stack([ndimage.gaussian_filter(np.asarray(s[0], np.float64), self.strength_hu)
                         for s in stack]).astype(np.float32)

    def describe(self) -> str:
        return f"Gaussian filter, sigma {self.strength_hu:g} px (scipy.ndimage)"


def make_filter(name: str, param: float):
    from ldct_cli.models.registry import create_model

    return Gaussian(param) if name == "gaussian" else create_model(name, strength_hu=param)


GRIDS = {"gaussian": [0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5],  # sigma, px
         "nlm": [20, 30, 40, 50, 60, 80, 100, 120, 150, 190],  # h, HU
         "tv": [10, 15, 20, 30, 40, 60, 80, 100, 120, 150, 200]}  # weight, HU


def tune_filters(dataset: Path) -> dict:
    """Each filter's parameter of best mean PSNR on 4 slices spread over the val split."""
    from ldct_cli.prepare import load_manifest, open_case

    manifest = load_manifest(dataset)
    part = manifest["split"]["val"][0]
    low, full = open_case(dataset, part["case"])
    rows = np.linspace(part["start"], part["stop"] - 1, 4).round().astype(int)
    x = low[rows].astype(np.float32)
    ref = full[rows].astype(np.float32)
    pixel_mm = float(next(c for c in manifest["cases"] if c["id"] == part["case"])["pixel_mm"])
    best = {}
    for name in GRIDS:
        chosen, scores = sweep(name, x, ref, pixel_mm)
        print(f"tuned {name} on val slices {rows.tolist()}: "
              + ", ".join(f"{p:g}: {s:.2f} dB" for p, s in scores.items()) + f" -> {chosen:g}", file=sys.stderr)
        best[name] = make_filter(name, chosen)
    return best


def run_log(run: Path) -> dict:
    """Steps and training minutes of one run folder, from its metrics log."""
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            last = record
    return {"run": run.name, "steps": int(last["step"]) if last else 0,
            "minutes": round(float(last["time_s"]) / 60, 1) if last else 0.0}


def summary_row(series: dict) -> dict:
    s = series["summary"]
    row = {"noise_sd_hu": s["noise_sd_hu"]["mean"], "f_avg": s["f_avg"]}
    for key in ("psnr_db", "ssim", "hu_bias"):
        if key in s:
            row[key] = s[key]["mean"]
    if "rmse_hu" in s:
        row["rmse_hu"] = s["rmse_hu"]["mean"]
    return {k: round(float(v), 4) for k, v in row.items()}


def score(name: str, checkpoint: Path, dataset: Path, filters: dict, report: Path) -> dict:
    import ldct_cli.evaluate as ev
    from ldct_cli.api import build_denoiser
    from ldct_cli.metrics import get_window

    denoiser, _ = build_denoiser(weights=checkpoint, device="cpu")
    denoisers = {name: denoiser, **filters}
    tests, references = ev.dataset_inputs(dataset, "test", denoisers)
    result = ev.evaluate(tests, reference=references, settings=ev.Settings(window=get_window(WINDOW)),
                         out=report)
    return rows_of(result)


def rows_of(result: dict) -> dict:
    """An evaluate report's per-series summaries by label, the reference's as "reference"."""
    return {("reference" if series["role"] == "reference" else series["label"]): summary_row(series)
            for series in result["series"]}


REAL_SOURCE = ("AAPM/Mayo Clinic Low Dose CT Grand Challenge (quarter/full-dose pairs; "
               "validation only, never trained on: ../shared/data/README.md)")


def sweep(name: str, low: np.ndarray, full: np.ndarray, pixel_mm: float) -> tuple[float, dict]:
    """The strength of ``GRIDS[name]`` with the best mean PSNR on these slices, and each score."""
    from ldct_cli.metrics import get_window, psnr

    window = get_window(WINDOW)
    scores = {p: round(float(np.mean(psnr(make_filter(name, p)(low[:, None], pixel_mm=pixel_mm), full, window))), 3)
              for p in GRIDS[name]}
    best = max(scores, key=scores.get)
    if best in (GRIDS[name][0], GRIDS[name][-1]):  # the optimum may lie beyond: say so, loudly
        print(f"warning: {name}'s best strength {best:g} is at the end of its grid", file=sys.stderr)
    return best, scores


def score_real(name: str, checkpoint: Path, root: Path, report_dir: Path | None) -> dict:
    """Score a checkpoint on every real quarter-dose group under ``root`` (GROUP/QD, GROUP/FD)
    with ``ldct evaluate``'s library: the input, the model, each classical filter at the best
    strength of its sweep on that group (an oracle a user cannot tune: the hardest
    comparison), NLM with its automatic strength, and the full dose. The real-data bar is
    checked on the rows."""
    import ldct_cli.evaluate as ev
    from ldct_cli.api import build_denoiser
    from ldct_cli.metrics import get_window

    denoiser, _ = build_denoiser(weights=checkpoint, device="cpu")
    groups, filters, sweeps = {}, {}, {}
    for folder in sorted(p for p in root.iterdir() if (p / "QD").is_dir() and (p / "FD").is_dir()):
        low, = ev.load_input(folder / "QD", "low dose")
        full, = ev.load_input(folder / "FD", "full dose")
        pairs = ev.pair_by_position(low, full)
        q = low.read_hu([i for i, _ in pairs])
        f = full.read_hu([j for _, j in pairs])
        chosen = {}
        for filt in GRIDS:
            chosen[filt], sweeps.setdefault(folder.name, {})[filt] = sweep(filt, q, f, low.pixel_mm)
            print(f"{folder.name}: {filt} sweep {sweeps[folder.name][filt]} -> {chosen[filt]:g}", file=sys.stderr)
        auto, derivation = build_denoiser(model="nlm")  # its strength from the series' noise,
        auto, _ = auto.adapt_to_series(low.series, derivation)  # as `ldct denoise --model nlm` sets it
        models = {name: denoiser, **{filt: make_filter(filt, p) for filt, p in chosen.items()},
                  "nlm auto": auto}
        filters[folder.name] = {n: m.describe() for n, m in models.items() if n != name}
        tests = [low, *(ev.denoised_series(low, n, m) for n, m in models.items())]
        report = (report_dir / f"{name}_real_{folder.name}") if report_dir else None
        result = ev.evaluate(tests, reference=[full], settings=ev.Settings(window=get_window(WINDOW)), out=report)
        groups[folder.name] = {"slices": len(pairs), "rows": rows_of(result)}
    return {"name": root.name, "source": REAL_SOURCE, "window_hu": [-160, 240], "data_range_L": 400,
            "filters": filters, "sweeps": sweeps, "groups": groups,
            "bar": bundled.real_data_bar({g: v["rows"] for g, v in groups.items()}, name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="registered model name (the weights/NAME.safetensors file)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint file or run folder")
    parser.add_argument("--train-data", type=Path, help="the `ldct prepare` dataset it trained on")
    parser.add_argument("--run", type=Path, action="append", default=[], help="run folders, in order")
    parser.add_argument("--command", action="append", default=[], help="the exact commands, in order")
    parser.add_argument("--test", type=Path, action="append", default=[],
                        help="held-out dataset (test split) on which the quality bar must hold")
    parser.add_argument("--also-test", type=Path, action="append", default=[],
                        help="held-out dataset scored and reported, the bar checked but not required "
                             "(e.g. another scanner)")
    parser.add_argument("--real", type=Path, help="real quarter/full-dose groups (GROUP/QD, GROUP/FD; "
                        "e.g. ../shared/data/mayo_dev) on which the real-data bar must hold")
    parser.add_argument("--real-only", action="store_true",
                        help="only (re)score the bundled NAME on --real and update its manifest entry")
    parser.add_argument("--report-dir", type=Path, help="where the evaluate reports go")
    parser.add_argument("--weights-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.real_only:
        return update_real(args, parser)
    if args.checkpoint is None or args.train_data is None:
        parser.error("--checkpoint and --train-data are required (or --real-only --real ROOT)")

    from ldct_cli.prepare import load_manifest, simulated_doses

    info = get_model_info(args.name)
    source = read_checkpoint_info(args.checkpoint if args.checkpoint.is_file()
                                  else args.checkpoint / "best.safetensors")
    if source.model != args.name:
        parser.error(f"{source.path} holds {source.model!r}, not {args.name!r}")
    load_checkpoint(source.path)  # verifies the tensors' sha256 before anything is copied
    folder = args.weights_dir or bundled.weights_dir()
    target = folder / f"{args.name}.safetensors"
    shutil.copyfile(source.path, target)

    data = load_manifest(args.train_data)
    full = Path(data["how"]["full"] or "").name
    simulation = data.get("simulation") or {}
    runs = [run_log(r) for r in args.run]
    entry = {
        "file": target.name,
        "sha256": bundled.file_sha256(target),
        "bytes": target.stat().st_size,
        "model": source.model,
        "title": info.title,
        "paper": info.paper,
        "model_kwargs": source.model_kwargs,
        "tensors_sha256": source.tensors_sha256,
        "hu_norm": source.hu_norm.to_dict(),
        "training": {
            "commands": args.command,
            "runs": runs,
            "steps": sum(r["steps"] for r in runs),
            "minutes": round(sum(r["minutes"] for r in runs), 1),
            "hardware": "2 CPU cores, no GPU",
            "checkpoint_step": source.training.get("step"),
            "validation": source.training.get("validation"),
            "init": source.training.get("init"),
            "config": source.config,
        },
        "data": {
            "series": [{"folder": f"ct/{full}", **SERIES.get(full, {})}],
            "dataset_split": data["split"],
            "simulated_dose": float(simulation["dose"]) if simulation else None,
            # every dose trained on, the primary (validation's) first; one for most datasets
            "simulated_doses": (simulated_doses(data) or [float(simulation["dose"])]) if simulation else None,
            # a number, or "matched" (scan-matched per slice: the cases' records hold the values)
            "i0": (simulation["i0"] if simulation["i0"] == "matched" else float(simulation["i0"]))
            if simulation else None,
            "simulation": simulation,
        },
        "held_out": [],
    }
    tests = []
    if args.test or args.also_test:
        filters = tune_filters(args.train_data)
        for dataset in args.test + args.also_test:
            test_manifest = load_manifest(dataset)
            report = (args.report_dir / f"{args.name}_{dataset.name}") if args.report_dir else None
            rows = score(args.name, target, dataset, filters, report)
            test_full = Path(test_manifest["how"]["full"]).name
            tests.append({
                "name": dataset.name,
                "series": f"ct/{test_full}", **({"about": SERIES[test_full]} if test_full in SERIES else {}),
                "slices": test_manifest["split"]["test"],
                "bar_applies": dataset in args.test,
                "window_hu": [-160, 240], "data_range_L": 400,
                "filters": {n: f.describe() for n, f in filters.items()},
                "rows": rows,
            })
    existing = {name: e.record for name, e in bundled.read_manifest(folder).items()}
    mse_f_avg = {}
    if info.objective != "mse" and "redcnn" in existing:
        mse_f_avg = {t["name"]: t["rows"]["redcnn"]["f_avg"] for t in existing["redcnn"]["held_out"]}
    for test in tests:
        rows = test["rows"]
        test["bar"] = bundled.quality_bar(
            rows, args.name, objective=info.objective,
            classical_psnr=max(rows[f]["psnr_db"] for f in GRIDS),
            mse_model_f_avg=mse_f_avg.get(test["name"]))
    entry["held_out"] = tests
    if args.real is not None:
        entry["real_data"] = score_real(args.name, target, args.real, args.report_dir)
    existing[args.name] = entry
    bundled.write_manifest(existing, folder)
    print(json.dumps({"name": args.name, "meets_bar": bundled.BundledWeights(
        args.name, entry["file"], entry["sha256"], entry).meets_bar,
        "held_out": [{t["name"]: t["rows"], "bar": t["bar"]} for t in tests],
        "real_data": entry.get("real_data")}, indent=1))
    return 0


def update_real(args, parser) -> int:
    """``--real-only``: score the bundled checkpoint on ``--real`` and replace its entry's
    ``real_data`` record; the file and everything else in the entry stay as they are."""
    if args.real is None:
        parser.error("--real-only needs --real ROOT")
    folder = args.weights_dir or bundled.weights_dir()
    existing = {name: e.record for name, e in bundled.read_manifest(folder).items()}
    if args.name not in existing:
        parser.error(f"{args.name!r} has no bundled weights in {folder}")
    path = bundled.bundled_checkpoint(args.name, folder)  # verifies its sha256
    existing[args.name]["real_data"] = score_real(args.name, path, args.real, args.report_dir)
    bundled.write_manifest(existing, folder)
    entry = bundled.read_manifest(folder)[args.name]
    print(json.dumps({"name": args.name, "meets_bar": entry.meets_bar, "failed": entry.failed_checks(),
                      "real_data": existing[args.name]["real_data"]["groups"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
