"""Training data: random paired patches from an ``ldct prepare`` dataset, and whole validation slices.

Every step's patches are a pure function of (seed, rank, step), so a resumed run or a
DDP rank sees exactly the data it would have seen without interruption, whatever the
number of DataLoader workers. A dataset simulated at several doses gives each patch a dose
drawn uniformly from them, so one batch mixes noise levels (variable-dose training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldct_cli.errors import UsageError
from ldct_cli.prepare import SPLITS, dose_files, load_manifest, open_case


TARGETS = ("full", "noisier2noise")


def noisier2noise_target(low: np.ndarray, full: np.ndarray, dose: float) -> np.ndarray:
    """A target whose expectation given ``low`` is the noise-free image, for a pair simulated
    from the full dose: ``full - d / (1 - d) * (low - full)`` at dose fraction ``d``.

    A simulated low dose is the full dose plus added noise, so a network trained to output
    the full dose keeps the full dose's own noise, which it can see in its input. When the
    added noise has the full dose's texture (scan-matched simulation) and (1 - d) / d times
    its variance, the expected full-dose noise given the sum is the fraction d of it, and
    this target removes it (Moran et al., "Noisier2Noise: Learning to Denoise from Unpaired
    Noisy Data", CVPR 2020). Its own noise is larger than the full dose's: a noisier target,
    not a biased one.
    """
    if not 0.0 < dose < 1.0:
        raise ValueError(f"dose fraction {dose} is not in (0, 1)")
    return full - dose / (1.0 - dose) * (low - full)


@dataclass(frozen=True)
class SamplerSettings:
    """What one training step draws: patch geometry, batch shape, background rejection, augmentation."""

    patch_size: int = 64
    batch_size: int = 16
    context_slices: int = 1  # odd k: the target slice and its neighbours, clamped at the case's ends (2.5D)
    batches_per_step: int = 1  # a WGAN step with n_critic=4 consumes 5 batches
    body_threshold_hu: float = -500.0  # a pixel above this is body, not air
    min_body_fraction: float = 0.5
    max_tries: int = 20  # then keep the candidate with the most body: an all-air slice must not hang
    augment: bool = True  # random flips and rot90, the same on low and full
    dose_files: tuple[int, ...] = ()  # the low-dose files drawn from (indices); () = all
    # What the network learns to output (TARGETS): "full", the full-dose patch; or
    # "noisier2noise", the clean-image estimate of a simulated pair (see noisier2noise_target).
    target: str = "full"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UsageError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        for name in ("patch_size", "batch_size", "batches_per_step", "max_tries"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if self.context_slices < 1 or self.context_slices % 2 == 0:
            raise UsageError(f"context_slices must be odd (1, 3, 5...), got {self.context_slices}")
        if not 0.0 <= self.min_body_fraction <= 1.0:
            raise UsageError(f"min_body_fraction must be in [0, 1], got {self.min_body_fraction}")


class PatchPick(NamedTuple):
    """Where one patch came from and how it was transformed (for tests and debugging)."""

    case: str
    index: int  # slice index in the case's arrays
    y: int  # top row of the patch, before augmentation
    x: int  # left column
    hflip: bool
    vflip: bool
    rot90: int  # quarter turns, applied after the flips
    dose: int = 0  # index into the dataset's low-dose files (manifest "low_doses"); 0 is the primary


@dataclass
class ValidationSlice:
    """One whole validation slice: low-dose input with context, full-dose target."""

    case: str
    index: int
    low_hu: np.ndarray  # (k, H, W) float32
    full_hu: np.ndarray  # (H, W) float32
    pixel_mm: float


def _split_ranges(dataset: Path, manifest: dict, split: str) -> list[tuple[str, int, int]]:
    """The split's non-empty (case, start, stop) slice ranges; an unknown or empty split is an error."""
    if split not in manifest.get("split", {}):
        raise UsageError(f"dataset {dataset} has no split {split!r} (expected one of {', '.join(SPLITS)})")
    known = {record["id"] for record in manifest["cases"]}
    ranges = []
    for entry in manifest["split"][split]:
        if entry["case"] not in known:
            raise UsageError(f"dataset {dataset}: split {split!r} names unknown case {entry['case']!r}")
        if entry["stop"] > entry["start"]:
            ranges.append((entry["case"], int(entry["start"]), int(entry["stop"])))
    if not ranges:
        raise UsageError(f"dataset {dataset} has no {split!r} slices")
    return ranges


def _context(n_slices: int, index: int, k: int) -> np.ndarray:
    """Indices of the k slices centred on ``index``, clamped to [0, n_slices) (edge replicate)."""
    half = k // 2
    return np.clip(np.arange(index - half, index + half + 1), 0, n_slices - 1)


def _augmented(patch: np.ndarray, hflip: bool, vflip: bool, rot90: int) -> np.ndarray:
    """``patch`` (..., P, P) flipped then turned in its last two axes."""
    if hflip:
        patch = patch[..., :, ::-1]
    if vflip:
        patch = patch[..., ::-1, :]
    return np.rot90(patch, rot90, axes=(-2, -1))


class PatchSampler(IterableDataset):
    """An endless stream of ``(step, low_hu (n, B, k, P, P), full_hu (n, B, 1, P, P))`` float32 HU batches.

    Workers of a DataLoader split the steps round-robin, so the loader returns them in order.
    """

    def __init__(self, dataset: Path | str, *, split: str = "train", settings: SamplerSettings, seed: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in [0, world_size {world_size})")
        if start_step < 0:
            raise UsageError(f"start_step must be 0 or more, got {start_step}")
        self.dataset = Path(dataset)
        self.split = split
        self.settings = settings
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.rank = rank
        self.world_size = world_size
        manifest = load_manifest(self.dataset)
        self._ranges = _split_ranges(self.dataset, manifest, split)
        records = {record["id"]: record for record in manifest["cases"]}
        size = settings.patch_size
        for case in dict.fromkeys(case for case, _, _ in self._ranges):
            rows, columns = records[case]["rows"], records[case]["columns"]
            if rows < size or columns < size:
                raise UsageError(f"dataset {self.dataset}: case {case} has {rows}x{columns} slices, "
                                 f"smaller than the {size}x{size} patches")
        lengths = np.array([stop - start for _, start, stop in self._ranges])
        self._range_ends = np.cumsum(lengths)  # a uniform draw over all split slices = cases weighted by slices
        self.n_slices = int(self._range_ends[-1])
        self.low_doses: list[float] | None = manifest.get("low_doses")
        self.n_doses = len(dose_files(manifest))
        self._doses = list(settings.dose_files) or list(range(self.n_doses))
        if any(not 0 <= i < self.n_doses for i in self._doses):
            raise UsageError(f"data.dose_files {list(settings.dose_files)}: dataset {self.dataset} has "
                             f"{self.n_doses} low-dose files (indices 0 to {self.n_doses - 1})")
        if settings.target == "noisier2noise" and not (manifest.get("simulated") and self.low_doses):
            raise UsageError(f"dataset {self.dataset}: data.target noisier2noise needs low doses simulated "
                             "from the full dose (ldct prepare --simulate-dose); this one pairs real scans")
        self._arrays: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        # Workers reopen the memmaps themselves: pickling an open one would copy the whole case.
        return {**self.__dict__, "_arrays": {}}

    def _case(self, case: str, dose: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(low at ``dose``, full) memmaps of a case, opened on first use in the process that iterates."""
        if (case, dose) not in self._arrays:
            self._arrays[case, dose] = open_case(self.dataset, case, dose)
        return self._arrays[case, dose]

    def describe(self) -> dict:
        """What this sampler draws, for the training log."""
        per_case: dict[str, int] = {}
        for case, start, stop in self._ranges:
            per_case[case] = per_case.get(case, 0) + stop - start
        s = self.settings
        return {
            "dataset": str(self.dataset), "split": self.split, "cases": len(per_case), "slices": self.n_slices,
            "slices_per_case": per_case, "patch_size": s.patch_size, "batch_size": s.batch_size,
            "batches_per_step": s.batches_per_step, "context_slices": s.context_slices,
            "body_threshold_hu": s.body_threshold_hu, "min_body_fraction": s.min_body_fraction,
            "max_tries": s.max_tries, "augment": s.augment, "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "start_step": self.start_step, "low_doses": self.low_doses,
            "dose_files": self._doses, "target": s.target,
        }

    def _draw_patch(self, rng: np.random.Generator, low_out: np.ndarray, full_out: np.ndarray) -> PatchPick:
        """Fill ``low_out`` (k, P, P) and ``full_out`` (1, P, P) with one patch; return where it came from."""
        s = self.settings
        size = s.patch_size
        u = int(rng.integers(self.n_slices))
        r = int(np.searchsorted(self._range_ends, u, side="right"))
        case, start, stop = self._ranges[r]
        index = start + u - int(self._range_ends[r] - (stop - start))
        # Drawn only with several doses: a single-dose dataset keeps the stream it always had,
        # so runs and resumes from before multi-dose datasets stay exact.
        dose = self._doses[int(rng.integers(len(self._doses)))] if len(self._doses) > 1 else self._doses[0]
        low, full = self._case(case, dose)
        rows, columns = full.shape[1:]
        best = (-1.0, 0, 0)
        for _ in range(s.max_tries):
            y, x = int(rng.integers(rows - size + 1)), int(rng.integers(columns - size + 1))
            body = float(np.mean(full[index, y:y + size, x:x + size] > s.body_threshold_hu))
            if body > best[0]:
                best = (body, y, x)
            if body >= s.min_body_fraction:
                break
        _, y, x = best
        # Drawn even without augmentation, so switching it off leaves the positions unchanged.
        hflip, vflip, rot90 = bool(rng.integers(2)), bool(rng.integers(2)), int(rng.integers(4))
        if not s.augment:
            hflip, vflip, rot90 = False, False, 0
        context = _context(low.shape[0], index, s.context_slices)
        low_out[...] = _augmented(low[context, y:y + size, x:x + size], hflip, vflip, rot90)
        full_out[...] = _augmented(full[index:index + 1, y:y + size, x:x + size], hflip, vflip, rot90)
        if s.target == "noisier2noise":
            centre = s.context_slices // 2
            full_out[...] = noisier2noise_target(low_out[centre:centre + 1], full_out, float(self.low_doses[dose]))
        return PatchPick(case, index, y, x, hflip, vflip, rot90, dose)

    def batch_for_step(self, step: int, *, return_index: bool = False):
        """``(low_hu (n, B, k, P, P), full_hu (n, B, 1, P, P))`` of ``step``; with ``return_index``
        also the list of n*B ``PatchPick`` in (n, B) row-major order."""
        s = self.settings
        n, b, k, size = s.batches_per_step, s.batch_size, s.context_slices, s.patch_size
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        low_hu = np.empty((n, b, k, size, size), np.float32)
        full_hu = np.empty((n, b, 1, size, size), np.float32)
        picks = [self._draw_patch(rng, low_hu[i, j], full_hu[i, j]) for i in range(n) for j in range(b)]
        batch = torch.from_numpy(low_hu), torch.from_numpy(full_hu)
        return (*batch, picks) if return_index else batch

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        workers, offset = (1, 0) if worker is None else (worker.num_workers, worker.id)
        step = self.start_step + offset
        while True:
            yield (step, *self.batch_for_step(step))
            step += workers


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: leave Ctrl-C and SIGTERM to the training process.

    A terminal's Ctrl-C and a job scheduler's SIGTERM reach every process of the group.
    A worker that died of them made the training process fail on its next batch, before
    it could save; the training process saves, then stops its workers itself (a worker
    also exits when its parent dies).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(sampler: PatchSampler, *, workers: int, prefetch: int = 4) -> DataLoader:
    """A DataLoader over ``sampler`` that yields its steps in order, ``workers`` processes drawing them."""
    options = {"prefetch_factor": prefetch} if workers > 0 else {}
    return DataLoader(
        sampler, batch_size=None, num_workers=workers, persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Starting an iterator draws a base seed; from its own generator it leaves the global
        # torch RNG untouched, so a resumed run's model init/dropout stream stays exact.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        **options,
    )


def validation_slices(dataset: Path | str, *, split: str = "val", count: int = 4,
                      context_slices: int = 1, dose_index: int = 0) -> list[ValidationSlice]:
    """``count`` whole slices spread evenly over the split (all of them if fewer), deterministic;
    the low dose is the file ``dose_index`` (the primary dose unless told otherwise, so the
    validation curve of a variable-dose run compares with a single-dose one)."""
    if count < 1:
        raise UsageError(f"count must be 1 or more, got {count}")
    if context_slices < 1 or context_slices % 2 == 0:
        raise UsageError(f"context_slices must be odd (1, 3, 5...), got {context_slices}")
    dataset = Path(dataset)
    manifest = load_manifest(dataset)
    ranges = _split_ranges(dataset, manifest, split)
    flat = [(case, index) for case, start, stop in ranges for index in range(start, stop)]
    if count < len(flat):
        # The centre of each of ``count`` equal shares: even spread, and count=1 picks the middle.
        flat = [flat[int((i + 0.5) * len(flat) / count)] for i in range(count)]
    pixel_mm = {record["id"]: float(record["pixel_mm"]) for record in manifest["cases"]}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for case, index in flat:
        if case not in arrays:
            arrays[case] = open_case(dataset, case, dose_index)
        low, full = arrays[case]
        out.append(ValidationSlice(
            case=case, index=index,
            low_hu=np.asarray(low[_context(low.shape[0], index, context_slices)], np.float32),
            full_hu=np.asarray(full[index], np.float32), pixel_mm=pixel_mm[case]))
    return out

