"""The classical baselines (nlm, tv, bm3d): registered, weight-free, in HU, usable by denoise."""

from __future__ import annotations

import numpy as np
import pytest

from ldct_cli.errors import UsageError
from ldct_cli.models.registry import create_model, get_model_info, list_models


def _noisy(seed: int = 0, sd: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A 96x96 soft-tissue disc (40 HU) with a 200 HU insert on air, and it with white noise."""
    y, x = np.mgrid[:96, :96]
    clean = np.full((96, 96), -1000.0)
    clean[(y - 48) ** 2 + (x - 48) ** 2 < 40 ** 2] = 40.0
    clean[(y - 48) ** 2 + (x - 60) ** 2 < 8 ** 2] = 200.0
    return clean, clean + np.random.default_rng(seed).normal(0, sd, clean.shape)


def test_classical_filters_are_registered_as_their_own_kind():
    assert list_models("classical") == ["nlm", "tv", "bm3d"]
    for name in list_models("classical"):
        info = get_model_info(name)
        assert info.hu_norm is None and info.paper
        assert name not in list_models()  # not a trainable generator


@pytest.mark.parametrize("name", ["nlm", "tv"])
def test_filters_remove_noise_keep_the_mean_and_the_edge(name):
    clean, noisy = _noisy()
    out = create_model(name)(noisy[None, None].astype(np.float32))
    assert out.shape == (1, 96, 96) and out.dtype == np.float32
    flat = (slice(20, 40), slice(30, 45))  # inside the disc, away from the insert
    assert out[0][flat].std() < 0.5 * noisy[flat].std()
    assert abs(out[0][flat].mean() - 40.0) < 5.0
    # The insert survives: its contrast against the disc is kept to within 15%.
    insert = out[0][46:51, 58:63].mean() - out[0][flat].mean()
    assert 0.85 * 160 < insert < 1.15 * 160
    # Root-mean-square error against the clean image falls.
    assert np.sqrt(np.mean((out[0] - clean) ** 2)) < 0.6 * np.sqrt(np.mean((noisy - clean) ** 2))


def test_strength_is_in_hu_and_stronger_means_smoother():
    _, noisy = _noisy(1)
    stack = noisy[None, None].astype(np.float32)
    flat = (0, slice(20, 40), slice(30, 45))
    weak, strong = create_model("nlm", strength_hu=30.0)(stack), create_model("nlm", strength_hu=150.0)(stack)
    assert strong[flat].std() < weak[flat].std()
    weak, strong = create_model("tv", strength_hu=10.0)(stack), create_model("tv", strength_hu=80.0)(stack)
    assert strong[flat].std() < weak[flat].std()
    with pytest.raises(UsageError, match="must be > 0"):
        create_model("tv", strength_hu=0)


def test_bm3d_without_its_package_is_a_clear_error():
    pytest.importorskip("skimage")
    try:
        import bm3d  # noqa: F401
        pytest.skip("bm3d is installed here")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="optional 'bm3d' package"):
        create_model("bm3d")


def test_denoise_cli_runs_a_classical_filter_and_records_it(tmp_path, cli):
    import pydicom

    from tests.synth import SeriesSpec, write_series

    write_series(tmp_path / "in", SeriesSpec(n_slices=2))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "nlm", "--strength", "90", "--quiet")
    assert result.exit_code == 0, result.stderr
    files = sorted((tmp_path / "out").glob("*/*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert "non-local means" in ds.DerivationDescription and "h 90 HU" in ds.DerivationDescription
    assert "nlm" in ds.SeriesDescription


@pytest.mark.parametrize("args, message", [
    (("--model", "nlm", "--weights", "w.safetensors"), "takes no --weights"),
    (("--model", "redcnn", "--strength", "10"), "--strength is the parameter of the classical"),
    (("--model", "tv", "--strength", "-1"), "positive number of HU"),
    (("--model", "nlm", "--strength", "strong"), "give auto or a positive number"),
])
def test_classical_usage_errors(tmp_path, cli, args, message):
    from tests.synth import SeriesSpec, write_series

    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.stderr
