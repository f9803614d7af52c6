"""``ldct train`` configuration: recipes per model, defaults < file < flags, strict keys."""

from __future__ import annotations

import json

import pytest

from ldct_cli.errors import UsageError
from ldct_cli.models.registry import get_model_info, list_models
from ldct_cli.training.config import (TrainConfig, presets, read_config_file,
                                      resolve_config)
from ldct_cli.training.loop import lr_at
from ldct_cli.training.steps import RECIPES


def batches_per_step(config: TrainConfig) -> int:
    return RECIPES[config.recipe].batches_per_step(config)


@pytest.mark.parametrize("name", list_models(("generator", "features")))
def test_every_trainable_model_has_a_recipe_file_and_resolves(name):
    config = resolve_config(model=name)
    assert config.model == name
    assert config.recipe == get_model_info(name).recipe
    assert config.recipe in RECIPES
    assert get_model_info(name).preset in presets()
    # The resolved config survives a JSON round trip (what the run folder stores).
    assert json.loads(json.dumps(config.to_dict()))["model"] == name


@pytest.mark.parametrize("name", list_models("classical"))
def test_classical_filters_are_refused_by_train(name):
    with pytest.raises(UsageError, match="classical filter: there is nothing to train"):
        resolve_config(model=name)


def test_paper_numbers_of_each_recipe():
    red = resolve_config(model="redcnn")
    assert (red.loss.pixel, red.optimizer.lr, red.optimizer.lr_final) == ("mse", 1e-4, 1e-5)
    assert red.data.patch_size == 55
    wgan = resolve_config(model="wgan_vgg", overrides={"vgg_weights": "/x/vgg19-dcbb9e9d.pth"})
    assert wgan.recipe == "wgan_gp"
    assert (wgan.loss.gradient_penalty, wgan.loss.n_critic, wgan.loss.perceptual_weight) == (10.0, 4, 0.1)
    assert wgan.loss.perceptual == "vgg19" and wgan.loss.pixel == "none"
    assert wgan.optimizer.lr == wgan.critic_optimizer.lr == 1e-5
    assert wgan.optimizer.betas == wgan.critic_optimizer.betas == (0.5, 0.9)
    assert (wgan.data.patch_size, wgan.data.batch_size) == (64, 128)
    assert batches_per_step(wgan) == 5
    p2p = resolve_config(model="pix2pix")
    assert (p2p.loss.pixel, p2p.loss.pixel_weight, p2p.loss.adversarial_weight) == ("l1", 100.0, 1.0)
    assert p2p.optimizer.lr == 2e-4 and p2p.optimizer.betas == (0.5, 0.999)
    assert p2p.data.patch_size % get_model_info("pix2pix").load_class()().size_multiple == 0
    assert batches_per_step(p2p) == 1


def test_yang_variants_switch_terms_on_the_same_generator(monkeypatch):
    monkeypatch.delenv("LDCT_VGG_WEIGHTS", raising=False)
    terms = {}
    for preset in ("cnn_mse", "cnn_vgg", "wgan_mse", "wgan_vgg"):
        config = resolve_config(model=None if preset != "wgan_vgg" else "wgan_vgg",
                                config_file=None if preset == "wgan_vgg" else preset)
        assert config.model == "wgan_vgg"
        terms[preset] = (config.recipe, config.loss.pixel, config.loss.perceptual)
    assert terms == {"cnn_mse": ("supervised", "mse", "none"), "cnn_vgg": ("supervised", "none", "ct"),
                     "wgan_mse": ("wgan_gp", "mse", "none"), "wgan_vgg": ("wgan_gp", "none", "ct")}


def test_auto_perceptual_takes_vgg19_when_a_file_is_named_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("LDCT_VGG_WEIGHTS", raising=False)
    assert resolve_config(model="wgan_vgg").loss.perceptual == "ct"
    monkeypatch.setenv("LDCT_VGG_WEIGHTS", "/data/vgg19-dcbb9e9d.pth")
    config = resolve_config(model="wgan_vgg")
    assert (config.loss.perceptual, config.vgg_weights) == ("vgg19", "/data/vgg19-dcbb9e9d.pth")


def test_precedence_defaults_recipe_file_flags(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('seed = 7\n[data]\nbatch_size = 4\npatch_size = 48\n[optimizer]\nlr = 3e-4\n')
    config = resolve_config(model="redcnn", config_file=path, overrides={"data.patch_size": 40, "seed": None})
    assert config.data.batch_size == 4  # file over recipe (16)
    assert config.data.patch_size == 40  # flag over file (48) over recipe (55)
    assert config.optimizer.lr == 3e-4 and config.optimizer.lr_final == 1e-5  # file merges into recipe
    assert config.seed == 7  # a flag left unset (None) does not override
    assert config.data.augment is True  # dataclass default


def test_a_run_config_json_reproduces_the_config(tmp_path):
    config = resolve_config(model="pix2pix", overrides={"model_kwargs.depth": 3, "data.patch_size": 64})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert resolve_config(model=None, config_file=path) == config
    assert isinstance(resolve_config(model=None, config_file=path).optimizer.betas, tuple)


def test_loss_units_hu_is_refused_for_pix2pix():
    with pytest.raises(UsageError, match="pix2pix's cGAN loss has no intensity unit"):
        resolve_config(model="pix2pix", overrides={"loss.units": "hu"})
    assert resolve_config(model="redcnn_wgan").loss.units == "hu"


@pytest.mark.parametrize("text, message", [
    ("[loss]\npixle = 'mse'\n", "unknown key(s) pixle in [loss]"),
    ("batchsize = 3\n", "unknown key(s) batchsize in the top level"),
    ("[data]\nbatch_size = 'many'\n", "data.batch_size: expected an integer"),
    ("[optimizer]\nbetas = [0.5]\n", "optimizer.betas: expected 2 numbers"),
    ("[loss]\npixel = 'huber'\n", "loss.pixel 'huber'"),
    ("[data]\naugment = 1\n", "data.augment: expected true or false"),
    ("model = 'pix2pix'\n", "is for model 'pix2pix', not --model 'redcnn'"),
    ("recipe = 'wgan_gp'\n", "needs loss.adversarial_weight > 0"),
    ("recipe = 'autoencoder'\n", "cannot train with recipe 'autoencoder'"),
    ("[schedule]\nmax_steps = 0\n", "max_steps"),
    ("[loss]\npixel = 'none'\n", "needs a pixel or a perceptual loss term"),
    ("this is = not toml [\n", "cannot read config"),
    ("window = 'liver'\n", "window: unknown window 'liver'"),
    ("ema_decay = 1.0\n", "ema_decay 1: 0 (off) or a decay in (0, 1)"),
    ("[loss]\nunits = 'kelvin'\n", "loss.units 'kelvin' is not one of model, hu"),
    ("[data]\ntarget = 'clean'\n", "data.target 'clean' is not one of full, noisier2noise"),
])
def test_bad_config_files_are_refused_with_the_key_and_reason(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        resolve_config(model="redcnn", config_file=path)
    assert message in str(info.value)


def test_unknown_model_and_missing_config_file():
    with pytest.raises(UsageError, match="unknown model 'unet3d'"):
        resolve_config(model="unet3d")
    with pytest.raises(UsageError, match="no such file, and not a bundled preset"):
        read_config_file("nope/missing.toml")
    with pytest.raises(UsageError, match="name the model"):
        resolve_config(model=None)


def test_learning_rate_schedule_is_a_function_of_the_step_alone():
    opt = resolve_config(model="redcnn").optimizer
    assert lr_at(opt, 0) == pytest.approx(1e-4)
    assert lr_at(opt, 50_000) == pytest.approx(1e-4 * 0.1 ** 0.5)
    assert lr_at(opt, 100_000) == pytest.approx(1e-5)
    assert lr_at(opt, 10 ** 7) == pytest.approx(1e-5)
    flat = resolve_config(model="pix2pix").optimizer
    assert lr_at(flat, 0) == lr_at(flat, 10 ** 6) == 2e-4


def test_train_config_is_frozen():
    config = resolve_config(model="redcnn")
    with pytest.raises(Exception):
        config.seed = 3  # type: ignore[misc]
    assert isinstance(config, TrainConfig)


def test_cascade_recipe_takes_vgg16_blocks_or_falls_back_to_ct_without_layers(monkeypatch):
    monkeypatch.delenv("LDCT_VGG_WEIGHTS", raising=False)
    config = resolve_config(model="cascade")
    assert config.recipe == "cascade" and config.schedule.stage_steps == (132_000, 88_000)
    assert (config.loss.perceptual, config.loss.perceptual_layer) == ("ct", "")
    assert config.optimizer.lr == 1e-3 and config.data.batch_size == 32
    with_vgg = resolve_config(model="cascade", overrides={"vgg_weights": "/data/vgg16-397923af.pth"})
    assert with_vgg.loss.perceptual == "vgg16"
    assert with_vgg.loss.perceptual_layer == "conv1_2,conv2_2,conv3_3,conv4_3"
    # --perceptual ct: the recipe's VGG layer list does not apply to the CT extractor.
    assert resolve_config(model="cascade", overrides={"loss.perceptual": "ct"}).loss.perceptual_layer == ""
    three = resolve_config(model=None, config_file="cascade3")
    assert three.model_kwargs == {"levels": 3} and len(three.schedule.stage_steps) == 3
    with pytest.raises(UsageError, match="stage_steps"):
        resolve_config(model="cascade", overrides={"schedule.stage_steps": [10, 0]})
    with pytest.raises(UsageError, match="expected a list"):
        resolve_config(model="cascade", overrides={"schedule.stage_steps": 10})


def test_dose_files_is_a_list_of_distinct_indices():
    config = resolve_config(model="redcnn", overrides={"data.dose_files": [0, 2]})
    assert config.data.dose_files == (0, 2)
    for bad in ([0, 0], [-1]):
        with pytest.raises(UsageError, match=r"data.dose_files .*: distinct indices, 0 or more"):
            resolve_config(model="redcnn", overrides={"data.dose_files": bad})


def test_a_models_own_recipe_file_does_not_restate_its_recipe():
    # The registry names each model's recipe; a preset says `recipe` only to train another way.
    import tomllib

    from ldct_cli.training.config import RECIPES_DIR

    for name in presets():
        tree = tomllib.loads((RECIPES_DIR / f"{name}.toml").read_text())
        model = tree.get("model", name)
        assert tree.get("recipe") in (None, *set(RECIPES) - {get_model_info(model).recipe}), name
