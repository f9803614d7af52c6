"""``ldct prepare``: DICOM folders -> a training dataset of paired low/full-dose HU slices.

Layout of a dataset folder::

    manifest.json               cases, geometry, sources, split, patch settings, provenance
    cases/<case>/full.npy       int16 HU, (slices, H, W), memory-mappable
    cases/<case>/low.npy        the matching low-dose slices, same shape: the primary dose
    cases/<case>/low_1.npy ...  with several simulated doses, the others, in the order listed

A dataset simulated at several doses (``--simulate-dose 0.1,0.25,0.5``) lets one model
train on a mix of noise levels; ``low_doses`` in the manifest gives the dose of each
low-dose file in file order (absent for a real low dose). Validation and evaluation use
``low.npy`` unless told otherwise, so single-dose tools read every dataset alike.

Slices are paired by position along the slice normal, never by file name. HU come
from the rescale tags; padding pixels become air (-1000 HU). The split is by case
(patient), or, for few cases, by contiguous blocks of slices along z.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ldct_cli._version import __version__
from ldct_cli.dicom.read import Series, discover, load_slice, padding_mask, rescale_of, slice_normal, stored_to_hu
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.fsutil import safe_name, staged_folder

FORMAT = "ldct-dataset"
FORMAT_VERSION = 1
AIR_HU = -1000
SPLITS = ("train", "val", "test")
SPLIT_BY = ("auto", "case", "block")
DOSE_TOLERANCE = 1e-6  # doses written to and read back from JSON compare equal within this


@dataclass(frozen=True)
class PatchSettings:
    """How the trainer samples patches (Lalithnarayan, Somayaji and Shaikh, "Denoising of Low
    Dose CT Images Using Generative Models", §5.3.5; WGAN-VGG's code rejects air patches)."""

    patch_size: int = 64
    patches_per_slice: int = 16
    body_threshold_hu: float = -500.0  # a pixel above this is body, not air or background
    min_body_fraction: float = 0.5  # patches with less body than this are rejected


@dataclass(frozen=True)
class SplitSettings:
    """Deterministic split into train/val/test: by case, or by contiguous blocks along z."""

    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    by: str = "auto"  # "case", "block", or "auto": by case when every split can have a case
    seed: int = 0
    gap: int = 4  # slices dropped between blocks (neighbouring slices look alike)

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise UsageError(f"--split {','.join(map(str, self.fractions))}: three fractions that sum to 1")
        if self.by not in SPLIT_BY:
            raise UsageError(f"--split-by {self.by!r}: expected {', '.join(SPLIT_BY)}")
        if self.gap < 0:
            raise UsageError("--gap must be 0 or more")


@dataclass
class CaseSource:
    """One case to prepare: its full-dose series and where its low dose comes from."""

    case_id: str
    full: Series
    low: Series | None  # None: simulated


@dataclass
class CaseRecord:
    """What the manifest says of one prepared case."""

    id: str
    slices: int
    rows: int
    columns: int
    pixel_mm: float
    slice_mm: float
    z_mm: list[float]
    full_series_uid: str
    low_series_uid: str | None
    full_source: str
    low_source: str | None
    simulation: list[dict] | None = None  # scan-matched: per dose, what was measured and chosen


class PrepareError(LdctError):
    """Inputs that cannot make a dataset (mismatched pairs, missing series)."""


def _single_series(folder: Path, role: str) -> Series:
    found = discover(folder)
    if len(found.series) != 1:
        raise UsageError(f"{folder}: --{role} must hold exactly one CT series, found {len(found.series)}")
    return found.series[0]


def case_id_for(series: Series, label: str) -> str:
    """A stable case id: a sanitized label plus a hash of the series identity (no patient tags)."""
    digest = hashlib.sha256(series.key.encode()).hexdigest()[:8]
    return f"{safe_name(label, max_len=24)}_{digest}"


def paired_sources(low: Path, full: Path) -> list[CaseSource]:
    """``--low DIR --full DIR``: one case, one series in each folder."""
    full_series, low_series = _single_series(full, "full"), _single_series(low, "low")
    return [CaseSource(case_id=case_id_for(full_series, full.name), full=full_series, low=low_series)]


def mayo_sources(root: Path, *, low_pattern: str = "*quarter*", full_pattern: str = "*full*") -> list[CaseSource]:
    """A Mayo/AAPM-style root: one folder per patient, holding a low- and a full-dose series.

    A series is low (or full) dose when its folder path below the patient folder matches
    the pattern (case-insensitive shell pattern).
    """
    patients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not patients:
        raise UsageError(f"{root}: no patient folders")
    sources = []
    for patient in patients:
        found = discover(patient).series

        def matching(pattern: str, role: str) -> Series:
            hits = [s for s in found
                    if fnmatch.fnmatch(s.folder.relative_to(patient).as_posix().lower(), pattern.lower())]
            if len(hits) != 1:
                raise PrepareError(f"patient {patient.name}: {len(hits)} {role}-dose series match "
                                   f"{pattern!r} (expected one; see --low-pattern/--full-pattern)")
            return hits[0]

        sources.append(CaseSource(case_id=safe_name(patient.name), full=matching(full_pattern, "full"),
                                  low=matching(low_pattern, "low")))
    return sources


def parse_doses(text: str) -> list[float]:
    """``--simulate-dose 0.1,0.25,0.5``: distinct fractions of the full dose, the primary first."""
    try:
        doses = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--simulate-dose {text!r}: dose fractions separated by commas, "
                         "e.g. 0.25 or 0.1,0.25,0.5") from None
    for dose in doses:
        if not 0.0 < dose < 1.0:
            raise UsageError(f"--simulate-dose {text}: each dose must be a fraction of the full dose, "
                             f"between 0 and 1 (got {dose:g})")
    if len({round(d / DOSE_TOLERANCE) for d in doses}) != len(doses):
        raise UsageError(f"--simulate-dose {text}: each dose may be listed only once")
    return doses


def with_realizations(doses: list[float], realizations: int) -> list[float]:
    """``--realizations N``: each dose simulated N times with noise of its own, as more files.

    The list repeats: every dose's first realization, then every dose's second... so the
    primary (index 0) and the first file of each dose are what a single realization writes.
    """
    if realizations < 1:
        raise UsageError(f"--realizations {realizations}: at least 1 (noise draws per dose)")
    return [dose for _ in range(realizations) for dose in doses]


def parse_texture_spread(text: str, realizations: int) -> list[float]:
    """``--texture-spread 0,-1,2``: TAU offsets of the fitted texture, one per realization in turn."""
    try:
        spread = [float(part) for part in text.split(",")]
    except ValueError:
        spread = []
    if not spread or not all(math.isfinite(v) for v in spread):
        raise UsageError(f"--texture-spread {text!r}: TAU offsets separated by commas, e.g. 0,-1,2")
    if realizations % len(spread):
        raise UsageError(f"--texture-spread {text}: {len(spread)} textures need --realizations {len(spread)} "
                         "(or a multiple): realization k of each dose takes the k-th offset in turn")
    return spread


def dose_seed(seed: int, index: int) -> int:
    """The noise seed of the ``index``-th simulated dose: independent noise per dose, while the
    primary dose keeps ``seed`` so a single-dose dataset is what it always was."""
    return int(seed) + 1000 * index


def simulation_plan(doses_text: str, *, realizations: int = 1, texture_spread: str = "0",
                    i0: float | None = None, recon_filter: str | None = None, seed: int = 0,
                    device: str = "auto") -> tuple[list, dict]:
    """The simulators of ``--simulate-dose`` (one per low-dose file: every dose, then each
    further realization, realization k taking the k-th texture offset in turn) and the
    manifest's record of them."""
    from ldct_cli.simulate import build_simulator

    distinct = parse_doses(doses_text)
    doses = with_realizations(distinct, realizations)
    spread = parse_texture_spread(texture_spread, realizations)
    offsets = [spread[(i // len(distinct)) % len(spread)] for i in range(len(doses))]
    built = [build_simulator(dose=dose, i0=i0, seed=dose_seed(seed, i), device=device,
                             recon_filter=recon_filter, texture_offset=offset)
             for i, (dose, offset) in enumerate(zip(doses, offsets))]
    simulation = {**dict(built[0][1].settings), "doses": doses, "realizations": realizations,
                  "texture_offsets": offsets, "seeds": [dose_seed(seed, i) for i in range(len(doses))]}
    return [sim for sim, _ in built], simulation


def simulated_sources(full: Path) -> list[CaseSource]:
    """``--full DIR --simulate-dose A``: every CT series under DIR is a case."""
    found = discover(full).series
    if not found:
        raise UsageError(f"{full}: no CT series found")
    return [CaseSource(case_id=case_id_for(s, s.folder.name), full=s, low=None) for s in found]


def _positions(series: Series) -> np.ndarray:
    """Each slice's position along the first slice's normal, in mm (None-safe)."""
    first = series.slices[0]
    if not first.orientation or not all(s.position for s in series.slices):
        raise PrepareError(f"{series.folder}: slices without Image Position/Orientation cannot be paired")
    normal = slice_normal(first.orientation)
    return np.array([float(np.dot(normal, s.position)) for s in series.slices])


def pair_slices(case: CaseSource) -> list[tuple[int, int]]:
    """(full index, low index) pairs by position along the normal; any mismatch is an error."""
    full, low = case.full, case.low
    shapes = {(s.rows, s.columns) for s in full.slices + low.slices}
    if len(shapes) != 1:
        raise PrepareError(f"case {case.case_id}: low- and full-dose matrices differ ({sorted(shapes)})")
    if full.n_slices != low.n_slices:
        raise PrepareError(f"case {case.case_id}: {low.n_slices} low-dose slices but {full.n_slices} full-dose")
    z_full, z_low = _positions(full), _positions(low)
    tolerance = 0.01 + 0.01 * float(np.median(np.abs(np.diff(z_full)))) if full.n_slices > 1 else 0.01
    pairs = []
    for i, z in enumerate(z_full):
        j = int(np.argmin(np.abs(z_low - z)))
        if abs(z_low[j] - z) > tolerance:
            raise PrepareError(f"case {case.case_id}: no low-dose slice at z = {z:.2f} mm "
                               f"(nearest {z_low[j]:.2f} mm)")
        pairs.append((i, j))
    if len({j for _, j in pairs}) != len(pairs):
        raise PrepareError(f"case {case.case_id}: two full-dose slices pair with the same low-dose slice")
    return pairs


def slice_hu(path: Path) -> tuple[np.ndarray, Any]:
    """One slice in HU (float32) with padding set to air, and its header."""
    header, stored = load_slice(path)
    image = stored_to_hu(stored, *rescale_of(header))
    image[padding_mask(header, stored, image)] = AIR_HU
    return image, header


def _spacing(series: Series, header) -> tuple[float, float]:
    """(pixel mm, slice mm); a missing Slice Thickness is inferred from the positions."""
    try:
        pixel = float(header.PixelSpacing[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        raise PrepareError(f"{series.slices[0].path}: no Pixel Spacing") from None
    thickness = header.get("SliceThickness")
    if thickness not in (None, ""):
        return pixel, float(thickness)
    z = _positions(series)
    return pixel, float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else 0.0


def _resample(image: np.ndarray, pixel_mm: float, target_mm: float) -> np.ndarray:
    """In-plane resampling to ``target_mm`` pixels (linear, SimpleITK)."""
    import SimpleITK as sitk

    source = sitk.GetImageFromArray(image)
    source.SetSpacing((pixel_mm, pixel_mm))
    size = [max(1, int(round(n * pixel_mm / target_mm))) for n in image.shape[::-1]]
    out = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(),
                        (target_mm, target_mm), source.GetDirection(), float(AIR_HU))
    return sitk.GetArrayFromImage(out)


def to_int16(image_hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image_hu), -1024, 3071).astype(np.int16)


def resolve_split(settings: SplitSettings, slices_per_case: list[int]) -> tuple[SplitSettings, str]:
    """The split ``settings`` asks for, made concrete for these cases: (settings with ``by``
    "case" or "block", a note saying what was chosen and why, or "").

    By case needs a case for every split asked for: one patient by case would put every
    slice in train, and ``ldct train`` needs val slices. So "auto" splits fewer cases than
    splits by blocks along z, and an explicit "case" is refused before any work.
    """
    wanted = [name for name, f in zip(SPLITS, settings.fractions) if f > 0]
    n_cases = len(slices_per_case)
    if len(wanted) <= 1 or n_cases >= len(wanted):
        return (replace(settings, by="case") if settings.by == "auto" else settings), ""
    cases = f"{n_cases} case{'s' if n_cases != 1 else ''}"
    if settings.by == "case":
        raise UsageError(f"--split-by case: {cases} cannot fill the {len(wanted)} splits "
                         f"{', '.join(wanted)}; use --split-by block (contiguous blocks of slices "
                         "along z), give more cases, or --split 1,0,0")
    if settings.by == "block":
        return settings, ""
    fewest = min(slices_per_case)
    if fewest - settings.gap * (len(wanted) - 1) < len(wanted):
        return replace(settings, by="case"), (
            f"{cases} of {fewest} slices: too few to split into {', '.join(wanted)}, every slice is "
            f"in train (ldct train needs val slices: give more cases or slices, or a smaller --gap "
            f"than {settings.gap})")
    return replace(settings, by="block"), (
        f"{cases}: split by contiguous blocks of slices along z (--split-by block), "
        f"{settings.gap} slices left out between blocks; give {len(wanted)} or more cases to split by case")


def split_cases(records: list[CaseRecord], settings: SplitSettings) -> dict[str, list[dict]]:
    """Each split as a list of ``{"case", "start", "stop"}`` slice ranges."""
    if settings.by == "auto":
        settings, _ = resolve_split(settings, [r.slices for r in records])
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    if settings.by == "case":
        order = [records[i] for i in np.random.default_rng(settings.seed).permutation(len(records))]
        counts = _counts(len(order), settings.fractions)
        start = 0
        for name, count in zip(SPLITS, counts):
            for record in order[start:start + count]:
                splits[name].append({"case": record.id, "start": 0, "stop": record.slices})
            start += count
        return splits
    for record in records:  # contiguous blocks along z, a gap between them
        usable = record.slices - settings.gap * (sum(f > 0 for f in settings.fractions) - 1)
        if usable < sum(f > 0 for f in settings.fractions):
            raise PrepareError(f"case {record.id}: {record.slices} slices are too few to split in blocks")
        start = 0
        for name, count in zip(SPLITS, _counts(usable, settings.fractions)):
            if count:
                splits[name].append({"case": record.id, "start": start, "stop": start + count})
                start += count + settings.gap
    return splits


def _counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Integer counts per split that add up to ``n``; a non-zero fraction gets at least one."""
    counts = [int(np.floor(n * f)) for f in fractions]
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n >= sum(f > 0 for f in fractions):
            counts[i] = 1
    while sum(counts) > n:
        counts[int(np.argmax(counts))] -= 1
    counts[int(np.argmax(fractions))] += n - sum(counts)
    return counts


ProgressFn = Callable[[str, int, int], None]  # (case id, slices done, slices in case)


def prepare(dataset: Path | str, sources: list[CaseSource], *, simulator=None,
            simulation: dict | None = None, spacing_mm: float | None = None,
            patch: PatchSettings = PatchSettings(), split: SplitSettings = SplitSettings(),
            overwrite: bool = False, how: dict | None = None,
            progress: ProgressFn | None = None) -> dict:
    """Write the dataset folder (atomically: complete, or not there at all); return its manifest.

    Cases without a low-dose series get one from ``simulator`` (a ``LowDoseSimulator``), or
    one per dose from a list of them (the primary dose first: ``low.npy``, then ``low_1.npy``...);
    ``simulation`` records their settings (dose, I0, seed...) in the manifest.
    """
    dataset = Path(dataset)
    simulators = _as_list(simulator)
    if dataset.exists() and not overwrite:
        raise UsageError(f"{dataset}: exists already (use --overwrite to replace it)")
    if not simulators and any(c.low is None for c in sources):
        raise UsageError("cases without a low-dose series need a simulator (--simulate-dose)")
    if len(simulators) > 1 and any(c.low is not None for c in sources):
        # every case must hold the same doses, or the sampler's dose draw would name missing files
        raise UsageError("several simulated doses need every case simulated (no real low-dose series)")
    ids = [c.case_id for c in sources]
    if len(set(ids)) != len(ids):
        raise PrepareError(f"two cases share an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    asked = split
    split, note = resolve_split(split, [c.full.n_slices for c in sources])  # refused before any work
    records = []
    with staged_folder(dataset, overwrite=overwrite) as staging:
        for case in sources:
            records.append(_write_case(staging / "cases" / case.case_id, case, simulators=simulators,
                                       spacing_mm=spacing_mm, progress=progress))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "how": how or {},
            "simulated": bool(simulators),
            "simulation": simulation,
            "low_doses": [float(s.dose) for s in simulators] if simulators else None,
            "spacing_mm": spacing_mm,
            "patch": asdict(patch),
            "split_settings": {**asdict(split), "fractions": list(split.fractions), "asked": asked.by,
                               "note": note},
            "split": split_cases(records, split),
            "cases": [asdict(r) for r in records],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _as_list(simulator) -> list:
    """``prepare``'s ``simulator``: none, one, or a list of them, as a list."""
    if simulator is None:
        return []
    return list(simulator) if isinstance(simulator, Sequence) else [simulator]


def _write_case(folder: Path, case: CaseSource, *, simulators: list, spacing_mm: float | None,
                progress: ProgressFn | None) -> CaseRecord:
    folder.mkdir(parents=True)
    full = case.full
    pairs = pair_slices(case) if case.low is not None else [(i, None) for i in range(full.n_slices)]
    first, header = slice_hu(full.slices[0].path)
    pixel_mm, slice_mm = _spacing(full, header)
    shape = first.shape if spacing_mm is None else _resample(first, pixel_mm, spacing_mm).shape
    def open_out(name: str) -> np.ndarray:
        return np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.int16, shape=(len(pairs), *shape))

    full_out = open_out("full.npy")
    low_outs = [open_out(name) for name in low_file_names(1 if case.low is not None else len(simulators))]
    if case.low is None:  # scan-matched simulators fit this case's noise first
        simulators = [s.fitted_to(full) if hasattr(s, "fitted_to") else s for s in simulators]
    for k, (i, j) in enumerate(pairs):
        image_full, header = slice_hu(full.slices[i].path)
        if case.low is not None:
            images_low = [slice_hu(case.low.slices[j].path)[0]]
        else:
            images_low = [simulate(image_full[None, None], pixel_mm=pixel_mm)[0] for simulate in simulators]
        if spacing_mm is not None:
            image_full = _resample(image_full, pixel_mm, spacing_mm)
            images_low = [_resample(image, pixel_mm, spacing_mm) for image in images_low]
        full_out[k] = to_int16(image_full)
        for low_out, image_low in zip(low_outs, images_low):
            low_out[k] = to_int16(image_low)
        if progress:
            progress(case.case_id, k + 1, len(pairs))
    for out in (full_out, *low_outs):
        out.flush()
    del full_out, low_outs, out  # close the memmaps before the staged folder is moved
    z = _positions(full).tolist() if all(s.position for s in full.slices) else []
    return CaseRecord(
        id=case.case_id, slices=len(pairs), rows=shape[0], columns=shape[1],
        pixel_mm=spacing_mm or pixel_mm, slice_mm=slice_mm, z_mm=[round(v, 4) for v in z],
        full_series_uid=full.series_uid, low_series_uid=case.low.series_uid if case.low else None,
        full_source=str(full.folder), low_source=str(case.low.folder) if case.low else None,
        simulation=_simulation_details(simulators) if case.low is None else None,
    )


def _simulation_details(simulators: list) -> list[dict] | None:
    """What each scan-matched simulator measured and chose for a case (per-slice I0 of the primary only)."""
    details = [s.series_details() for s in simulators if hasattr(s, "series_details")]
    for d in details[1:]:
        d.pop("i0_per_slice", None)
    return details or None


def load_manifest(dataset: Path | str) -> dict:
    """Read and check a dataset's manifest."""
    path = Path(dataset) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not an ldct dataset manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not an ldct dataset manifest")
    return manifest


def low_file_names(count: int) -> list[str]:
    """The low-dose files of a case holding ``count`` doses: low.npy, low_1.npy, low_2.npy..."""
    return ["low.npy"] + [f"low_{i}.npy" for i in range(1, count)]


def dose_files(manifest: dict) -> list[str]:
    """Each low-dose file of a case, in the order of the manifest's ``low_doses``
    (just low.npy for a real low dose or a dataset older than multi-dose)."""
    return low_file_names(len(manifest.get("low_doses") or [None]))


def simulated_doses(manifest: dict) -> list[float]:
    """The distinct doses a dataset was simulated at, the primary first (each once, however
    many realizations); [] for a real low dose or a dataset older than multi-dose."""
    return [float(d) for d in dict.fromkeys(manifest.get("low_doses") or [])]


def _doses_text(manifest: dict) -> str:
    """The doses a dataset holds, for error messages."""
    doses = simulated_doses(manifest)
    if not doses:
        return "one real (not simulated) low dose"
    return "doses " + ", ".join(f"{d:g}" for d in doses)


def dose_index(manifest: dict, dose: float | None) -> int:
    """The index of ``dose`` among the dataset's low-dose files (its first realization);
    None means the primary (0)."""
    if dose is None:
        return 0
    for index, known in enumerate(manifest.get("low_doses") or []):
        if abs(float(known) - dose) <= DOSE_TOLERANCE:
            return index
    raise UsageError(f"dose {dose:g} is not in the dataset, which has {_doses_text(manifest)}")


def open_case(dataset: Path | str, case_id: str, dose_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(low, full) int16 HU arrays of a case, memory-mapped (read-only); ``dose_index`` picks the
    low-dose file (0, the primary dose, needs no manifest: every dataset has low.npy)."""
    folder = Path(dataset) / "cases" / case_id
    low = "low.npy"
    if dose_index != 0:
        manifest = load_manifest(dataset)
        files = dose_files(manifest)
        if not 0 <= dose_index < len(files):
            raise UsageError(f"dose index {dose_index}: the dataset has {_doses_text(manifest)} "
                             f"(indices 0 to {len(files) - 1})")
        low = files[dose_index]
    return (np.load(folder / low, mmap_mode="r"), np.load(folder / "full.npy", mmap_mode="r"))
