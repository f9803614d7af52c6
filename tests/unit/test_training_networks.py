"""The auxiliary networks of training: WGAN critic, PatchGAN, VGG / CT perceptual features."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ldct_cli.errors import UsageError
from ldct_cli.training import perceptual
from ldct_cli.training.critics import (
    PatchGanDiscriminator,
    WganCritic,
    init_pix2pix_weights,
    receptive_field,
)
from ldct_cli.training.perceptual import (
    VGG_WEIGHTS_ENV,
    CtAutoencoder,
    CtFeatures,
    PerceptualLoss,
    PerceptualWeightsError,
    VggFeatures,
    find_vgg_weights,
    load_vgg_weights,
    perceptual_extractor,
)

VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG19_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv_keys(indices: list[int]) -> list[str]:
    return [f"features.{i}.{kind}" for i in indices for kind in ("weight", "bias")]


# ---------------------------------------------------------------------------- WGAN critic

def test_wgan_critic_scores_one_value_per_patch():
    critic = WganCritic()
    assert critic(torch.rand(3, 1, 64, 64)).shape == (3,)


def test_wgan_critic_parameter_count_matches_the_architecture():
    conv = lambda c_in, c_out: 3 * 3 * c_in * c_out + c_out  # noqa: E731
    convs = conv(1, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 256) + conv(256, 256)
    # 64 px -> 32 -> 16 -> 8 after the three stride-2 layers: 256 maps of 8x8 feed the FC.
    fc = (256 * 8 * 8 * 1024 + 1024) + (1024 * 1 + 1)
    assert convs == 1_144_256
    assert convs + fc == 17_923_521
    assert _n_params(WganCritic(in_channels=1, patch_size=64)) == 17_923_521


def test_wgan_critic_refuses_other_sizes_and_has_no_batch_norm():
    critic = WganCritic(patch_size=64)
    with pytest.raises(ValueError, match="64x64"):
        critic(torch.rand(1, 1, 32, 32))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    # The FC size follows patch_size: 32 -> 4x4 maps.
    assert WganCritic(patch_size=32).head[1].in_features == 256 * 4 * 4


def test_wgan_critic_supports_the_gradient_penalty():
    torch.manual_seed(0)
    critic = WganCritic(patch_size=32)
    real, fake = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    alpha = torch.rand(2, 1, 1, 1)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    assert grad.shape == mixed.shape and grad.abs().sum() > 0
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    first_conv = critic.features[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- PatchGAN

def test_patchgan_receptive_field_is_70():
    disc = PatchGanDiscriminator()
    # Back from one output: 1 -> 4 -> 7 (stride 1) -> 16 -> 34 -> 70 (three stride 2).
    assert receptive_field(disc) == 70


def test_patchgan_output_grid_for_256_pairs():
    disc = PatchGanDiscriminator(in_channels=2)
    # 256 -> 128 -> 64 -> 32 (4x4, stride 2, pad 1), then 32 -> 31 -> 30 (stride 1).
    assert disc(torch.rand(2, 2, 256, 256)).shape == (2, 1, 30, 30)


def test_patchgan_has_no_batch_norm_after_the_first_conv():
    layers = list(PatchGanDiscriminator().net)
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.LeakyReLU)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 3
    assert [m.out_channels for m in layers if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]


def test_pix2pix_init_gives_the_papers_statistics():
    torch.manual_seed(0)
    disc = PatchGanDiscriminator()
    disc.apply(init_pix2pix_weights)
    conv = disc.net[2]  # 64 -> 128 channels: 131,072 weights
    assert abs(conv.weight.std().item() - 0.02) < 0.001
    assert abs(conv.weight.mean().item()) < 0.001
    bn = disc.net[3]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and bn.bias.abs().sum() == 0
    assert disc.net[0].bias.abs().sum() == 0


# ------------------------------------------------------------------------------------ VGG

def _synthetic_vgg19_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG19 state dict of random tensors, saved at ``path``."""
    torch.manual_seed(0)
    state, c_in = {}, 3
    for index, width in zip(VGG19_CONVS, VGG19_WIDTHS):
        state[f"features.{index}.weight"] = torch.randn(width, c_in, 3, 3) * 0.01
        state[f"features.{index}.bias"] = torch.randn(width) * 0.01
        c_in = width
    state["classifier.0.weight"] = torch.randn(16, 8)
    state["classifier.0.bias"] = torch.randn(16)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("vgg") / "my-vgg19.pth"
    return path, _synthetic_vgg19_file(path)


def test_vgg_state_dict_keys_follow_torchvision():
    vgg19 = VggFeatures("vgg19", layer="conv5_4")
    assert list(vgg19.state_dict()) == _conv_keys(VGG19_CONVS)
    assert len(vgg19.features) == 35  # up to conv5_4, without its ReLU
    vgg16 = VggFeatures("vgg16", layer="conv5_3")
    assert list(vgg16.state_dict()) == _conv_keys(VGG16_CONVS)
    assert list(VggFeatures("vgg16").state_dict()) == _conv_keys(VGG16_CONVS)  # default: last conv
    assert list(VggFeatures("vgg19", layer="conv3_2").state_dict()) == _conv_keys([0, 2, 5, 7, 10, 12])
    with pytest.raises(UsageError, match="conv5_4"):
        VggFeatures("vgg16", layer="conv5_4")


def test_vgg19_conv5_4_feature_shape_and_frozen_eval():
    vgg = VggFeatures("vgg19", layer="conv5_4")
    assert vgg(torch.rand(2, 1, 64, 64)).shape == (2, 512, 4, 4)
    assert not any(p.requires_grad for p in vgg.parameters())
    nn.Sequential(vgg).train()
    assert not vgg.training and not any(m.training for m in vgg.modules())


def test_load_vgg_weights_without_hash_check(vgg19_file):
    path, state = vgg19_file
    weights = load_vgg_weights("vgg19", path, layer="conv5_4", verify_hash=False)
    assert sorted(weights) == sorted(_conv_keys(VGG19_CONVS))  # no classifier keys
    vgg = VggFeatures("vgg19")
    vgg.load_state_dict(weights, strict=True)
    assert torch.equal(vgg.features[34].weight, state["features.34.weight"])
    short = load_vgg_weights("vgg19", path, layer="conv2_1", verify_hash=False)
    assert sorted(short) == sorted(_conv_keys([0, 2, 5]))


def test_load_vgg_weights_refuses_a_file_with_the_wrong_hash(tmp_path, vgg19_file):
    renamed = tmp_path / "vgg19-dcbb9e9d.pth"
    renamed.write_bytes(vgg19_file[0].read_bytes())
    with pytest.raises(PerceptualWeightsError, match="dcbb9e9d") as excinfo:
        load_vgg_weights("vgg19", renamed)
    assert str(renamed) in str(excinfo.value)


def test_load_vgg_weights_reports_missing_files_and_tensors(tmp_path):
    missing = tmp_path / "nowhere" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(PerceptualWeightsError) as excinfo:
        load_vgg_weights("vgg19", missing)
    message = str(excinfo.value)
    assert str(missing) in message and "--vgg-weights" in message and VGG_WEIGHTS_ENV in message
    assert "\n" not in message
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(PerceptualWeightsError, match="features.0.bias"):
        load_vgg_weights("vgg19", partial, verify_hash=False)


def test_find_vgg_weights_uses_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(VGG_WEIGHTS_ENV, raising=False)
    with pytest.raises(PerceptualWeightsError, match="--vgg-weights"):
        find_vgg_weights("vgg19", None)
    from_env = tmp_path / "env.pth"
    monkeypatch.setenv(VGG_WEIGHTS_ENV, str(from_env))
    assert find_vgg_weights("vgg19", None) == from_env
    assert find_vgg_weights("vgg19", tmp_path / "given.pth") == tmp_path / "given.pth"
    assert find_vgg_weights("vgg16", tmp_path) == tmp_path / "vgg16-397923af.pth"


def test_perceptual_extractor_loads_verified_vgg_weights(vgg19_file, monkeypatch):
    path, state = vgg19_file
    # Pretend the synthetic file is torchvision's: its own sha256 prefix becomes the expected one.
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(perceptual.VGG_FILES, "vgg19", f"vgg19-{prefix}.pth")
    extractor = perceptual_extractor("vgg19", vgg_weights=path, layer="conv2_2")
    assert isinstance(extractor, VggFeatures) and len(extractor.features) == 8  # conv2_2 is index 7
    assert torch.equal(extractor.features[7].weight, state["features.7.weight"])
    assert extractor(torch.rand(1, 1, 32, 32)).shape == (1, 128, 16, 16)


def test_perceptual_extractor_rejects_unknown_kinds():
    with pytest.raises(UsageError, match="vgg19, vgg16, ct"):
        perceptual_extractor("resnet")


# -------------------------------------------------------------------------- perceptual loss

def test_perceptual_loss_is_feature_mse_with_gradients_to_the_output_only():
    torch.manual_seed(0)
    extractor = CtFeatures(CtAutoencoder())
    loss_fn = PerceptualLoss(extractor)
    target = torch.rand(2, 1, 32, 32)
    assert loss_fn(target.clone(), target).item() == 0.0
    output = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    loss = loss_fn(output, target)
    expected = ((extractor(output) - extractor(target)) ** 2).mean()
    assert loss.item() > 0 and torch.allclose(loss, expected)
    loss.backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())


# ------------------------------------------------------------------------- CT autoencoder

def test_ct_autoencoder_shapes():
    model = CtAutoencoder()
    assert model.size_multiple == 4 and model.context_slices == 1 and model.halo is None
    for size in (64, 96):
        x = torch.rand(2, 1, size, size)
        assert model.encode(x).shape == (2, 128, size // 4, size // 4)
        assert model(x).shape == (2, 1, size, size)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 1, 30, 30))


def _smooth_images(n: int, size: int) -> torch.Tensor:
    """(n, 1, size, size) sums of random Gaussian blobs in [0, 1]: CT-like smooth structures."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(4):
            cy, cx = torch.rand(2) * 1.6 - 0.8
            width = 0.15 + 0.3 * torch.rand(1)
            images[i, 0] += torch.rand(1) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / width ** 2)
    return images.clamp(0, 1)


def test_ct_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    model = CtAutoencoder(channels=16)
    images = _smooth_images(4, 24)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(images), images).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(images), images)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(images), images).item()
    assert final < 0.5 * initial, (initial, final)
    # Better than the best constant image (the mean): it reconstructs structure, not just the level.
    assert final < images.var().item(), (final, images.var().item())


def test_ct_features_are_a_frozen_copy_of_the_encoder():
    model = CtAutoencoder()
    features = CtFeatures(model)
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is untouched
    assert not any(p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(features(x), model.encode(x))


# ------------------------------------------------------------- ct path of perceptual_extractor

def _save_ct_autoencoder(path: Path) -> CtAutoencoder:
    from ldct_cli.checkpoint import save_checkpoint
    from ldct_cli.models.normalization import UNIT_RANGE

    torch.manual_seed(1)
    model = CtAutoencoder(in_slices=1, channels=32)
    model.ldct_name = "ct_features"
    model.ldct_kwargs = {"in_slices": 1, "channels": 32}
    model.hu_norm = UNIT_RANGE
    save_checkpoint(model, path)
    return model


def test_perceptual_extractor_ct_loads_the_checkpoint(tmp_path):
    from ldct_cli.models import registry

    if "ct_features" not in registry._REGISTRY:
        pytest.skip("ct_features not registered yet")
    path = tmp_path / "ct_features.safetensors"
    model = _save_ct_autoencoder(path)
    extractor = perceptual_extractor("ct", ct_weights=path)
    assert isinstance(extractor, CtFeatures)
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(extractor(x), model.encode(x))
    assert extractor(x).shape == (2, 128, 8, 8)


def test_perceptual_extractor_ct_refuses_other_models(tmp_path):
    from ldct_cli import create_model, save_checkpoint

    path = tmp_path / "redcnn.safetensors"
    save_checkpoint(create_model("redcnn", channels=4), path)
    with pytest.raises(PerceptualWeightsError, match="redcnn"):
        perceptual_extractor("ct", ct_weights=path)


def test_perceptual_extractor_ct_reports_missing_weights(tmp_path, monkeypatch):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(PerceptualWeightsError, match="absent.safetensors"):
        perceptual_extractor("ct", ct_weights=missing)
    monkeypatch.setenv("LDCT_WEIGHTS_DIR", str(tmp_path))  # a weights folder with nothing bundled
    with pytest.raises(PerceptualWeightsError, match="ldct train --model ct_features") as excinfo:
        perceptual_extractor("ct")
    assert str(tmp_path) in str(excinfo.value)


def test_bundled_ct_feature_extractor_was_trained_by_ldct_train():
    """weights/ct_features.safetensors: made by this project's own `ldct train --model ct_features`."""
    from ldct_cli.bundled import bundled_checkpoint
    from ldct_cli.checkpoint import load_checkpoint

    path = bundled_checkpoint("ct_features")  # listed in the manifest, sha256 verified
    assert path is not None, "the bundled CT feature extractor is missing"
    model, info = load_checkpoint(path)
    assert info.model == "ct_features" and info.config["recipe"] == "autoencoder"
    assert info.training["step"] > 0 and info.training["validation"]["psnr"] > 0
    extractor = perceptual_extractor("ct")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert extractor(x).shape == (1, 128, 16, 16)
        # The encoder is the trained one, not a fresh initialisation.
        assert torch.equal(extractor(x), model.encode(x))


def test_simple_cnn_critic_of_seed_004_scores_each_patch():
    from ldct_cli.training.critics import SimpleCnnCritic

    critic = SimpleCnnCritic()
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (64, 3, 1, 1), (128, 5, 3, 1), (128, 3, 1, 1), (128, 5, 3, 1), (1, 3, 1, 0)]
    assert critic.model(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 5, 5)  # 64 -> 21 -> 7 -> 5
    scores = critic(torch.rand(3, 1, 64, 64))
    assert scores.shape == (3,)
    assert critic(torch.rand(1, 1, 32, 32)).shape == (1,)  # fully convolutional


def test_vgg_with_several_layers_taps_each_before_its_relu(vgg19_file):
    """Seed 002's perceptual loss reads VGG16's blocks 1-4: one pass, several feature maps."""
    vgg = VggFeatures("vgg16", layer="conv4_3, conv1_2,conv2_2,conv3_3")
    assert vgg.layers == ["conv1_2", "conv2_2", "conv3_3", "conv4_3"] and len(vgg.features) == 22  # conv4_3 is index 21
    torch.manual_seed(0)
    for p in vgg.parameters():
        p.data.normal_(0, 0.1)
    x = torch.rand(2, 1, 32, 32)
    taps = vgg(x)
    assert [t.shape[1:] for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    normalised = (x.expand(-1, 3, -1, -1) - vgg.mean) / vgg.std
    torch.testing.assert_close(taps[1], vgg.features[:8](normalised))  # conv2_2 is index 7, pre-ReLU
    assert (taps[2] < 0).any()  # no ReLU after the tapped conv
    # The loss is the sum over the maps of their mean squared differences (the cascade paper, eq. 3).
    y = torch.rand(2, 1, 32, 32)
    expected = sum(torch.mean((a - b) ** 2) for a, b in zip(vgg(x), vgg(y)))
    torch.testing.assert_close(PerceptualLoss(vgg)(x, y), expected)
    assert sorted(load_vgg_weights("vgg19", vgg19_file[0], layer="conv1_2,conv2_1",
                                   verify_hash=False)) == sorted(_conv_keys([0, 2, 5]))
    with pytest.raises(UsageError, match="twice"):
        VggFeatures("vgg16", layer="conv1_2,conv1_2")


# ---------------------------------------------------------------------------- loss units

def _wgan_step_terms(units: str) -> dict[str, float]:
    """One WGAN-GP step of a tiny generator and Ryu's simple CNN critic, nothing updated (lr 0)."""
    from ldct_cli.models.normalization import UNIT_RANGE
    from ldct_cli.training.config import resolve_config
    from ldct_cli.training.critics import SimpleCnnCritic
    from ldct_cli.training.steps import Parts, wgan_gp_step

    config = resolve_config(model="redcnn_wgan", overrides={"loss.units": units, "loss.n_critic": 1})
    torch.manual_seed(0)
    generator, critic = nn.Conv2d(1, 1, 3, padding=1), SimpleCnnCritic()
    parts = Parts(generator=generator, opt_g=torch.optim.Adam(generator.parameters(), lr=0.0),
                  critic=critic, opt_d=torch.optim.Adam(critic.parameters(), lr=0.0),
                  loss_unit=UNIT_RANGE.scale_hu if units == "hu" else 1.0)
    gen = torch.Generator().manual_seed(1)
    low = 0.25 + 0.01 * torch.randn(2, 3, 1, 32, 32, generator=gen)
    full = 0.25 + 0.002 * torch.randn(2, 3, 1, 32, 32, generator=gen)
    torch.manual_seed(2)
    terms = wgan_gp_step(parts, config, low, full)
    with torch.no_grad():  # the same output and target, in HU
        out_hu = UNIT_RANGE.to_hu(generator(low[1]).numpy())
        terms["mse_direct_hu2"] = float(((out_hu - UNIT_RANGE.to_hu(full[1].numpy())) ** 2).mean())
    return terms


def test_loss_units_hu_measure_the_generator_terms_in_hu():
    """units = "hu": MSE is the mean squared HU difference, the critic's score is counted per
    HU (a 1-Lipschitz critic in model units is 4096 times steeper per model unit than per HU),
    and the critic's own training is unchanged."""
    model, hu = _wgan_step_terms("model"), _wgan_step_terms("hu")
    assert hu["mse"] == pytest.approx(hu["mse_direct_hu2"], rel=1e-4)
    assert hu["mse"] == pytest.approx(4096.0 ** 2 * model["mse"], rel=1e-4)
    assert hu["adversarial"] == pytest.approx(4096.0 * model["adversarial"], rel=1e-4)
    assert (hu["critic"], hu["gp"], hu["wasserstein"]) == pytest.approx(
        (model["critic"], model["gp"], model["wasserstein"]), rel=1e-5)
    assert hu["loss"] == pytest.approx(0.95 * hu["mse"] + 0.05 * hu["adversarial"], rel=1e-4)
