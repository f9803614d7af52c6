"""Real quarter-dose checks on ../shared/data/mayo_dev (AAPM/Mayo pairs; validation only, skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

MAYO = Path(os.environ.get("LDCT_SHARED_DATA", REPO.parent / "shared" / "data")) / "mayo_dev"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not MAYO.is_dir(), reason=f"mayo_dev not found at {MAYO}")]

# The smooth kernel still fails the SD bar (simulated 1.2x the real SD: docs/simulation.md).
# strict: the day it passes, this test says so and the mark goes.
B30F_SD = pytest.mark.xfail(strict=True, reason="B30f: simulated SD ~1.24x the real one (the "
                            "fitted texture is too soft, anatomy biases the smooth-kernel fit)")


@pytest.mark.parametrize("group", ["L096_D45f", pytest.param("L192_B30f", marks=B30F_SD), "L192_D45f"])
def test_scan_matched_simulation_matches_real_quarter_dose(group):
    from ldct_cli.scan_noise import simulation_realism

    row = simulation_realism(MAYO / group / "FD", MAYO / group / "QD", dose=0.25)
    print(group, row)
    assert row["f_avg_ratio"] == pytest.approx(1, abs=0.15)
    assert row["sd_ratio"] == pytest.approx(1, abs=0.15)


def test_scan_matched_texture_beats_the_fixed_one_on_sharp_kernels():
    from ldct_cli.scan_noise import simulation_realism

    fixed = simulation_realism(MAYO / "L096_D45f" / "FD", MAYO / "L096_D45f" / "QD", i0=4.8e4, recon_filter="hann")
    matched = simulation_realism(MAYO / "L096_D45f" / "FD", MAYO / "L096_D45f" / "QD")
    assert abs(matched["f_avg_ratio"] - 1) < 0.1 < abs(fixed["f_avg_ratio"] - 1)


def _psnr(a, b):
    clip = lambda x: np.clip(x, -160, 240)
    return 20 * np.log10(400 / np.sqrt(np.mean((clip(a) - clip(b)) ** 2)))


@pytest.mark.slow
@pytest.mark.parametrize("group", ["L096_D45f", "L192_B30f", "L192_D45f"])
def test_nlm_auto_strength_is_near_its_best(group):
    """NLM's automatic h within 0.5 dB of the best of a sweep (h 20-100 HU, two slices) on real quarter dose."""
    from ldct_cli.evaluate import load_input, pair_by_position
    from ldct_cli.api import build_classical
    from ldct_cli.models.classical import NonLocalMeans

    low, = load_input(MAYO / group / "QD")
    full, = load_input(MAYO / group / "FD")
    pairs = pair_by_position(low, full)[:2]
    q = low.read_hu([i for i, _ in pairs])
    f = full.read_hu([j for _, j in pairs])
    auto, derivation = build_classical("nlm")
    twin, derivation = auto.adapt_to_series(low.series, derivation)
    assert f"h {twin.strength_hu:g} HU = 0.9 x the series' measured noise SD" in derivation.description
    scores = {h: np.mean([_psnr(o, r) for o, r in zip(NonLocalMeans(h)(q[:, None]), f)])
              for h in (20, 30, 40, 50, 70, 100)}
    got = np.mean([_psnr(o, r) for o, r in zip(twin(q[:, None]), f)])
    print(group, f"auto h {twin.strength_hu} HU: {got:.2f} dB; sweep {scores}")
    assert got >= max(scores.values()) - 0.5
