"""Patch sampling for training: shapes, exact determinism per (seed, rank, step), worker ordering,
background rejection, aligned augmentation, 2.5D context, split boundaries, validation slices."""

from __future__ import annotations

import pickle
from itertools import islice

import numpy as np
import pytest
import torch

from ldct_cli.errors import UsageError
from ldct_cli.prepare import load_manifest, open_case
from ldct_cli.training.data import (
    PatchSampler,
    SamplerSettings,
    ValidationSlice,
    make_loader,
    validation_slices,
)
from tests.training_data import make_training_dataset

SMALL = SamplerSettings(patch_size=32, batch_size=4, context_slices=3, batches_per_step=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 cases x 8 slices of 64x64; train 0..6, val 6..7, test 7..8 in each."""
    return make_training_dataset(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    """low == full exactly, every slice in train (so the case ends are sampled)."""
    return make_training_dataset(tmp_path_factory.mktemp("clean"), n_slices=4, noise_hu=0.0, split="1,0,0")


def _expected(low, full, pick, k):
    """The patch a pick names, read straight from the memmaps (context clamped, then augmented)."""
    size = SMALL.patch_size
    context = np.clip(np.arange(pick.index - k // 2, pick.index + k // 2 + 1), 0, low.shape[0] - 1)
    region = (slice(pick.y, pick.y + size), slice(pick.x, pick.x + size))
    out = []
    for patch in (low[(context, *region)], full[(slice(pick.index, pick.index + 1), *region)]):
        patch = np.asarray(patch, np.float32)
        if pick.hflip:
            patch = patch[..., ::-1]
        if pick.vflip:
            patch = patch[..., ::-1, :]
        out.append(np.rot90(patch, pick.rot90, axes=(-2, -1)))
    return out


def test_shapes_and_dtypes(dataset):
    step, low, full = next(iter(PatchSampler(dataset, settings=SMALL, seed=0)))
    assert step == 0
    assert low.dtype == full.dtype == torch.float32
    assert low.shape == (2, 4, 3, 32, 32) and full.shape == (2, 4, 1, 32, 32)
    assert -1100 < float(full.min()) and float(full.max()) < 1100  # HU as stored, not normalized


def test_content_is_a_pure_function_of_seed_rank_and_step(dataset):
    a = PatchSampler(dataset, settings=SMALL, seed=7)
    b = PatchSampler(dataset, settings=SMALL, seed=7)
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    for step in (0, 3, 11):
        assert all(torch.equal(x, y) for x, y in zip(a.batch_for_step(step), b.batch_for_step(step)))
    assert not torch.equal(a.batch_for_step(0)[0], a.batch_for_step(1)[0])
    other_seed = PatchSampler(dataset, settings=SMALL, seed=8)
    assert not torch.equal(a.batch_for_step(0)[0], other_seed.batch_for_step(0)[0])
    rank1 = PatchSampler(dataset, settings=SMALL, seed=7, rank=1, world_size=2)
    assert not torch.equal(a.batch_for_step(0)[0], rank1.batch_for_step(0)[0])


def test_resuming_at_a_step_yields_what_a_run_from_zero_yields_there(dataset):
    from_zero = list(islice(iter(PatchSampler(dataset, settings=SMALL, seed=3)), 8))
    resumed = list(islice(iter(PatchSampler(dataset, settings=SMALL, seed=3, start_step=5)), 3))
    assert [s for s, _, _ in resumed] == [5, 6, 7]
    for (s0, low0, full0), (s1, low1, full1) in zip(from_zero[5:], resumed):
        assert s0 == s1 and torch.equal(low0, low1) and torch.equal(full0, full1)


def test_two_workers_give_the_same_ordered_stream_as_none(dataset):
    sampler = PatchSampler(dataset, settings=SMALL, seed=5, start_step=10)
    sampler.batch_for_step(0)  # memmaps opened in the parent must not break pickling/forking
    assert len(pickle.dumps(sampler)) < 20_000
    rng_before = torch.get_rng_state()
    serial = list(islice(iter(make_loader(sampler, workers=0)), 6))
    parallel = list(islice(iter(make_loader(sampler, workers=2, prefetch=2)), 6))
    assert torch.equal(torch.get_rng_state(), rng_before)  # starting loaders left the global RNG alone
    assert [s for s, _, _ in parallel] == list(range(10, 16)) == [s for s, _, _ in serial]
    for (_, low_a, full_a), (_, low_b, full_b) in zip(serial, parallel):
        assert torch.equal(low_a, low_b) and torch.equal(full_a, full_b)


def test_patches_are_the_memmap_regions_they_name_and_stay_in_the_split(dataset):
    manifest = load_manifest(dataset)
    train = {(r["case"], i) for r in manifest["split"]["train"] for i in range(r["start"], r["stop"])}
    arrays = {c["id"]: open_case(dataset, c["id"]) for c in manifest["cases"]}
    sampler = PatchSampler(dataset, settings=SMALL, seed=0)
    seen = set()
    for step in range(40):
        low, full, picks = sampler.batch_for_step(step, return_index=True)
        assert len(picks) == 2 * 4
        for flat, pick in enumerate(picks):
            assert (pick.case, pick.index) in train
            seen.add((pick.case, pick.index))
            want_low, want_full = _expected(*arrays[pick.case], pick, 3)
            assert np.array_equal(low[divmod(flat, 4)].numpy(), want_low)
            assert np.array_equal(full[divmod(flat, 4)].numpy(), want_full)
    assert seen == train  # every train slice of both cases gets drawn


def test_context_neighbours_are_clamped_at_the_case_ends(clean_dataset):
    [case] = [c["id"] for c in load_manifest(clean_dataset)["cases"][:1]]
    low_mm, full_mm = open_case(clean_dataset, case)
    settings = SamplerSettings(patch_size=32, batch_size=8, context_slices=3, augment=False)
    sampler = PatchSampler(clean_dataset, settings=settings, seed=0)
    ends = set()
    for step in range(10):
        low, full, picks = sampler.batch_for_step(step, return_index=True)
        for j, pick in enumerate(picks):
            if pick.case != case or pick.index not in (0, 3):
                continue
            ends.add(pick.index)
            region = (slice(pick.y, pick.y + 32), slice(pick.x, pick.x + 32))
            neighbours = [0, 0, 1] if pick.index == 0 else [2, 3, 3]
            assert np.array_equal(low[0, j].numpy(), low_mm[(neighbours, *region)])
            assert np.array_equal(low[0, j, 1].numpy(), full[0, j, 0].numpy())  # centre is the target slice
    assert ends == {0, 3}


def test_augmentation_keeps_low_and_full_aligned_and_varies_the_patches(clean_dataset):
    plain = PatchSampler(clean_dataset, settings=SamplerSettings(patch_size=32, batch_size=16, augment=False),
                         seed=2)
    augmented = PatchSampler(clean_dataset, settings=SamplerSettings(patch_size=32, batch_size=16), seed=2)
    transforms = set()
    for step in range(4):
        low_a, full_a, picks_a = augmented.batch_for_step(step, return_index=True)
        low_p, full_p, picks_p = plain.batch_for_step(step, return_index=True)
        assert torch.equal(low_a, full_a) and torch.equal(low_p, full_p)  # low == full in this dataset
        for j, (pa, pp) in enumerate(zip(picks_a, picks_p)):
            assert pa[:4] == pp[:4] and pp[4:7] == (False, False, 0)  # same place, only the view differs
            transforms.add(pa[4:7])
            assert np.array_equal(full_a[0, j].numpy(), _expected(*open_case(clean_dataset, pa.case), pa, 1)[1])
        assert not torch.equal(full_a, full_p)
    assert len(transforms) >= 6  # flips and quarter turns all occur


def _make_half_air(tmp_path, **kwargs):
    """A dataset whose full-dose slices are air (-1000 HU) in the left half and water (0 HU) in the right."""
    dataset = make_training_dataset(tmp_path, n_cases=1, n_slices=4, split="1,0,0", **kwargs)
    case = load_manifest(dataset)["cases"][0]["id"]
    full = np.load(dataset / "cases" / case / "full.npy", mmap_mode="r+")
    full[:, :, :32], full[:, :, 32:] = -1000, 0
    full.flush()
    return dataset, case, full


def test_background_rejection_keeps_patches_with_enough_body(tmp_path):
    dataset, _, _ = _make_half_air(tmp_path)
    body = lambda full: (full > -500).float().mean(dim=(-3, -2, -1)).flatten()
    settings = SamplerSettings(patch_size=32, batch_size=16, min_body_fraction=0.5, augment=False)
    kept = torch.cat([body(PatchSampler(dataset, settings=settings, seed=0).batch_for_step(s)[1])
                      for s in range(8)])
    assert (kept >= 0.5).all()
    unfiltered = SamplerSettings(patch_size=32, batch_size=16, min_body_fraction=0.0, augment=False)
    raw = torch.cat([body(PatchSampler(dataset, settings=unfiltered, seed=0).batch_for_step(s)[1])
                     for s in range(8)])
    assert (raw < 0.5).float().mean() > 0.25  # without rejection about half the patches are mostly air


def test_an_all_air_slice_still_yields_a_patch_after_max_tries(tmp_path):
    dataset, case, full = _make_half_air(tmp_path)
    full[2] = -1000
    full.flush()
    sampler = PatchSampler(dataset, settings=SamplerSettings(patch_size=32, batch_size=16), seed=0)
    hits = 0
    for step in range(4):
        _, patches, picks = sampler.batch_for_step(step, return_index=True)
        for j, pick in enumerate(picks):
            if pick.index == 2:
                hits += 1
                assert (patches[0, j] == -1000).all()
            else:
                assert (patches[0, j] > -500).float().mean() >= 0.5
    assert hits > 0


def test_validation_slices_are_whole_spread_and_with_context(tmp_path):
    dataset = make_training_dataset(tmp_path, split="0.5,0.5,0")  # val: slices 4..8 of each case
    manifest = load_manifest(dataset)
    cases = [c["id"] for c in manifest["cases"]]
    picked = validation_slices(dataset, count=4, context_slices=3)
    assert all(isinstance(v, ValidationSlice) for v in picked)
    assert [(v.case, v.index) for v in picked] == [(cases[0], 5), (cases[0], 7), (cases[1], 5), (cases[1], 7)]
    low_mm, full_mm = open_case(dataset, cases[0])
    last = picked[1]
    assert last.low_hu.dtype == last.full_hu.dtype == np.float32
    assert last.low_hu.shape == (3, 64, 64) and last.full_hu.shape == (64, 64)
    assert np.array_equal(last.low_hu, low_mm[[6, 7, 7]]) and np.array_equal(last.full_hu, full_mm[7])
    assert last.pixel_mm == pytest.approx(manifest["cases"][0]["pixel_mm"])
    everything = validation_slices(dataset, count=100)
    assert len(everything) == 8 and everything[0].low_hu.shape == (1, 64, 64)
    assert [(v.case, v.index) for v in validation_slices(dataset, count=4)] == [(v.case, v.index) for v in picked]
    [middle] = validation_slices(dataset, count=1)
    assert (middle.case, middle.index) == (cases[1], 4)


def test_describe_says_what_is_sampled(dataset):
    info = PatchSampler(dataset, settings=SMALL, seed=0).describe()
    assert info["cases"] == 2 and info["slices"] == 12 and info["patch_size"] == 32
    assert info["split"] == "train" and info["context_slices"] == 3 and sum(info["slices_per_case"].values()) == 12


@pytest.mark.parametrize("options, message", [
    ({"patch_size": 0}, "patch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batches_per_step": 0}, "batches_per_step"),
    ({"max_tries": 0}, "max_tries"),
    ({"context_slices": 2}, "odd"),
    ({"min_body_fraction": 1.5}, "min_body_fraction"),
])
def test_bad_settings_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        SamplerSettings(**options)


def test_unusable_datasets_are_usage_errors(dataset, clean_dataset):
    case = load_manifest(dataset)["cases"][0]["id"]
    with pytest.raises(UsageError, match=rf"case {case} has 64x64 slices, smaller than the 128x128"):
        PatchSampler(dataset, settings=SamplerSettings(patch_size=128), seed=0)
    with pytest.raises(UsageError, match="has no 'val' slices"):
        PatchSampler(clean_dataset, split="val", settings=SMALL, seed=0)
    with pytest.raises(UsageError, match="has no 'val' slices"):
        validation_slices(clean_dataset)
    with pytest.raises(UsageError, match="no split 'holdout'"):
        PatchSampler(dataset, split="holdout", settings=SMALL, seed=0)
    with pytest.raises(UsageError, match="rank"):
        PatchSampler(dataset, settings=SMALL, seed=0, rank=2, world_size=2)
    with pytest.raises(UsageError, match="odd"):
        validation_slices(dataset, context_slices=2)


def test_noisier2noise_target_error_is_uncorrelated_with_the_input_noise():
    # A simulated pair: full = x + n_fd, low = full + n_sim with (1 - d) / d times n_fd's
    # variance. The full dose's error is correlated with the input's (it is part of it);
    # the Noisier2Noise target's is not, so its expectation given the input is x.
    from ldct_cli.training.data import noisier2noise_target

    rng = np.random.default_rng(0)
    x = rng.normal(40.0, 30.0, 400_000)
    for d in (0.25, 0.1, 0.5):
        n_fd = rng.normal(0.0, 10.0, x.size)
        n_sim = rng.normal(0.0, 10.0 * np.sqrt((1 - d) / d), x.size)
        full, low = x + n_fd, x + n_fd + n_sim
        target = noisier2noise_target(low, full, d)
        noise_in = low - x
        assert np.corrcoef(full - x, noise_in)[0, 1] == pytest.approx(np.sqrt(d), abs=0.01)
        assert abs(np.corrcoef(target - x, noise_in)[0, 1]) < 0.01
        assert abs(np.mean(target - x)) < 0.2  # no HU bias
    with pytest.raises(ValueError, match="not in"):
        noisier2noise_target(low, full, 1.0)
    with pytest.raises(UsageError, match="target 'clean'"):
        SamplerSettings(target="clean")
