"""Model registry, the papers' architectures, HU normalization, checkpoints and the public API."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldct_cli.checkpoint import (
    FORMAT_VERSION,
    RUN_DIR_CHECKPOINT,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
    tensors_sha256,
)
from ldct_cli.errors import CheckpointError, UsageError
from ldct_cli.models import registry
from ldct_cli.models.normalization import HUNormalization
from ldct_cli.models.redcnn import RedCNN, transposed_as_conv
from ldct_cli.models.registry import (
    create_model,
    get_model_info,
    list_models,
    register_model,
    resolve_kwargs,
)

MODELS = list_models()
HU_LOW, HU_HIGH = -1024.0, 3072.0
# The network output range each model's HU normalization must map [-1024, 3072] HU onto,
# set by its last activation. A newly registered model must be added here.
OUTPUT_RANGE = {"redcnn": (0.0, 1.0), "redcnn_wgan": (0.0, 1.0), "wgan_vgg": (0.0, 1.0), "pix2pix": (-1.0, 1.0),
                "pix2pix_small": (-1.0, 1.0),
                "cascade": (0.0, 1.0), "cpca": (0.0, 1.0)}
# Models whose output layer is linear (input minus predicted noise): no activation bounds it.
LINEAR_OUTPUT = {"cascade"}
# Reduced-width kwargs for tests where the default width is not the point.
SMALL_PIX2PIX = {"base_channels": 8, "max_channels": 32, "depth": 4}


def _supported_size(model: nn.Module) -> tuple[int, int]:
    """An odd, non-square size for any-size models; multiples of ``size_multiple`` otherwise."""
    m = int(getattr(model, "size_multiple", 1))
    return (37, 51) if m == 1 else (m, 2 * m)


def _random_input(model: nn.Module, batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(B, k, H, W) inputs spanning the model's input range [to_model(-1024), to_model(3072)]."""
    lo, hi = model.hu_norm.to_model(np.array([HU_LOW, HU_HIGH]))
    gen = torch.Generator().manual_seed(seed)
    k = int(getattr(model, "context_slices", 1))
    return lo + (hi - lo) * torch.rand(batch, k, h, w, generator=gen)


def _seeded_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def _rewrite_checkpoint(path: Path, *, edit_tensors=None, edit_header=None) -> None:
    """Rewrite a checkpoint in place with safetensors, editing its tensors and/or header."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_header is not None:
        header = json.loads(metadata["ldct"])
        edit_header(header, tensors)
        metadata["ldct"] = json.dumps(header, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------- every model


def test_registry_lists_the_three_papers():
    assert {"redcnn", "wgan_vgg", "pix2pix"} <= set(MODELS)
    assert len(MODELS) == len(set(MODELS))


def test_named_variants_share_their_model_and_recipe_and_must_match_it():
    variants = [n for n in list_models(None) if get_model_info(n).variant_of]
    assert "pix2pix_small" in variants
    for name in variants:
        info, parent = get_model_info(name), get_model_info(get_model_info(name).variant_of)
        assert (info.target, info.recipe, info.preset) == (parent.target, parent.recipe, parent.name)
        assert info.default_kwargs and resolve_kwargs(name) != resolve_kwargs(parent.name)
    base = get_model_info("pix2pix")
    for wrong in ({"variant_of": "no_such_model"}, {"variant_of": "pix2pix", "recipe": "supervised"},
                  {"variant_of": "pix2pix", "target": "ldct_cli.models.redcnn:RedCNN"}):
        with pytest.raises(ValueError, match="a variant of"):
            register_model(dataclasses.replace(base, name="bad_variant", **wrong))
    assert "bad_variant" not in list_models(None)


def test_registry_kinds_keep_feature_extractors_out_of_the_generators():
    everything = list_models(None)
    assert set(MODELS) < set(everything)
    assert list_models("features") == ["ct_features"]
    assert all(get_model_info(n).kind == "generator" for n in MODELS)
    assert get_model_info("ct_features").recipe == "autoencoder"
    bad = dataclasses.replace(get_model_info("redcnn"), name="odd", kind="critic")
    with pytest.raises(ValueError, match="kind 'critic'"):
        register_model(bad)
    assert "odd" not in list_models(None)


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_metadata(name):
    model = _seeded_model(name)
    assert model.ldct_name == name
    assert model.ldct_kwargs == resolve_kwargs(name)
    assert model.hu_norm == get_model_info(name).hu_norm
    h, w = _supported_size(model)
    x = _random_input(model, 2, h, w)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, h, w)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # The output stays within the range its activation allows.
    lo, hi = OUTPUT_RANGE[name]
    if name in LINEAR_OUTPUT:
        return
    assert y.min() >= lo
    if lo < 0:  # tanh: bounded on both sides (ReLU models are only bounded below)
        assert y.max() <= hi


@pytest.mark.parametrize("name", list_models(("generator", "features")))
def test_every_network_keeps_the_contract_and_states_it_itself(name):
    from ldct_cli.models.contract import CtNetwork

    model = create_model(name)
    assert isinstance(model, CtNetwork)
    declared = {key for cls in type(model).__mro__ if cls.__module__.startswith("ldct_cli") for key in vars(cls)}
    for key in ("size_multiple", "cpu_channels_last"):
        assert key in declared or key in vars(model), (name, key)
    assert isinstance(model.context_slices, int) and model.context_slices >= 1
    assert isinstance(model.size_multiple, int) and model.size_multiple >= 1
    assert model.halo is None or (isinstance(model.halo, int) and model.halo >= 0)
    assert isinstance(model.cpu_channels_last, bool)


@pytest.mark.parametrize("name", list_models("classical"))
def test_classical_filters_are_slice_denoisers(name):
    from ldct_cli.models.contract import SliceDenoiser

    cls = get_model_info(name).load_class()  # built without its optional package (bm3d) too
    assert all(hasattr(cls, key) for key in SliceDenoiser.__annotations__), name
    assert cls.context_slices == 1 and callable(cls)


@pytest.mark.parametrize("name", MODELS)
def test_unsupported_size_raises(name):
    """Models with a size multiple reject other sizes (the Denoiser pads; tested there)."""
    model = _seeded_model(name)
    m = int(getattr(model, "size_multiple", 1))
    if m == 1:
        pytest.skip(f"{name} takes any size")
    x = _random_input(model, 1, 100, 130)
    assert 100 % m and 130 % m
    with pytest.raises(RuntimeError), torch.no_grad():
        model(x)


@pytest.mark.parametrize("name", MODELS)
def test_hu_norm_maps_hu_range_onto_output_range(name):
    hu_norm = get_model_info(name).hu_norm
    if name not in OUTPUT_RANGE:
        pytest.fail(f"declare the output range of new model {name!r} in OUTPUT_RANGE")
    lo, hi = OUTPUT_RANGE[name]
    ends = hu_norm.to_model(np.array([HU_LOW, HU_HIGH]))
    np.testing.assert_allclose(ends, [lo, hi], atol=1e-12)
    # Exact inverse on the clipped range, numpy and torch alike.
    hu = np.linspace(HU_LOW, HU_HIGH, 4097)
    np.testing.assert_allclose(hu_norm.to_hu(hu_norm.to_model(hu)), hu, atol=1e-9)
    hu_t = torch.from_numpy(hu)
    torch.testing.assert_close(hu_norm.to_hu(hu_norm.to_model(hu_t)), hu_t, atol=1e-9, rtol=0)
    # Scanner padding outside the range is clipped, not extrapolated.
    np.testing.assert_allclose(hu_norm.to_model(np.array([-3024.0, 5000.0])), [lo, hi], atol=1e-12)


# --------------------------------------------------------------------------- RED-CNN


def _reference_redcnn(model: RedCNN, x: torch.Tensor, shortcuts=(True, True, True)) -> torch.Tensor:
    """RED-CNN as Chen et al. (2017) draw it, from the module's weights; shortcuts switchable."""
    import torch.nn.functional as F

    enc = [(m.weight, m.bias) for m in model.enc]
    dec = [(m.weight, m.bias) for m in model.dec]
    center = x.shape[1] // 2
    res1 = x[:, center:center + 1]
    out = F.relu(F.conv2d(x, *enc[0]))
    out = F.relu(F.conv2d(out, *enc[1]))
    res2 = out
    out = F.relu(F.conv2d(out, *enc[2]))
    out = F.relu(F.conv2d(out, *enc[3]))
    res3 = out
    out = F.relu(F.conv2d(out, *enc[4]))
    out = F.conv_transpose2d(out, *dec[0]) + (res3 if shortcuts[2] else 0)
    out = F.conv_transpose2d(F.relu(out), *dec[1])
    out = F.conv_transpose2d(F.relu(out), *dec[2]) + (res2 if shortcuts[1] else 0)
    out = F.conv_transpose2d(F.relu(out), *dec[3])
    out = F.conv_transpose2d(F.relu(out), *dec[4]) + (res1 if shortcuts[0] else 0)
    return F.relu(out)


def test_redcnn_architecture():
    model = create_model("redcnn")
    assert sum(p.numel() for p in model.parameters()) == 1_848_865
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    deconvs = [m for m in model.modules() if type(m) is nn.ConvTranspose2d]
    assert len(convs) == 5 and len(deconvs) == 5
    for layer in convs + deconvs:
        assert layer.kernel_size == (5, 5)
        assert layer.stride == (1, 1)
        assert layer.padding == (0, 0)
    assert [c.out_channels for c in convs] == [96] * 5
    assert [d.out_channels for d in deconvs] == [96] * 4 + [1]
    assert [d.in_channels for d in deconvs] == [96] * 5


@pytest.mark.parametrize("in_slices", [1, 3])
def test_redcnn_zero_weights_reduce_to_input_shortcut(in_slices):
    model = create_model("redcnn", in_slices=in_slices).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randn(2, in_slices, 33, 41)
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, torch.relu(x[:, in_slices // 2:in_slices // 2 + 1]), atol=0, rtol=0)


def test_redcnn_has_all_three_shortcuts():
    """The module matches the paper's forward pass, and not one with any shortcut removed."""
    model = _seeded_model("redcnn")
    with torch.no_grad():
        for p in model.parameters():  # weights big enough that every path matters
            p.mul_(3.0)
    x = _random_input(model, 1, 45, 47)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, _reference_redcnn(model, x), atol=1e-5, rtol=1e-5)
        for i in range(3):
            ablated = [True] * 3
            ablated[i] = False
            assert (y - _reference_redcnn(model, x, tuple(ablated))).abs().max() > 1e-3, i


def test_redcnn_inference_variant_is_equivalent():
    model = _seeded_model("redcnn", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.inference_variant()
    x = _random_input(model, 1, 70, 90, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in fast.modules())
    # The original keeps the paper's layout and its weights.
    assert all(type(m) is nn.ConvTranspose2d for m in model.dec)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_transposed_as_conv_rejects_strided_layer():
    with pytest.raises(ValueError):
        transposed_as_conv(nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1))
    with pytest.raises(ValueError):
        transposed_as_conv(nn.ConvTranspose2d(4, 4, 5, padding=2))


# --------------------------------------------------------------------------- WGAN-VGG


def test_wgan_vgg_architecture():
    model = create_model("wgan_vgg")
    layers = list(model.net)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8
    assert len(layers) == 16
    for i, conv in enumerate(convs):
        assert layers[2 * i] is conv
        assert isinstance(layers[2 * i + 1], nn.ReLU)
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        assert conv.out_channels == (1 if i == 7 else 32)
        assert conv.in_channels == (1 if i == 0 else 32)


# --------------------------------------------------------------------------- Pix2Pix


@pytest.mark.parametrize("name, n_params", [("pix2pix", 41_823_425), ("pix2pix_small", 10_458_721)])
def test_pix2pix_architecture_defaults(name, n_params):
    """``pix2pix`` is the paper's network (64-512); ``pix2pix_small`` the same at half width."""
    model = create_model(name)
    n_dropout = model.ldct_kwargs["n_dropout"]
    assert len(model.down) == 7 and len(model.up) == 7
    assert model.size_multiple == 2 ** 7
    for i, block in enumerate(model.down):
        convs = [m for m in block if isinstance(m, nn.Conv2d)]
        assert len(convs) == 1
        assert convs[0].kernel_size == (4, 4) and convs[0].stride == (2, 2)
        relus = [m for m in block if isinstance(m, nn.LeakyReLU)]
        if i == 0:
            assert not relus
        else:
            assert len(relus) == 1 and relus[0].negative_slope == pytest.approx(0.2)
        assert not any(isinstance(m, nn.ReLU) for m in block)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in block)
        assert has_bn == (0 < i < 6), i
    for block in model.up:
        deconvs = [m for m in block if isinstance(m, nn.ConvTranspose2d)]
        assert len(deconvs) == 1
        assert deconvs[0].kernel_size == (4, 4) and deconvs[0].stride == (2, 2)
    assert sum(any(isinstance(m, nn.Dropout) for m in b) for b in model.up) == n_dropout == 3
    assert isinstance(list(model.up[-1])[-1], nn.Tanh)
    assert list(model.up[-1])[-2].out_channels == 1
    widths = [block[-1].num_features if isinstance(block[-1], nn.BatchNorm2d) else
              [m for m in block if isinstance(m, nn.Conv2d)][0].out_channels for block in model.down]
    assert widths == ([64, 128, 256, 512, 512, 512, 512] if name == "pix2pix" else
                      [32, 64, 128, 256, 256, 256, 256])
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("n_dropout", [0, 1, 3])
def test_pix2pix_dropout_blocks(n_dropout):
    model = create_model("pix2pix", **SMALL_PIX2PIX, n_dropout=n_dropout)
    assert len(model.down) == len(model.up) == 4
    flags = [any(isinstance(m, nn.Dropout) for m in b) for b in model.up]
    # The innermost decoder blocks come first.
    assert flags == [True] * n_dropout + [False] * (4 - n_dropout)


def test_pix2pix_is_deterministic_in_eval_mode():
    model = _seeded_model("pix2pix", **SMALL_PIX2PIX)
    x = _random_input(model, 2, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- registry


def test_unknown_model_is_a_usage_error_listing_the_models():
    for call in (lambda: get_model_info("nosuch"), lambda: create_model("nosuch"),
                 lambda: resolve_kwargs("nosuch")):
        with pytest.raises(UsageError) as exc_info:
            call()
        message = str(exc_info.value)
        assert "nosuch" in message
        for name in MODELS:
            assert name in message


def test_duplicate_registration_is_an_error():
    original = get_model_info("redcnn")
    snapshot = dict(registry._REGISTRY)
    duplicate = dataclasses.replace(original, title="a second redcnn")
    try:
        with pytest.raises(ValueError, match="redcnn"):
            register_model(duplicate)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(snapshot)
    assert get_model_info("redcnn") is original
    assert list_models() == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_resolve_kwargs_fills_defaults_and_rejects_unknown(name):
    info = get_model_info(name)
    signature = inspect.signature(info.load_class())
    resolved = resolve_kwargs(name)
    assert list(resolved) == list(signature.parameters)
    for key, param in signature.parameters.items():
        assert resolved[key] == info.default_kwargs.get(key, param.default), key
    # An explicit value overrides the default.
    first = next(iter(signature.parameters))
    assert resolve_kwargs(name, **{first: resolved[first]}) == resolved
    with pytest.raises(UsageError, match="no_such_option"):
        resolve_kwargs(name, no_such_option=1)
    with pytest.raises(UsageError):
        create_model(name, no_such_option=1)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, tmp_path):
    model = _seeded_model(name, seed=7)
    training = {"epochs": 3, "best_val_loss": 0.125, "note": "round trip"}
    path = tmp_path / "sub" / "model.safetensors"
    saved = save_checkpoint(model, path, training=training, config={"lr": 1e-4})
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left

    loaded, info = load_checkpoint(path)
    assert not loaded.training
    for field in ("model", "model_kwargs", "hu_norm", "training", "config", "tool_version",
                  "tensors_sha256", "created"):
        assert getattr(info, field) == getattr(saved, field), field
    assert info.model == name
    assert info.training == training
    from ldct_cli import __version__
    assert info.tool_version == __version__
    assert loaded.ldct_name == name
    assert loaded.ldct_kwargs == model.ldct_kwargs
    assert loaded.hu_norm == model.hu_norm

    x = _random_input(model, 2, *_supported_size(model), seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name, kwargs", [
    ("wgan_vgg", {"in_slices": 3}),
    ("redcnn", {"in_slices": 3, "channels": 16}),
    ("pix2pix", {"base_channels": 8, "depth": 4}),
])
def test_checkpoint_rebuilds_non_default_kwargs(name, kwargs, tmp_path):
    model = _seeded_model(name, seed=1, **kwargs)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    loaded, info = load_checkpoint(path)
    for key, value in kwargs.items():
        assert info.model_kwargs[key] == value
        assert loaded.ldct_kwargs[key] == value
    assert loaded.ldct_kwargs == resolve_kwargs(name, **kwargs)
    if "in_slices" in kwargs:
        assert loaded.context_slices == kwargs["in_slices"]
    if "depth" in kwargs:
        assert loaded.size_multiple == 2 ** kwargs["depth"]
    x = _random_input(model, 1, *_supported_size(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_fixture_loads(checkpoints):
    assert set(checkpoints) == set(MODELS)
    for name, path in checkpoints.items():
        model, info = load_checkpoint(path)
        assert info.model == name and model.ldct_name == name


def test_tampered_tensor_fails_checksum(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_seeded_model("wgan_vgg"), path)

    def flip_one_value(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] += 0.5

    _rewrite_checkpoint(path, edit_tensors=flip_one_value)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_safetensors_without_our_header_is_rejected(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(create_model("wgan_vgg").state_dict(), str(plain))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"ldct": json.dumps({"format": "else"})})
    with pytest.raises(CheckpointError):
        load_checkpoint(other)
    not_json = tmp_path / "notjson.safetensors"
    save_file({"w": torch.zeros(3)}, str(not_json), metadata={"ldct": "{not json"})
    with pytest.raises(CheckpointError):
        load_checkpoint(not_json)


def test_random_bytes_and_missing_files_are_rejected(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_run_folder_resolves_to_best(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=RUN_DIR_CHECKPOINT):
        load_checkpoint(run)
    assert RUN_DIR_CHECKPOINT == "best.safetensors"
    save_checkpoint(_seeded_model("wgan_vgg"), run / RUN_DIR_CHECKPOINT)
    assert resolve_checkpoint_path(run) == run / "best.safetensors"
    model, info = load_checkpoint(run)
    assert info.path == run / "best.safetensors"
    assert model.ldct_name == "wgan_vgg"


def test_newer_format_version_is_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_seeded_model("wgan_vgg"), path)

    def bump(header, tensors):
        assert header["format_version"] == FORMAT_VERSION
        header["format_version"] = FORMAT_VERSION + 1

    _rewrite_checkpoint(path, edit_header=bump)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_weights_not_fitting_the_model_are_rejected(tmp_path):
    """A header that names other kwargs than the tensors were saved with (consistent sha)."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(_seeded_model("wgan_vgg"), path)

    def widen(header, tensors):
        header["model_kwargs"]["channels"] = 16

    _rewrite_checkpoint(path, edit_header=widen)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_checkpoint_hu_norm_wins_over_registry_default(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _seeded_model("redcnn", channels=8)
    save_checkpoint(model, path)
    custom = HUNormalization(offset_hu=-1000.0, scale_hu=2000.0, hu_min=-1000.0, hu_max=1000.0)
    assert custom != get_model_info("redcnn").hu_norm

    def swap_norm(header, tensors):
        header["hu_norm"] = custom.to_dict()
        header["tensors_sha256"] = tensors_sha256(tensors)

    _rewrite_checkpoint(path, edit_header=swap_norm)
    loaded, info = load_checkpoint(path)
    assert info.hu_norm == custom
    assert loaded.hu_norm == custom


def test_saved_checkpoint_is_readable_by_others(tmp_path):
    """A shared weights file must not be 0600 (mkstemp's mode) on a normal umask."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        save_checkpoint(_seeded_model("wgan_vgg"), path)
    finally:
        os.umask(old_umask)
    mode = path.stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, oct(mode)


def test_checkpoint_is_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "m.safetensors"
    save_checkpoint(_seeded_model("wgan_vgg"), path, training={"epochs": 1})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    ours = json.loads(header["__metadata__"]["ldct"])
    assert ours["format"] == "ldct-checkpoint"
    assert ours["model"] == "wgan_vgg"
    assert ours["training"] == {"epochs": 1}

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    model, info = load_checkpoint(path)
    assert info.model == "wgan_vgg"


def test_save_requires_a_registry_model(tmp_path):
    with pytest.raises(CheckpointError, match="create_model"):
        save_checkpoint(nn.Conv2d(1, 1, 3), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- public API


def test_public_api_imports():
    from ldct_cli import create_model as cm
    from ldct_cli import denoise_series, list_models as lm, load_checkpoint as lc
    from ldct_cli import save_checkpoint as sc

    assert cm is create_model and lm is list_models
    assert lc is load_checkpoint and sc is save_checkpoint
    assert callable(denoise_series)
    with pytest.raises(AttributeError):
        import ldct_cli

        ldct_cli.no_such_name  # noqa: B018


@pytest.mark.parametrize("module", ["ldct_cli", "ldct_cli.cli", "ldct_cli.models"])
def test_import_does_not_load_torch(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["model_kwargs"].update(channels=-8), "channels: expected an integer"),
    (lambda h: h["model_kwargs"].update(channels=10**9), "channels: expected an integer"),
    (lambda h: h["model_kwargs"].update(channels="96"), "channels: expected an integer"),
    (lambda h: h["model_kwargs"].update(bogus=1), "has no argument 'bogus'"),
    (lambda h: h["hu_norm"].update(scale_hu=0.0), "scale_hu must be > 0"),
    (lambda h: h["hu_norm"].update(scale_hu=float("nan")), "finite numbers"),
    (lambda h: h.update(model="unet"), "unknown model 'unet'"),
])
def test_checkpoint_headers_are_checked_before_anything_is_built(tmp_path, edit, message):
    """A header's constructor arguments and HU normalization are validated against the
    registry, so a crafted file gives one error instead of a hang, a MemoryError or blank output."""
    from ldct_cli import create_model, load_checkpoint, save_checkpoint
    from ldct_cli.checkpoint import read_checkpoint_info
    from ldct_cli.errors import CheckpointError

    path = tmp_path / "m.safetensors"
    save_checkpoint(create_model("redcnn", channels=8), path)
    _rewrite_checkpoint(path, edit_header=lambda header, tensors: edit(header))
    for read in (read_checkpoint_info, load_checkpoint):
        with pytest.raises(CheckpointError, match=message):
            read(path)
