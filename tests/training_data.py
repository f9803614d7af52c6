"""Small prepared datasets for the training tests, made through the real ``ldct prepare`` code path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from ldct_cli.prepare import SplitSettings, paired_sources, prepare
from tests.synth import SeriesSpec, write_series


def _write_low_dose(full_paths: list[Path], folder: Path, *, noise_hu: float,
                    rng: np.random.Generator) -> None:
    """Copy a full-dose series to ``folder`` as a new series whose HU carry Gaussian noise of sd ``noise_hu``."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for path in full_paths:
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        hu = ds.pixel_array * slope + intercept + rng.normal(0.0, noise_hu, ds.pixel_array.shape)
        # Keep the stored values inside what BitsStored can hold, as a scanner would.
        signed = int(ds.PixelRepresentation) == 1
        lo, hi = (-(1 << (ds.BitsStored - 1)), (1 << (ds.BitsStored - 1)) - 1) if signed else (0, (1 << ds.BitsStored) - 1)
        stored = np.clip(np.rint((hu - intercept) / slope), lo, hi).astype(ds.pixel_array.dtype)
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "SYNTH LOW DOSE"
        ds.save_as(folder / path.name, enforce_file_format=False)


def make_training_dataset(root: Path, *, n_cases: int = 2, n_slices: int = 8, size: int = 64,
                          noise_hu: float = 40.0, split: str = "0.6,0.2,0.2", seed: int = 0) -> Path:
    """Write ``n_cases`` paired phantom series under ``root/dicom`` and prepare ``root/dataset`` from them.

    Cases are split in contiguous blocks along z without gaps; returns the dataset folder.
    """
    root = Path(root)
    sources = []
    for case in range(n_cases):
        full = root / "dicom" / "full" / f"case{case}"  # the folder name labels the case id
        low = root / "dicom" / "low" / f"case{case}"
        paths = write_series(full, SeriesSpec(rows=size, columns=size, n_slices=n_slices, seed=seed + case,
                                              series_description="SYNTH FULL DOSE"))
        _write_low_dose(paths, low, noise_hu=noise_hu, rng=np.random.default_rng([seed, case]))
        sources += paired_sources(low, full)
    fractions = tuple(float(f) for f in split.split(","))
    dataset = root / "dataset"
    prepare(dataset, sources, split=SplitSettings(fractions=fractions, by="block", gap=0))
    return dataset
