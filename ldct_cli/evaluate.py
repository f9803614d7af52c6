"""``ldct evaluate``: score test series against a reference (or against their sources).

Test slices are paired with reference slices by position along the slice normal (the
series share a Frame of Reference when one was derived from the other; a different one
is accepted with a note). Scores are computed in chunks of slices, so memory stays
bounded whatever the series length. Metric definitions live in ``ldct_cli.metrics``;
pictures and the HTML report in ``ldct_cli.report``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from ldct_cli._version import __version__
from ldct_cli.dicom.read import Series, discover, load_slice, rescale_of, slice_normal, stored_to_hu
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.fsutil import atomic_path, safe_name

CHUNK = 16  # slices scored at once: bounded memory, vectorized metrics


class EvaluateError(LdctError):
    """Inputs that cannot be scored (nothing pairs, matrices differ...)."""


@dataclass
class InputSeries:
    """One series given to evaluate: its label, slices, positions and identity."""

    label: str
    series: Series
    z_mm: np.ndarray  # position of each slice along the normal of its first slice
    frame_uid: str
    series_uid: str
    source_series_uid: str  # the series it was derived from (Referenced Series Sequence), or ""
    pixel_mm: float

    @property
    def n_slices(self) -> int:
        return self.series.n_slices

    @property
    def shape(self) -> tuple[int, int]:
        return self.series.slices[0].rows, self.series.slices[0].columns

    @property
    def folder(self) -> str:
        return str(self.series.folder)

    def slice_number(self, index: int) -> int:
        """The number the reports give slice ``index``: its place in the series."""
        return index

    def read_hu(self, indices: list[int]) -> np.ndarray:
        """(n, H, W) float32 HU of the given slices."""
        images = []
        for i in indices:
            header, stored = load_slice(self.series.slices[i].path)
            images.append(stored_to_hu(stored, *rescale_of(header)))
        return np.stack(images)


@dataclass
class ArraySeries:
    """A series held as arrays (a ``prepare`` dataset case, or a model's output on it)."""

    label: str
    folder: str
    z_mm: np.ndarray
    pixel_mm: float
    shape: tuple[int, int]
    reader: object  # callable: list of indices -> (n, H, W) float32 HU
    frame_uid: str = ""
    series_uid: str = ""
    source_series_uid: str = ""
    numbers: np.ndarray | None = None  # each slice's place in its split (None: 0, 1, 2...)

    @property
    def n_slices(self) -> int:
        return len(self.z_mm)

    def slice_number(self, index: int) -> int:
        return index if self.numbers is None else int(self.numbers[index])

    def read_hu(self, indices: list[int]) -> np.ndarray:
        return self.reader(indices)


def dataset_inputs(dataset: Path, split: str, denoisers: dict[str, object],
                   dose: float | None = None, every: int = 1) -> tuple[list, list]:
    """Test series (the low-dose input, then each model's output on it) and references
    (the full dose) for every case in a ``prepare`` dataset's split.

    ``dose`` picks one of a multi-dose dataset's simulated doses; None is the primary dose
    (low.npy), the one every dataset has. ``every`` scores every n-th slice of each of the
    split's blocks, from its first (a quick look at a long split).
    """
    from ldct_cli.prepare import dose_files, dose_index, load_manifest, open_case

    manifest = load_manifest(dataset)
    if split not in manifest["split"]:
        raise UsageError(f"--split {split!r}: the dataset has {', '.join(manifest['split'])}")
    if every < 1:
        raise UsageError(f"--every {every}: give 1 (every slice) or more")
    index = dose_index(manifest, dose)
    low_name = Path(dose_files(manifest)[index]).stem  # low, low_1...
    cases = {c["id"]: c for c in manifest["cases"]}
    tests, references = [], []
    for part in manifest["split"][split]:
        case = cases[part["case"]]
        low, full = open_case(dataset, case["id"], index)
        rows = np.arange(part["start"], part["stop"])[::every]
        z = np.array(case["z_mm"])[rows] if case["z_mm"] else rows.astype(float)
        numbers = rows - part["start"]  # reports number the slices within the split's block
        frame = f"{dataset}:{case['id']}"  # one frame of reference per case
        common = dict(z_mm=z, pixel_mm=float(case["pixel_mm"]), shape=(case["rows"], case["columns"]),
                      frame_uid=frame, numbers=numbers)
        tag = f" {case['id']}" if len(manifest["split"][split]) > 1 else ""
        references.append(ArraySeries(label=f"full dose{tag}", folder=f"{dataset}/{case['id']}/full",
                                      reader=lambda idx, a=full, r=rows: a[r[idx]].astype(np.float32),
                                      **common))
        tests.append(ArraySeries(label=f"low dose{tag}", folder=f"{dataset}/{case['id']}/{low_name}",
                                 reader=lambda idx, a=low, r=rows: a[r[idx]].astype(np.float32), **common))
        for name, denoiser in denoisers.items():
            def run(idx, a=low, r=rows, d=denoiser, px=float(case["pixel_mm"])):
                # Each slice with its neighbours for 2.5D models, replicated at the case's
                # ends, as ldct denoise feeds a series (neighbours may lie outside the split).
                k = d.context_slices
                around = _with_neighbours(r[idx], k, a.shape[0])
                return d(a[around].astype(np.float32), pixel_mm=px).astype(np.float32)
            tests.append(ArraySeries(label=f"{name}{tag}", folder=f"{dataset}/{case['id']}/{name}",
                                     reader=run, **common))
    if not tests:
        raise UsageError(f"{dataset}: the {split} split is empty")
    return tests, references


def _with_neighbours(indices, k: int, n: int) -> np.ndarray:
    """(len(indices), k) slice indices: each with its k // 2 neighbours either side, clamped to
    [0, n) (the series' end slices replicated, as ldct denoise feeds a 2.5D model)."""
    return np.clip(np.asarray(indices)[:, None] + np.arange(k) - k // 2, 0, n - 1)


def denoised_series(test: InputSeries, name: str, denoiser) -> ArraySeries:
    """``denoiser``'s output on the DICOM series ``test``, computed as evaluate reads it:
    each slice with its ``context_slices`` neighbours (replicated at the series' ends), as
    ``ldct denoise`` feeds a series. Same positions and frame as ``test``, so it pairs
    with ``test``'s reference."""
    n, k = test.n_slices, denoiser.context_slices

    def run(indices: list[int]) -> np.ndarray:
        around = _with_neighbours(indices, k, n)
        stack = np.stack([test.read_hu(list(row)) for row in around])
        return np.asarray(denoiser(stack, pixel_mm=test.pixel_mm), dtype=np.float32)

    return ArraySeries(label=name, folder=f"{test.folder} [{name}]", z_mm=test.z_mm, pixel_mm=test.pixel_mm,
                       shape=test.shape, reader=run, frame_uid=test.frame_uid)


def load_input(folder: Path, label: str | None = None) -> list[InputSeries]:
    """Every CT series under ``folder`` (usually one), with what pairing needs."""
    if not Path(folder).exists():
        raise UsageError(f"{folder}: no such file or folder")
    found = discover(folder)
    if not found.series:
        raise UsageError(f"{folder}: no CT series found")
    inputs = []
    for series in found.series:
        header, _ = load_slice(series.slices[0].path)
        first = series.slices[0]
        if first.orientation and all(s.position for s in series.slices):
            normal = slice_normal(first.orientation)
            z = np.array([float(np.dot(normal, s.position)) for s in series.slices])
        else:
            z = np.arange(series.n_slices, dtype=float)
        referenced = header.get("ReferencedSeriesSequence") or []
        source_uid = str(referenced[0].get("SeriesInstanceUID", "")) if referenced else ""
        try:
            pixel_mm = float(header.PixelSpacing[0])
        except (AttributeError, TypeError, ValueError, IndexError):
            pixel_mm = 1.0
        name = label or str(header.get("SeriesDescription", "") or "") or folder.name
        if len(found.series) > 1:
            name = f"{name} ({series.folder.name}, S{series.number})"
        inputs.append(InputSeries(label=name, series=series, z_mm=z,
                                  frame_uid=str(header.get("FrameOfReferenceUID", "") or ""),
                                  series_uid=series.series_uid, source_series_uid=source_uid,
                                  pixel_mm=pixel_mm))
    return inputs


def pair_by_position(test: InputSeries, reference: InputSeries) -> list[tuple[int, int]]:
    """(test index, reference index) for test slices that have a reference slice at their
    position (within a hundredth of the slice spacing); sorted along z."""
    spacing = float(np.median(np.abs(np.diff(reference.z_mm)))) if len(reference.z_mm) > 1 else 1.0
    tolerance = max(1e-3, 0.01 * spacing)
    pairs = []
    for i, z in enumerate(test.z_mm):
        j = int(np.argmin(np.abs(reference.z_mm - z)))
        if abs(reference.z_mm[j] - z) <= tolerance:
            pairs.append((i, j))
    return sorted(pairs, key=lambda p: test.z_mm[p[0]])


@dataclass
class Scores:
    """Everything measured for one test series."""

    label: str
    folder: str
    against: str  # label of the reference or source, or "" for none
    per_slice: list[dict] = field(default_factory=list)
    nps_f: np.ndarray | None = None
    nps: np.ndarray | None = None
    nps_summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    against_slices: list[int] = field(default_factory=list)  # the reference slices paired with
    role: str = "test"  # or "reference": the reference's own noise and NPS

    def summary(self) -> dict:
        """Mean and SD over slices of every numeric per-slice score."""
        out = {}
        keys = [k for k in (self.per_slice[0] if self.per_slice else {}) if k not in ("z_mm", "slice")]
        for key in keys:
            values = np.array([row[key] for row in self.per_slice if row.get(key) is not None], dtype=float)
            if len(values) and not np.isfinite(values).any():  # e.g. PSNR of identical images
                out[key] = {"mean": float(values[0]), "sd": 0.0}
                continue
            values = values[np.isfinite(values)]
            if len(values):
                out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        out.update({k: float(v) for k, v in self.nps_summary.items()})
        return out


@dataclass(frozen=True)
class Settings:
    """What every results file records beside the numbers."""

    window: object  # metrics.Window
    roi_px: int = 32
    n_rois: int = 4
    device: str = "cpu"
    fixed_rois: tuple[tuple[int, int], ...] = ()  # uniform ROIs given by the user (every slice)
    cnr_pairs: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...] = ()  # (name, roi a, roi b)


def read_roi_file(path: Path) -> dict:
    """A JSON file of ROIs: ``{"roi_px": 16, "uniform": [[row, col], ...],
    "cnr": [{"name": "lesion", "a": [row, col], "b": [row, col]}]}`` (top-left corners,
    in pixels, applied to every slice)."""
    try:
        data = json.loads(Path(path).read_text())
        out = {"roi_px": int(data.get("roi_px", 32)),
               "fixed_rois": tuple((int(r), int(c)) for r, c in data.get("uniform", [])),
               "cnr_pairs": tuple((str(p["name"]), (int(p["a"][0]), int(p["a"][1])),
                                   (int(p["b"][0]), int(p["b"][1]))) for p in data.get("cnr", []))}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(f"{path}: not a ROI file ({type(exc).__name__}: {exc}); see `ldct evaluate --help`") from None
    if out["roi_px"] < 4:
        raise UsageError(f"{path}: roi_px must be at least 4")
    return out


def _chunks(pairs: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(pairs), CHUNK):
        yield pairs[start:start + CHUNK]


def score_series(test: InputSeries, against: InputSeries | None, settings: Settings, *,
                 with_reference: bool, slices: list[int] | None = None) -> Scores:
    """Per-slice scores of ``test`` against ``against`` (the reference, or the test's source).

    With a reference: PSNR and SSIM in the window, RMSE in HU (whole slice and body),
    noise SD and HU bias in uniform ROIs found on the reference. Without: noise SD of
    the test and HU bias against its source in ROIs found on the source. The noise
    power spectrum comes from the test's ROIs, detrended. ``slices`` (without ``against``)
    limits the series to those slices.
    """
    from ldct_cli import metrics

    scores = Scores(label=test.label, folder=test.folder,
                    against=against.label if against is not None else "")
    if against is not None:
        if test.shape != against.shape:
            raise EvaluateError(f"{test.folder}: matrix {test.shape} differs from {against.folder}'s {against.shape}")
        if test.frame_uid and against.frame_uid and test.frame_uid != against.frame_uid:
            scores.notes.append("different Frame of Reference: paired by position only")
        pairs = pair_by_position(test, against)
        if not pairs:
            raise EvaluateError(f"{test.folder}: no slice at the positions of {against.folder}")
        if len(pairs) < test.n_slices:
            scores.notes.append(f"{test.n_slices - len(pairs)} slices without a partner were left out")
    else:
        pairs = [(i, i) for i in (slices if slices is not None else range(test.n_slices))]
    if against is not None:
        scores.against_slices = sorted({j for _, j in pairs})
    window, roi = settings.window, settings.roi_px
    nps_sum, nps_count, fx, fy = None, 0, None, None
    for chunk in _chunks(pairs):
        test_hu = test.read_hu([i for i, _ in chunk])
        other_hu = against.read_hu([j for _, j in chunk]) if against is not None else None
        rows = [{"slice": test.slice_number(i), "z_mm": round(float(test.z_mm[i]), 3)} for i, _ in chunk]
        base_hu = other_hu if other_hu is not None else test_hu  # where ROIs are found
        body = metrics.body_mask(base_hu)
        if with_reference:
            psnr = metrics.psnr(test_hu, other_hu, window)
            ssim = metrics.ssim(test_hu, other_hu, window, device=settings.device)
            rmse = metrics.rmse_hu(test_hu, other_hu)
            rmse_body = metrics.rmse_hu(test_hu, other_hu, mask=body)
            for row, p, s, r, rb in zip(rows, psnr, ssim, rmse, rmse_body):
                row.update(psnr_db=float(p), ssim=float(s), rmse_hu=float(r), rmse_body_hu=float(rb))
        nps_rois = []
        for k, row in enumerate(rows):
            for name, a, b in settings.cnr_pairs:
                row[f"cnr_{name}"] = metrics.cnr(test_hu[k], a, b, roi)
            rois = list(settings.fixed_rois) or metrics.find_uniform_rois(
                base_hu[k], roi_px=roi, n=settings.n_rois, body=body[k])
            if not rois:
                continue
            _, sd = metrics.roi_stats(test_hu[k], rois, roi)
            row["noise_sd_hu"] = float(np.mean(sd))
            if other_hu is not None:
                row["hu_bias"] = float(np.mean(metrics.hu_bias(test_hu[k], other_hu[k], rois, roi)))
            nps_rois += [test_hu[k][r:r + roi, c:c + roi] for r, c in rois]
        if nps_rois:
            nps2d, fx, fy = metrics.nps_2d(np.stack(nps_rois), test.pixel_mm)
            nps_sum = nps2d * len(nps_rois) if nps_sum is None else nps_sum + nps2d * len(nps_rois)
            nps_count += len(nps_rois)
        scores.per_slice += rows
    if nps_count:
        f, nps = metrics.radial_nps(nps_sum / nps_count, fx, fy)
        scores.nps_f, scores.nps = f, nps
        scores.nps_summary = metrics.nps_summary(f, nps)
    return scores


def evaluate(tests: list[InputSeries], *, reference: list[InputSeries] | None, settings: Settings,
             out: Path | None = None, montage_slices: int | list[float] = 3) -> dict:
    """Score every test series; write CSV, JSON, pictures and HTML into ``out`` if given."""
    results = []
    if reference is not None:
        paired: dict[int, tuple[InputSeries, set[int]]] = {}
        for test in tests:
            ref = _matching_reference(test, reference)
            results.append(score_series(test, ref, settings, with_reference=True))
            paired.setdefault(id(ref), (ref, set()))[1].update(results[-1].against_slices)
        # The reference's own noise and NPS, on the slices the tests were paired with and in
        # the same ROIs (found on the reference): what a denoiser's texture should approach.
        for ref, used in paired.values():
            scores = score_series(ref, None, settings, with_reference=False, slices=sorted(used))
            scores.label, scores.role = f"{ref.label} (reference)", "reference"
            results.append(scores)
        references = reference
    else:
        by_uid = {t.series_uid: t for t in tests if t.series_uid}
        for test in tests:
            source = by_uid.get(test.source_series_uid)
            results.append(score_series(test, source, settings, with_reference=False))
        references = []
    report = {
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings_dict(settings, with_reference=reference is not None),
        "series": [{"label": s.label, "role": s.role, "folder": s.folder, "against": s.against, "notes": s.notes,
                    "summary": s.summary(), "per_slice": s.per_slice,
                    "nps": {"f_per_mm": s.nps_f.tolist(), "nps_hu2_mm2": s.nps.tolist()}
                    if s.nps is not None else None} for s in results],
    }
    if out is not None:
        write_outputs(out, report, results, tests, references, settings, montage_slices)
    return report


def _matching_reference(test: InputSeries, references: list[InputSeries]) -> InputSeries:
    """The reference series for a test: same Frame of Reference first, else most slices paired."""
    same_frame = [r for r in references if r.frame_uid and r.frame_uid == test.frame_uid]
    candidates = same_frame or references
    best = max(candidates, key=lambda r: len(pair_by_position(test, r)))
    return best


def settings_dict(settings: Settings, *, with_reference: bool) -> dict:
    from ldct_cli.metrics import SSIM_VARIANT

    window = settings.window
    return {
        "window_hu": [window.low_hu, window.high_hu],
        "window_name": window.name,
        "data_range_L": window.data_range,
        "ssim_variant": SSIM_VARIANT,
        "rmse": "HU, unwindowed (whole slice; and inside the body: > -500 HU, largest region)",
        "roi_px": settings.roi_px,
        "rois_per_slice": settings.n_rois,
        "roi_selection": ("given by the user: " + json.dumps([list(r) for r in settings.fixed_rois])
                          if settings.fixed_rois else
                          "uniform soft-tissue ROIs of lowest SD, found on the "
                          + ("reference" if with_reference else "source (or the series itself)")),
        "cnr": ("|mean_a - mean_b| / sqrt((sd_a^2 + sd_b^2) / 2) for " +
                json.dumps([[n, list(a), list(b)] for n, a, b in settings.cnr_pairs])
                if settings.cnr_pairs else "none asked for"),
        "nps": "2D, ROIs plane-detrended, radially averaged, HU^2 mm^2 vs mm^-1; f_avg = sum f NPS / sum NPS",
        "mode": "reference" if with_reference else "reference-free",
        "device": settings.device,
    }


# (summary key, header with its unit, decimals, in the terminal's default table). The
# default table is what fits 80 columns; --wide, the HTML report and the CSV have them all.
SUMMARY_COLUMNS = [("psnr_db", "PSNR (dB)", 2, True), ("ssim", "SSIM", 4, True),
                   ("rmse_hu", "RMSE (HU)", 2, False), ("rmse_body_hu", "RMSE body (HU)", 2, False),
                   ("noise_sd_hu", "noise SD (HU)", 2, True), ("hu_bias", "HU bias (HU)", 2, True)]
NPS_COLUMNS = [("f_peak", "NPS f_peak (mm⁻¹)", False), ("f_avg", "NPS f_avg (mm⁻¹)", True)]
TEXT_COLUMNS = ("series", "vs")  # the others hold numbers (right-aligned)


def _present(report: dict) -> list[tuple[str, str, int, bool]]:
    """The mean-and-SD columns some series has, CNR pairs last."""
    cnr_keys = sorted({k for s in report["series"] for k in s["summary"] if k.startswith("cnr_")})
    return [column for column in SUMMARY_COLUMNS + [(k, f"CNR {k[4:]}", 2, False) for k in cnr_keys]
            if any(column[0] in s["summary"] for s in report["series"])]


def summary_rows(report: dict, *, wide: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-series comparison table (mean ± SD over slices).

    ``wide=False``: the essential columns, compactly, for an 80-column terminal; the
    reference-free mode keeps "vs" (the source each series is compared with).
    """
    present = [c for c in _present(report) if wide or c[3]]
    nps = [c for c in NPS_COLUMNS if wide or c[2]]
    with_vs = wide or report["settings"].get("mode") == "reference-free"
    sep = " ± " if wide else "±"
    header = (["series"] + (["vs"] if with_vs else []) + (["slices"] if wide else [])
              + [name for _, name, _, _ in present] + [name for _, name, _ in nps])
    rows = []
    for s in report["series"]:
        row = [s["label"]] + ([s["against"] or "-"] if with_vs else []) + ([str(len(s["per_slice"]))] if wide else [])
        for key, _, digits, _ in present:
            v = s["summary"].get(key)
            row.append(f"{v['mean']:.{digits}f}{sep}{v['sd']:.{digits}f}" if v else "-")
        for key, _, _ in nps:
            v = s["summary"].get(key)
            row.append(f"{v:.3f}" if v is not None and math.isfinite(v) else "-")
        rows.append(row)
    return header, rows


def summary_csv_rows(report: dict) -> tuple[list[str], list[list]]:
    """The per-series table as numbers for a CSV: mean and SD in columns of their own
    (``psnr_db_mean``, ``psnr_db_sd``...), NPS frequencies in mm⁻¹, empty where not measured."""
    present = _present(report)
    header = (["series", "role", "vs", "slices"] + [f"{key}_{part}" for key, *_ in present for part in ("mean", "sd")]
              + [f"nps_{key}_per_mm" for key, _, _ in NPS_COLUMNS])
    rows = []
    for s in report["series"]:
        row = [s["label"], s["role"], s["against"], len(s["per_slice"])]
        for key, *_ in present:
            v = s["summary"].get(key)
            row += [v["mean"], v["sd"]] if v else ["", ""]
        row += [s["summary"].get(key, "") for key, _, _ in NPS_COLUMNS]
        rows.append(row)
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """A plain CSV: one header line, numbers as numbers (what the numbers depend on, the
    window, L and SSIM variant, is in scores.json's "settings")."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def write_outputs(out: Path, report: dict, results: list[Scores], tests: list[InputSeries],
                  references: list[InputSeries], settings: Settings,
                  montage_slices: int | list[float]) -> None:
    """scores.json, per-slice and per-series CSV, montage/NPS/PSNR pictures, report.html."""
    from ldct_cli import report as pictures

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scores.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    header, rows = summary_rows(report)
    settings_row = report["settings"]
    measured = sorted({k for s in report["series"] for row in s["per_slice"] for k in row} - {"slice", "z_mm"})
    keys = ["slice", "z_mm", *measured]
    per_slice = [[s["label"]] + [row.get(k, "") for k in keys]
                 for s in report["series"] for row in s["per_slice"]]
    _write_csv(out / "scores_per_series.csv", *summary_csv_rows(report))
    _write_csv(out / "scores_per_slice.csv", ["series"] + keys, per_slice)
    images = []
    curves = {s.label: (s.nps_f, s.nps) for s in results if s.nps is not None}
    if curves:
        images.append(("Noise power spectra", pictures.write_nps_plot(
            out / "nps.png", curves=curves, f_avg={s.label: s.nps_summary.get("f_avg") for s in results
                                                   if s.nps is not None})))
    profiles = {s.label: (np.array([r["z_mm"] for r in s.per_slice]), np.array([r["psnr_db"] for r in s.per_slice]))
                for s in results if s.per_slice and "psnr_db" in s.per_slice[0]}
    if profiles:
        images.append(("PSNR along z", pictures.write_profile_plot(
            out / "psnr_z.png", curves=profiles, ylabel="PSNR (dB)",
            title=f"PSNR per slice, window {settings_row['window_hu']} HU")))
    for montage in _montages(out, tests, references, results, settings, montage_slices):
        images.append(montage)
    table = pictures.Table(caption="Per series: mean ± SD over slices", header=header, rows=rows)
    pictures.write_html(out / "report.html", title="ldct evaluate",
                        settings={k: str(v) for k, v in {**settings_row, "tool_version": __version__,
                                                          "created": report["created"]}.items()},
                        tables=[table], images=images)


def _montages(out: Path, tests: list[InputSeries], references: list[InputSeries], results: list[Scores],
              settings: Settings, n_rows: int | list[float]) -> list[tuple[str, Path]]:
    """One montage per reference: chosen slices, each test, the reference, |differences|.

    Without a reference, the difference shown is each test's residual against the series
    it was derived from (|input - output|: what a denoiser removed, anatomy included).
    """
    from ldct_cli import metrics
    from ldct_cli import report as pictures

    window = settings.window
    sources = {t.series_uid: t for t in tests if t.series_uid}
    pictures_out = []
    groups = [(ref, [t for t in tests if _matching_reference(t, references) is ref]) for ref in references] \
        if references else [(None, tests)]
    for ref, group in groups:
        if not group:
            continue
        anchor = group[0]
        pairs = pair_by_position(anchor, ref) if ref is not None else [(i, i) for i in range(anchor.n_slices)]
        if not pairs:
            continue
        if isinstance(n_rows, int):  # that many slices, spread evenly along z
            chosen = [pairs[int(k)] for k in np.linspace(0, len(pairs) - 1, min(n_rows, len(pairs))).round()]
        else:  # the paired slices nearest the asked positions (mm)
            z_pairs = np.array([anchor.z_mm[i] for i, _ in pairs])
            chosen = [pairs[int(np.argmin(np.abs(z_pairs - z)))] for z in n_rows]
        rows = []
        for i_anchor, j_ref in chosen:
            z = anchor.z_mm[i_anchor]
            ref_hu = ref.read_hu([j_ref])[0] if ref is not None else None
            found = list(settings.fixed_rois) or metrics.find_uniform_rois(
                ref_hu if ref_hu is not None else anchor.read_hu([i_anchor])[0], roi_px=settings.roi_px,
                n=settings.n_rois)
            rois = tuple((r, c, settings.roi_px) for r, c in found)
            panels, diffs = [], []
            for test in group:
                i = int(np.argmin(np.abs(test.z_mm - z)))
                image = test.read_hu([i])[0]
                note = ""
                if ref_hu is not None:
                    note = (f"PSNR {metrics.psnr(image, ref_hu, window).item():.2f} dB / "
                            f"SSIM {metrics.ssim(image, ref_hu, window).item():.3f}")
                    diffs.append(pictures.Panel(label=f"|{test.label} - reference|",
                                                image_hu=np.abs(image - ref_hu), kind="difference"))
                source = sources.get(test.source_series_uid) if ref_hu is None else None
                if source is not None and source is not test:
                    k = int(np.argmin(np.abs(source.z_mm - test.z_mm[i])))
                    diffs.append(pictures.Panel(label=f"residual |{source.label} - {test.label}|",
                                                image_hu=source.read_hu([k])[0] - image, kind="difference"))
                panels.append(pictures.Panel(label=test.label, image_hu=image, note=note, rois=rois))
            if ref_hu is not None:
                panels.append(pictures.Panel(label=f"reference: {ref.label}", image_hu=ref_hu,
                                             note=f"z = {z:.1f} mm", rois=rois))
            rows.append(panels + diffs)
        name = safe_name(f"montage_{ref.label if ref is not None else anchor.label}", max_len=60)
        path = pictures.write_montage(out / f"{name}.png", rows=rows, window=(window.low_hu, window.high_hu),
                                      window_label=f"window [{window.low_hu:g}, {window.high_hu:g}] HU "
                                                   f"(L = {window.data_range:g})",
                                      title=f"{ref.label if ref is not None else anchor.label}")
        pictures_out.append((f"Montage: {ref.label if ref is not None else anchor.label}", path))
    return pictures_out
