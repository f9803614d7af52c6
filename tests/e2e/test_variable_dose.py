"""Variable-dose datasets: ``ldct prepare --simulate-dose 0.1,0.25,0.5``, the sampler's per-patch
dose draw, validation and evaluation on a chosen dose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldct_cli.errors import UsageError
from ldct_cli.prepare import dose_files, dose_index, load_manifest, open_case, simulated_doses
from ldct_cli.training.data import PatchSampler, SamplerSettings, validation_slices
from tests.synth import SeriesSpec, write_series

DOSES = (0.1, 0.25, 0.5)
PREPARE = ("--quiet", "--device", "cpu", "--split-by", "block", "--split", "0.5,0.25,0.25", "--gap", "0")
SETTINGS = SamplerSettings(patch_size=32, batch_size=8)


def _prepare(root: Path, doses: str, *extra: str) -> Path:
    """A dataset simulated from ``root/fd`` at ``doses``, through the CLI in-process."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    dataset = root / f"data_{doses}{''.join(extra)}"
    result = CliRunner().invoke(app, ["prepare", str(dataset), "--full", str(root / "fd"),
                                      "--simulate-dose", doses, *extra, *PREPARE])
    assert result.exit_code == 0, result.output
    return dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One 4-slice 64x64 full-dose series (3 mm pixels: a 19 cm object, quick to project)."""
    root = tmp_path_factory.mktemp("variable_dose")
    write_series(root / "fd" / "a", SeriesSpec(n_slices=4, rows=64, columns=64, pixel_spacing_mm=(3.0, 3.0)))
    return root


@pytest.fixture(scope="module")
def multi(root) -> Path:
    return _prepare(root, "0.1,0.25,0.5")


@pytest.fixture(scope="module")
def case(multi) -> str:
    return load_manifest(multi)["cases"][0]["id"]


def _noise_sd(low: np.ndarray, full: np.ndarray) -> float:
    """SD of the inserted noise in the body (HU > -500 at full dose)."""
    body = full > -500
    return float((low.astype(float) - full.astype(float))[body].std())


def test_one_low_dose_file_per_dose_with_noise_that_rises_as_dose_falls(multi, case):
    folder = multi / "cases" / case
    assert sorted(p.name for p in folder.iterdir()) == ["full.npy", "low.npy", "low_1.npy", "low_2.npy"]
    full = np.load(folder / "full.npy")
    sd = [_noise_sd(np.load(folder / name), full) for name in ("low.npy", "low_1.npy", "low_2.npy")]
    assert sd[0] > sd[1] > sd[2] > 1  # 10 % > 25 % > 50 % dose noise
    # added quantum noise goes as sqrt(1/dose - 1): 3x and 1.7x the 50 % dose's
    assert sd[0] / sd[2] == pytest.approx(3.0, rel=0.2) and sd[1] / sd[2] == pytest.approx(3 ** 0.5, rel=0.2)
    for name in ("low.npy", "low_1.npy", "low_2.npy"):
        low = np.load(folder / name)
        assert low.dtype == np.int16 and low.shape == full.shape
        assert abs((low.astype(float) - full)[full > -500].mean()) < 3  # noise without an HU shift


def test_manifest_records_each_file_dose_and_the_simulations(multi):
    manifest = load_manifest(multi)
    assert manifest["low_doses"] == list(DOSES)
    assert manifest["simulated"] is True
    simulation = manifest["simulation"]
    assert simulation["doses"] == list(DOSES) and simulation["seeds"] == [0, 1000, 2000]
    assert (simulation["dose"], simulation["seed"]) == ("0.1", "0")  # the primary dose's settings
    assert dose_files(manifest) == ["low.npy", "low_1.npy", "low_2.npy"]


def test_single_dose_dataset_is_unchanged_and_is_the_first_file_of_a_list(root):
    single = _prepare(root, "0.25")
    pair = _prepare(root, "0.25,0.5")
    manifest = load_manifest(single)
    assert manifest["low_doses"] == [0.25] and manifest["simulation"]["doses"] == [0.25]
    assert manifest["simulation"]["dose"] == "0.25" and manifest["simulation"]["seed"] == "0"
    [case] = [c["id"] for c in manifest["cases"]]
    assert sorted(p.name for p in (single / "cases" / case).iterdir()) == ["full.npy", "low.npy"]
    for name in ("low.npy", "full.npy"):
        assert (single / "cases" / case / name).read_bytes() == (pair / "cases" / case / name).read_bytes()
    # and it is what the single-dose code path always wrote: the dose-0.25 simulator, seed 0, per slice
    from ldct_cli.prepare import simulated_sources, slice_hu, to_int16
    from ldct_cli.simulate import build_simulator

    simulator, _ = build_simulator(dose=0.25, seed=0, device="cpu")
    [source] = simulated_sources(root / "fd")
    low = np.load(single / "cases" / case / "low.npy")
    for k, item in enumerate(source.full.slices):
        image = slice_hu(item.path)[0]
        assert np.array_equal(low[k], to_int16(simulator(image[None, None], pixel_mm=3.0)[0]))
    # the second dose has noise of its own, not the first dose's noise scaled
    low, low_1 = open_case(pair, case)[0], open_case(pair, case, 1)[0]
    assert not np.array_equal(low, low_1)


def test_realizations_add_noise_draws_of_each_dose_and_keep_the_first_files(root):
    single = _prepare(root, "0.25", "--realizations", "1")
    three = _prepare(root, "0.25", "--realizations", "3")
    manifest = load_manifest(three)
    assert manifest["low_doses"] == [0.25, 0.25, 0.25]
    simulation = manifest["simulation"]
    assert simulation["realizations"] == 3 and simulation["seeds"] == [0, 1000, 2000]
    [case] = [c["id"] for c in manifest["cases"]]
    folder = three / "cases" / case
    assert sorted(p.name for p in folder.iterdir()) == ["full.npy", "low.npy", "low_1.npy", "low_2.npy"]
    assert (folder / "low.npy").read_bytes() == (single / "cases" / case / "low.npy").read_bytes()
    assert dose_index(manifest, 0.25) == 0  # --dose 0.25 scores the first draw
    full = np.load(folder / "full.npy")
    draws = [np.load(folder / name) for name in ("low.npy", "low_1.npy", "low_2.npy")]
    sds = [_noise_sd(low, full) for low in draws]
    assert max(sds) / min(sds) < 1.2  # the same dose...
    noise = [(low.astype(float) - full)[full > -500] for low in draws]
    for i in range(3):
        for j in range(i + 1, 3):  # ...with independent noise
            assert abs(np.corrcoef(noise[i], noise[j])[0, 1]) < 0.2
    # several doses: every dose's first draw, then every dose's second
    mixed = load_manifest(_prepare(root, "0.1,0.5", "--realizations", "2"))
    assert mixed["low_doses"] == [0.1, 0.5, 0.1, 0.5] and dose_index(mixed, 0.5) == 1
    # what a model trained on them saw: each dose once, the primary first
    assert simulated_doses(mixed) == [0.1, 0.5] and simulated_doses(manifest) == [0.25]
    assert simulated_doses(load_manifest(single)) == [0.25]


@pytest.mark.parametrize("args, message", [
    (["--simulate-dose", "0.25", "--realizations", "0"], "--realizations 0: at least 1"),
    (["--low", "LOW", "--realizations", "2"], "--realizations needs --simulate-dose"),
])
def test_bad_realizations_are_usage_errors(tmp_path, cli, args, message):
    write_series(tmp_path / "fd", SeriesSpec(n_slices=1, rows=32, columns=32))
    args = [str(tmp_path / "fd") if a == "LOW" else a for a in args]
    result = cli("prepare", tmp_path / "data", "--full", tmp_path / "fd", *args, "--quiet", "--device", "cpu")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()


def test_paired_datasets_have_no_simulated_doses(tmp_path):
    from tests.training_data import make_training_dataset

    dataset = make_training_dataset(tmp_path, n_cases=1, n_slices=4, split="0.5,0.5,0")
    manifest = load_manifest(dataset)
    assert manifest["low_doses"] is None and dose_files(manifest) == ["low.npy"]
    assert dose_index(manifest, None) == 0
    with pytest.raises(UsageError, match="dose 0.25 is not in the dataset, which has one real"):
        dose_index(manifest, 0.25)
    assert PatchSampler(dataset, settings=SETTINGS, seed=0).describe()["low_doses"] is None


@pytest.mark.parametrize("doses, message", [
    ("0.25,0.25", "listed only once"),
    ("0.25,1.5", "between 0 and 1"),
    ("0,0.5", "between 0 and 1"),
    ("0.25,half", "separated by commas"),
    ("0.25,", "separated by commas"),
])
def test_bad_dose_lists_are_usage_errors_that_leave_nothing(tmp_path, cli, doses, message):
    write_series(tmp_path / "fd", SeriesSpec(n_slices=1, rows=32, columns=32))
    result = cli("prepare", tmp_path / "data", "--full", tmp_path / "fd", "--simulate-dose", doses,
                 "--quiet", "--device", "cpu")
    assert result.exit_code == 2 and message in result.stderr and "--simulate-dose" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldct-partial")]


def test_api_progress_per_slice_and_no_mixing_with_real_low_doses(tmp_path):
    from ldct_cli.physics.lowdose import LowDoseSimulator
    from ldct_cli.prepare import prepare, simulated_sources

    write_series(tmp_path / "fd" / "a", SeriesSpec(n_slices=2, rows=32, columns=32, pixel_spacing_mm=(3.0, 3.0)))
    sources = simulated_sources(tmp_path / "fd")
    simulators = [LowDoseSimulator(dose=d, seed=i, n_views=90) for i, d in enumerate((0.5, 0.2))]
    calls = []
    manifest = prepare(tmp_path / "data", sources, simulator=simulators, split=_all_train(),
                       progress=lambda *args: calls.append(args))
    assert manifest["low_doses"] == [0.5, 0.2]
    assert calls == [(sources[0].case_id, 1, 2), (sources[0].case_id, 2, 2)]
    sources[0].low = sources[0].full  # a real low-dose series beside simulated doses
    with pytest.raises(UsageError, match="several simulated doses need every case simulated"):
        prepare(tmp_path / "mixed", sources, simulator=simulators, split=_all_train())
    assert not (tmp_path / "mixed").exists()


def _all_train():
    from ldct_cli.prepare import SplitSettings

    return SplitSettings(fractions=(1.0, 0.0, 0.0))


def test_open_case_and_dose_index_pick_the_dose_files(multi, case):
    manifest = load_manifest(multi)
    assert [dose_index(manifest, d) for d in (None, 0.1, 0.25, 0.5, 0.25 + 5e-7)] == [0, 0, 1, 2, 1]
    with pytest.raises(UsageError, match=r"dose 0.3 is not in the dataset, which has doses 0.1, 0.25, 0.5"):
        dose_index(manifest, 0.3)
    for i, name in enumerate(dose_files(manifest)):
        low, full = open_case(multi, case, i)
        assert np.array_equal(low, np.load(multi / "cases" / case / name))
    assert np.array_equal(open_case(multi, case)[0], open_case(multi, case, 0)[0])
    with pytest.raises(UsageError, match=r"dose index 3: the dataset has doses 0.1, 0.25, 0.5 \(indices 0 to 2\)"):
        open_case(multi, case, 3)


def test_sampler_mixes_doses_in_a_batch_and_cuts_each_patch_from_its_dose(multi, case):
    sampler = PatchSampler(multi, settings=SETTINGS, seed=0)
    assert sampler.describe()["low_doses"] == list(DOSES)
    lows = [open_case(multi, case, i)[0] for i in range(3)]
    seen = set()
    for step in range(3):
        low, full, picks = sampler.batch_for_step(step, return_index=True)
        doses = {pick.dose for pick in picks}
        seen |= doses
        if step == 0:
            assert len(doses) > 1  # one batch mixes doses
        for j, pick in enumerate(picks):
            assert pick.case == case
            region = (slice(pick.index, pick.index + 1), slice(pick.y, pick.y + 32), slice(pick.x, pick.x + 32))
            view = lambda a: np.rot90(_flipped(np.asarray(a[region], np.float32), pick), pick.rot90, axes=(-2, -1))
            assert np.array_equal(low[0, j].numpy(), view(lows[pick.dose]))
            assert all(not np.array_equal(low[0, j].numpy(), view(lows[other]))
                       for other in range(3) if other != pick.dose)
    assert seen == {0, 1, 2}


def test_sampler_draws_only_the_dose_files_asked_for(multi, case):
    import dataclasses

    def doses_drawn(dose_files):
        sampler = PatchSampler(multi, settings=dataclasses.replace(SETTINGS, dose_files=dose_files), seed=0)
        return sampler, {p.dose for step in range(4) for p in sampler.batch_for_step(step, return_index=True)[2]}

    sampler, drawn = doses_drawn((0, 2))
    assert drawn == {0, 2} and sampler.describe()["dose_files"] == [0, 2]
    assert doses_drawn((1,))[1] == {1}
    # () is every file, drawing the very stream a run made before the option existed
    everything, _ = doses_drawn(())
    default = PatchSampler(multi, settings=SETTINGS, seed=0)
    assert everything.describe()["dose_files"] == [0, 1, 2]
    for step in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(everything.batch_for_step(step)[:2],
                                                        default.batch_for_step(step)[:2]))
    with pytest.raises(UsageError, match=r"data.dose_files \[3\]: dataset .* has 3 low-dose files"):
        PatchSampler(multi, settings=dataclasses.replace(SETTINGS, dose_files=(3,)), seed=0)


def test_noisier2noise_target_is_the_full_dose_less_its_share_of_the_patch_noise(multi, tmp_path):
    import dataclasses

    full_target = PatchSampler(multi, settings=SETTINGS, seed=0)
    n2n = PatchSampler(multi, settings=dataclasses.replace(SETTINGS, target="noisier2noise"), seed=0)
    assert n2n.describe()["target"] == "noisier2noise"
    for step in range(2):
        low, full, picks = full_target.batch_for_step(step, return_index=True)
        low2, target, picks2 = n2n.batch_for_step(step, return_index=True)
        assert picks == picks2 and torch.equal(low, low2)  # the same patches, another target
        d = torch.tensor([DOSES[pick.dose] for pick in picks]).view(full.shape[:2] + (1, 1, 1))
        expected = full - d / (1 - d) * (low - full)
        assert torch.allclose(target, expected, atol=1e-3)
    from tests.training_data import make_training_dataset

    paired = make_training_dataset(tmp_path, n_cases=1, n_slices=4, split="0.5,0.5,0")
    with pytest.raises(UsageError, match="noisier2noise needs low doses simulated"):
        PatchSampler(paired, settings=dataclasses.replace(SETTINGS, target="noisier2noise"), seed=0)


def _flipped(patch: np.ndarray, pick) -> np.ndarray:
    if pick.hflip:
        patch = patch[..., ::-1]
    if pick.vflip:
        patch = patch[..., ::-1, :]
    return patch


def test_dose_draws_are_a_pure_function_of_seed_and_step(multi):
    a = PatchSampler(multi, settings=SETTINGS, seed=4)
    b = PatchSampler(multi, settings=SETTINGS, seed=4)
    for step in (0, 5):
        low_a, full_a, picks_a = a.batch_for_step(step, return_index=True)
        low_b, full_b, picks_b = b.batch_for_step(step, return_index=True)
        assert picks_a == picks_b and torch.equal(low_a, low_b) and torch.equal(full_a, full_b)
    assert a.batch_for_step(0, return_index=True)[2] != a.batch_for_step(1, return_index=True)[2]


def _stream(rng: np.random.Generator, sampler: PatchSampler, *, doses: int) -> list[tuple]:
    """What the per-step generator gives, read in the sampler's order: slice, dose (only with
    several), position, flips and turns. Every patch is accepted at its first position here."""
    out = []
    for _ in range(SETTINGS.batch_size):
        index = int(rng.integers(sampler.n_slices))
        dose = int(rng.integers(doses)) if doses > 1 else 0
        y, x = int(rng.integers(64 - 32 + 1)), int(rng.integers(64 - 32 + 1))
        out.append((index, y, x, bool(rng.integers(2)), bool(rng.integers(2)), int(rng.integers(4)), dose))
    return out


@pytest.mark.parametrize("doses", ["0.25", "0.1,0.25,0.5"])
def test_the_dose_is_drawn_only_when_there_are_several(root, doses):
    """Single-dose datasets keep the random stream they had before doses, so old runs resume exactly."""
    dataset = root / f"data_{doses}"
    if not dataset.exists():
        dataset = _prepare(root, doses)
    settings = SamplerSettings(patch_size=32, batch_size=8, min_body_fraction=0.0)
    sampler = PatchSampler(dataset, settings=settings, seed=9)
    _, _, picks = sampler.batch_for_step(3, return_index=True)
    expected = _stream(np.random.default_rng([9, 0, 3]), sampler, doses=len(doses.split(",")))
    assert [tuple(p[1:]) for p in picks] == expected


def test_validation_on_a_chosen_dose(multi, case):
    primary = validation_slices(multi, count=1)
    second = validation_slices(multi, count=1, dose_index=1)
    [v0], [v1] = primary, second
    assert (v0.case, v0.index) == (v1.case, v1.index) and np.array_equal(v0.full_hu, v1.full_hu)
    assert np.array_equal(v0.low_hu, open_case(multi, case)[0][[v0.index]])
    assert np.array_equal(v1.low_hu, open_case(multi, case, 1)[0][[v1.index]])


def test_dataset_inputs_selects_the_dose(multi, case):
    from ldct_cli.evaluate import dataset_inputs

    manifest = load_manifest(multi)
    [part] = manifest["split"]["test"]
    rows = list(range(part["start"], part["stop"]))
    for dose, name in ((None, "low.npy"), (0.1, "low.npy"), (0.25, "low_1.npy"), (0.5, "low_2.npy")):
        tests, references = dataset_inputs(multi, "test", {}, dose=dose)
        [low] = tests
        assert low.label == "low dose" and low.folder.endswith(Path(name).stem)
        expected = np.load(multi / "cases" / case / name)[rows].astype(np.float32)
        assert np.array_equal(low.read_hu(list(range(len(rows)))), expected)
        assert references[0].label == "full dose"
    with pytest.raises(UsageError, match=r"dose 0.3 is not in the dataset, which has doses 0.1, 0.25, 0.5"):
        dataset_inputs(multi, "test", {}, dose=0.3)


def test_evaluate_scores_the_chosen_dose_through_the_cli(multi, cli):
    def low_dose_noise(*flags) -> tuple[str, float]:
        result = cli("evaluate", "--data", multi, "--split", "test", "--model", "tv", "--json", *flags)
        assert result.exit_code == 0, result.output
        [low] = [s for s in json.loads(result.stdout)["series"] if s["label"] == "low dose"]
        return low["folder"], low["summary"]["rmse_hu"]["mean"]

    folder_10, rmse_10 = low_dose_noise()
    folder_50, rmse_50 = low_dose_noise("--dose", "0.5")
    assert folder_10.endswith("/low") and folder_50.endswith("/low_2")
    assert rmse_50 < rmse_10  # half dose is closer to the full dose than a tenth
    unknown = cli("evaluate", "--data", multi, "--dose", "0.3", "--model", "tv")
    assert unknown.exit_code == 2 and "dose 0.3 is not in the dataset" in unknown.output
    alone = cli("evaluate", multi, "--dose", "0.5")
    assert alone.exit_code == 2 and "--dose picks a dose of a variable-dose --data" in alone.output


class _PreviousSlice:
    """A 2.5D stand-in that returns the first slice of its stack: shows what it was fed."""

    context_slices = 3

    def __call__(self, stack_hu: np.ndarray, *, pixel_mm=None) -> np.ndarray:
        assert stack_hu.ndim == 4 and stack_hu.shape[1] == 3
        return stack_hu[:, 0]


def test_dataset_inputs_feed_2p5d_models_each_slice_with_its_neighbours(multi, case):
    from ldct_cli.evaluate import dataset_inputs

    manifest = load_manifest(multi)
    low = open_case(multi, case)[0]
    for split in ("train", "test"):
        [part] = manifest["split"][split]
        rows = np.arange(part["start"], part["stop"])
        tests, _ = dataset_inputs(multi, split, {"prev": _PreviousSlice()})
        out = tests[1].read_hu(list(range(len(rows))))
        # The slice before each one, the first slice of the case standing in for its own.
        np.testing.assert_array_equal(out, low[np.maximum(rows - 1, 0)].astype(np.float32))
