"""Bundled weights: the checkpoints in ``weights/`` and the manifest that vouches for them.

``weights/manifest.json`` lists every bundled checkpoint with the sha256 of its file, the
model and kwargs, how it was trained (exact commands, config, steps, time), what it was
trained on (series, source, licence, simulated dose and I0) and its scores on held-out
real CT with the quality bar checked. A file is only used when the manifest lists it and
its sha256 matches: a damaged or swapped file is a clear error, never a silent guess.

The folder is the top-level ``weights/`` of a checkout; a wheel installs the same files
as ``ldct_cli/weights/`` (see pyproject.toml). ``$LDCT_WEIGHTS_DIR`` points elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldct_cli.errors import CheckpointError
from ldct_cli.fsutil import file_sha256  # noqa: F401  (bundled.file_sha256: the manifest's hash)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldct-weights-manifest"
MANIFEST_VERSION = 1

# The quality bar of bundled weights (held-out real CT, simulated quarter dose,
# window [-160, 240] HU, L = 400).
BAR_PSNR_GAIN_DB = 3.0
BAR_NOISE_REDUCTION = 0.40
BAR_MAX_ABS_BIAS_HU = 5.0
# The real-data bar (real quarter-dose scans of other patients and scanners, never trained
# on: ../shared/data/mayo_dev; same window): on every group PSNR at least the best NLM of a
# strength sweep + 0.5 dB and SSIM at least the best classical filter's, |HU bias| in
# uniform ROIs at most 5 HU; over the groups a mean PSNR gain over the input of 4.5 dB.
REAL_BAR_OVER_BEST_NLM_DB = 0.5
REAL_BAR_MEAN_GAIN_DB = 4.5
CLASSICAL_ROWS = ("gaussian", "nlm", "tv")  # each at the best strength of its sweep


def weights_dir() -> Path:
    """Where the bundled weights live: $LDCT_WEIGHTS_DIR, the installed package, or the checkout."""
    env = os.environ.get("LDCT_WEIGHTS_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    installed = package / "weights"  # a wheel maps weights/ into the package
    if (installed / MANIFEST).is_file():
        return installed
    return package.parent / "weights"  # a checkout (or an editable install)


@dataclass(frozen=True)
class BundledWeights:
    """One manifest entry; ``record`` keeps the whole entry (training, data, held-out scores)."""

    name: str
    file: str
    sha256: str
    record: dict[str, Any] = field(default_factory=dict)

    def bar_sets(self) -> list[dict]:
        """The held-out sets the bar decides on; those marked "bar_applies": false (another
        scanner, reported for generalization) are scored and shown but do not decide."""
        return [t for t in self.record.get("held_out") or [] if t.get("bar_applies", True)]

    @property
    def meets_bar(self) -> bool | None:
        """Whether the weights meet the bar: the real-data bar (``real_data``) and the bar of
        each held-out set that decides. A generator's entry without real-data scores does not
        (the bar needs them); None when nothing was scored at all."""
        sets, real = self.bar_sets(), self.record.get("real_data")
        if not sets and real is None:
            return None
        return (real is not None and real.get("bar", {}).get("pass", False)
                and all(test.get("bar", {}).get("pass", False) for test in sets))

    def failed_checks(self) -> list[str]:
        """``set: check value`` of each bar check missed: the real data's, then each held-out
        set's that decides."""
        real = self.record.get("real_data")
        missed = ([f"{real.get('name', 'real data')}: {miss}" for miss in missed_checks(real)] if real
                  else ["real data: not scored"] if self.bar_sets() else [])
        return missed + [f"{test['name']}: {miss}" for test in self.bar_sets() for miss in missed_checks(test)]


def missed_checks(test: dict) -> list[str]:
    """``check value`` of each bar check one scored set (held-out or real data) misses."""
    missed = []
    for name, check in test.get("bar", {}).get("checks", {}).items():
        if not check["pass"]:
            value = check["value"]
            missed.append(f"{name} {value:.3g}" if value is not None else f"{name} not measured")
    return missed


def read_manifest(folder: Path | None = None) -> dict[str, BundledWeights]:
    """The manifest's entries by model name; ``{}`` when there is no manifest."""
    folder = weights_dir() if folder is None else folder
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {MANIFEST_FORMAT!r}")
        if int(data.get("format_version", 0)) > MANIFEST_VERSION:
            raise ValueError(f"format version {data['format_version']} is newer than this ldct-cli reads")
        return {name: BundledWeights(name=name, file=entry["file"], sha256=entry["sha256"], record=entry)
                for name, entry in data["weights"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad weights manifest ({exc})") from None


def write_manifest(entries: dict[str, dict[str, Any]], folder: Path | None = None) -> Path:
    """Write the manifest (entries sorted by name) atomically."""
    from ldct_cli.fsutil import atomic_path

    folder = weights_dir() if folder is None else folder
    path = folder / MANIFEST
    payload = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
               "note": "Weights produced by ldct-cli's own prepare and train on the series named "
                       "under 'data'; research use. Clinical use needs training on the site's own "
                       "paired data (ldct prepare, ldct train).",
               "weights": {name: entries[name] for name in sorted(entries)}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return path


def bundled_entry(name: str, folder: Path | None = None) -> BundledWeights | None:
    return read_manifest(folder).get(name)


def bundled_checkpoint(name: str, folder: Path | None = None, *, verify: bool = True) -> Path | None:
    """The verified bundled checkpoint of model ``name``, or None when none is bundled.

    Raises CheckpointError when the manifest lists it but the file is missing or its
    sha256 differs from the manifest's.
    """
    from ldct_cli.models.registry import get_model_info

    get_model_info(name)  # an unknown name is a usage error, not "none bundled"
    folder = weights_dir() if folder is None else folder
    entry = read_manifest(folder).get(name)
    if entry is None:
        return None
    path = folder / entry.file
    if not path.is_file():
        raise CheckpointError(f"{path}: bundled weights of {name!r} are listed in {MANIFEST} but "
                              "missing (a broken install?)")
    if verify:
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise CheckpointError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, {MANIFEST} says "
                                  f"{entry.sha256[:12]}…): the bundled file is damaged or replaced")
    return path


def quality_bar(rows: dict[str, dict[str, float]], model: str, *, objective: str,
                classical_psnr: float | None = None, mse_model_f_avg: float | None = None) -> dict[str, Any]:
    """Check the bundled-weights bar on one held-out set.

    ``rows`` maps "low dose", ``model`` and "reference" to summaries with psnr_db, ssim,
    noise_sd_hu, hu_bias and f_avg (the reference only has the last two). ``objective`` is
    the registry's: "mse" models must beat the best classical filter's PSNR; "adversarial"
    ones must have an NPS mean frequency closer to the reference's than the MSE model's.
    """
    low, out, ref = rows["low dose"], rows[model], rows["reference"]
    checks = {
        "psnr_gain_db": {"value": out["psnr_db"] - low["psnr_db"], "at_least": BAR_PSNR_GAIN_DB},
        "ssim_gain": {"value": out["ssim"] - low["ssim"], "above": 0.0},
        "noise_reduction": {"value": 1.0 - out["noise_sd_hu"] / low["noise_sd_hu"],
                            "at_least": BAR_NOISE_REDUCTION},
        "abs_hu_bias": {"value": abs(out["hu_bias"]), "at_most": BAR_MAX_ABS_BIAS_HU},
    }
    # Without its comparison row the kind-specific check fails: the bar is not shown met.
    if objective == "mse":
        checks["psnr_above_classical_db"] = {
            "value": None if classical_psnr is None else out["psnr_db"] - classical_psnr, "above": 0.0}
    else:
        checks["f_avg_closer_than_mse_model"] = {
            "value": None if mse_model_f_avg is None
            else abs(mse_model_f_avg - ref["f_avg"]) - abs(out["f_avg"] - ref["f_avg"]), "above": 0.0}
    return _judged(checks)


def _judged(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each check passes when its value is measured and meets its ``at_least``, ``above`` or
    ``at_most``; the bar passes when every check does."""
    for check in checks.values():
        value = check["value"]
        check["pass"] = value is not None and bool(value >= check["at_least"] if "at_least" in check
                                                   else value > check["above"] if "above" in check
                                                   else value <= check["at_most"])
    return {"checks": checks, "pass": all(c["pass"] for c in checks.values())}


def real_data_bar(groups: dict[str, dict[str, dict[str, float]]], model: str) -> dict[str, Any]:
    """Check the real-data bar (``REAL_BAR_*``) on real quarter-dose groups.

    ``groups`` maps each group (e.g. "L096_D45f") to its rows: "low dose", ``model``, and
    ``CLASSICAL_ROWS`` at their best swept strength, with psnr_db, ssim and hu_bias. A row
    missing fails its check.
    """
    checks: dict[str, dict[str, Any]] = {}
    gains = []
    for group, rows in groups.items():
        low, out = rows.get("low dose"), rows.get(model)
        nlm = rows.get("nlm")
        classical = [rows[f]["ssim"] for f in CLASSICAL_ROWS if f in rows]
        checks[f"{group} psnr_over_best_nlm_db"] = {
            "value": None if out is None or nlm is None else out["psnr_db"] - nlm["psnr_db"],
            "at_least": REAL_BAR_OVER_BEST_NLM_DB}
        checks[f"{group} ssim_over_best_classical"] = {
            "value": None if out is None or not classical else out["ssim"] - max(classical), "at_least": 0.0}
        checks[f"{group} abs_hu_bias"] = {
            "value": None if out is None else abs(out["hu_bias"]), "at_most": BAR_MAX_ABS_BIAS_HU}
        gains.append(None if out is None or low is None else out["psnr_db"] - low["psnr_db"])
    checks["mean_psnr_gain_db"] = {
        "value": None if not gains or None in gains else sum(gains) / len(gains),
        "at_least": REAL_BAR_MEAN_GAIN_DB}
    return _judged(checks)


# --- what `ldct models` says of an entry ------------------------------------------------

def score_cells(row: dict) -> list[str]:
    """``ldct models``' cells: bundled or not, the mean PSNR gain on real quarter-dose data,
    the gain on the first simulated held-out set the bar decides on, the bar."""
    if row["kind"] == "classical":
        return ["no weights", "-", "-", "-"]
    entry = row["bundled"]
    if entry is None:
        return ["no", "-", "-", "-"]
    bar = {True: "met", False: "NOT met", None: "-"}[row["meets_bar"]]
    real = (entry.get("real_data") or {}).get("bar", {}).get("checks", {}).get("mean_psnr_gain_db", {})
    real_gain = f"{real['value']:+.2f}" if real.get("value") is not None else "-"
    tests = entry.get("held_out") or []
    test = next((t for t in tests if t.get("bar_applies", True)), tests[0] if tests else None)
    if test is None:
        return ["yes", real_gain, "-", bar]
    low, out = test["rows"]["low dose"]["psnr_db"], test["rows"][row["name"]]["psnr_db"]
    return ["yes", real_gain, f"{out - low:+.2f}", bar]


def _real_data_lines(entry: dict, name: str) -> list[str]:
    """``ldct models NAME``: each real quarter-dose group's scores, then the real-data bar."""
    real = entry.get("real_data")
    if real is None:
        return ["real data: not scored (the quality bar needs it)"] if entry.get("held_out") else []
    lines = []
    for group, scored in real["groups"].items():
        rows = scored["rows"]
        low, out, nlm, ref = rows["low dose"], rows[name], rows.get("nlm"), rows.get("reference", {})
        classical = max((rows[f]["ssim"] for f in CLASSICAL_ROWS if f in rows), default=None)
        lines.append(
            f"real data, {real['name']} ({group}, {scored['slices']} slices): PSNR {out['psnr_db']:.2f} dB "
            f"(input {low['psnr_db']:.2f}, {out['psnr_db'] - low['psnr_db']:+.2f}"
            + (f"; best NLM {nlm['psnr_db']:.2f}" if nlm else "") + f"), SSIM {out['ssim']:.3f}"
            + (f" (best classical {classical:.3f})" if classical is not None else "")
            + f", HU bias {out['hu_bias']:+.1f}, NPS f_avg {out['f_avg']:.3f}"
            + (f" (full dose {ref['f_avg']:.3f})" if "f_avg" in ref else ""))
    bar = real["bar"]
    lines.append("real-data bar " + ("met" if bar["pass"] else "NOT met: " + ", ".join(missed_checks(real))))
    return lines


def describe_lines(row: dict) -> list[str]:
    """What ``ldct models NAME`` says about a model's bundled weights (``row``: its listing)."""
    entry = row["bundled"]
    if row["kind"] == "classical":
        return ["no weights: a filter (ldct denoise / ldct evaluate --model " + row["name"] + ")"]
    if entry is None:
        return ["bundled weights: none (train with `ldct train`, denoise with --weights RUN_DIR)"]
    training, data = entry.get("training", {}), entry.get("data", {})
    series = "; ".join(f"{s['folder']} ({s.get('scanner', '?')}; {s.get('source', '?')}, {s.get('licence', '?')})"
                       for s in data.get("series", [])) or "?"
    dose = ""
    if data.get("simulated_dose") and data.get("i0"):
        doses = data.get("simulated_doses") or [data["simulated_dose"]]
        i0 = "scan-matched" if data["i0"] == "matched" else f"{data['i0']:g}"
        dose = (f", simulated dose {doses[0]:g} (I0 {i0})" if len(doses) == 1 else
                ", simulated doses " + ", ".join(f"{d:g}" for d in doses)
                + f" (I0 {i0}; validated at {doses[0]:g})")
    size = f" ({entry['bytes'] / 1e6:.1f} MB)" if "bytes" in entry else ""
    lines = [f"bundled weights: {entry['file']}{size}, {training.get('steps', '?')} steps, "
             f"{training.get('minutes', '?')} min on {training.get('hardware', '?')}",
             f"trained on: {series}{dose}", *_real_data_lines(entry, row["name"])]
    for test in entry.get("held_out", []):
        low, out = test["rows"]["low dose"], test["rows"][row["name"]]
        bar = test["bar"]
        lines.append(f"held out, {test['name']} ({test['series']}): PSNR {out['psnr_db']:.2f} dB "
                     f"({out['psnr_db'] - low['psnr_db']:+.2f}), SSIM {out['ssim']:.3f} ({low['ssim']:.3f}), "
                     f"noise {out['noise_sd_hu']:.1f} HU ({low['noise_sd_hu']:.1f}), HU bias "
                     f"{out['hu_bias']:+.1f}, NPS f_avg {out['f_avg']:.3f} (full dose "
                     f"{test['rows']['reference']['f_avg']:.3f}); quality bar "
                     + ("met" if bar["pass"] else "NOT met: " + ", ".join(missed_checks(test)))
                     + ("" if test.get("bar_applies", True) else " (reported, not required)"))
    return lines
