"""The model registry: the only list of model names in ldct-cli.

Each entry names its network class by import path, so listing models (for ``--help``
and ``ldct models``) does not import torch; ``create_model`` imports it when needed.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ldct_cli.errors import UsageError
from ldct_cli.models.normalization import SYMMETRIC_RANGE, UNIT_RANGE, HUNormalization


@dataclass(frozen=True)
class ModelInfo:
    """What a registered generator is, where it comes from, and how it sees HU."""

    name: str
    target: str  # "module:Class" of the torch.nn.Module
    title: str
    paper: str
    hu_norm: HUNormalization | None  # None for classical filters, which work in HU
    default_kwargs: dict[str, Any] = field(default_factory=dict)
    # "generator": a trained denoiser (``ldct denoise``, ``ldct train``); "classical": a
    # weight-free filter (``ldct denoise``, ``ldct evaluate``; nothing to train);
    # "features": a perceptual feature extractor that training uses (never denoises).
    kind: str = "generator"
    recipe: str = "supervised"  # the training step of ``ldct train`` (ldct_cli.training.steps)
    # What its paper trains it for: "mse" (pixel loss, built for PSNR) or "adversarial"
    # (GAN losses, built to keep texture). The bundled-weights bar differs by objective.
    objective: str = "mse"
    # A named variant of another registered model (same network class and recipe file,
    # other ``default_kwargs``, e.g. narrower to train on a CPU): never a silent change of
    # the paper's network, which keeps the plain name.
    variant_of: str | None = None

    @property
    def preset(self) -> str:
        """The bundled config preset (``training/recipes/<preset>.toml``: its paper's numbers)
        this model trains with; ``recipe`` is the kind of training step."""
        return self.variant_of or self.name

    def load_class(self):
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Add a model; a second model of the same name is an error, not a warning."""
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is registered twice")
    if info.objective not in OBJECTIVES:
        raise ValueError(f"model {info.name!r}: objective {info.objective!r} is not one of {OBJECTIVES}")
    if info.kind not in KINDS:
        raise ValueError(f"model {info.name!r}: kind {info.kind!r} is not one of {KINDS}")
    if info.variant_of is not None:
        parent = _REGISTRY.get(info.variant_of)
        if parent is None or parent.target != info.target or parent.recipe != info.recipe:
            raise ValueError(f"model {info.name!r}: a variant of {info.variant_of!r} needs that model "
                             "registered first, with the same network class and recipe")
    _REGISTRY[info.name] = info
    return info


def register_variant(of: str, name: str, title: str, **default_kwargs: Any) -> ModelInfo:
    """Register a named variant of model ``of``: its network, paper, HU contract and recipe,
    with other constructor defaults (e.g. a narrower width to train on a CPU)."""
    parent = get_model_info(of)
    return register_model(replace(parent, name=name, title=title, variant_of=of,
                                  default_kwargs={**parent.default_kwargs, **default_kwargs}))


KINDS = ("generator", "classical", "features")
DENOISERS = ("generator", "classical")  # the kinds ``ldct denoise --model`` takes
OBJECTIVES = ("mse", "adversarial")


def list_models(kind: str | tuple[str, ...] | None = "generator") -> list[str]:
    """Registered model names of one kind or kinds (``None``: all), in registration order."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return [name for name, info in _REGISTRY.items() if kinds is None or info.kind in kinds]


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}") from None


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """All constructor arguments of a model, defaults filled in (what a checkpoint stores)."""
    info = get_model_info(name)
    cls = info.load_class()
    merged = {**info.default_kwargs, **kwargs}
    try:
        bound = inspect.signature(cls).bind(**merged)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


MAX_INT_KWARG = 4096  # widths, depths, kernel sizes: anything larger is not a model but a hazard


def check_stored_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments read from a file (a checkpoint header), checked against the
    registered class's signature before anything is built: known names only, each of its
    default's type (bool, int, float, str), integers in [0, MAX_INT_KWARG], floats finite.
    Raises ValueError naming the argument."""
    cls = get_model_info(name).load_class()
    parameters = inspect.signature(cls).parameters
    for key, value in kwargs.items():
        if key not in parameters:
            raise ValueError(f"model {name!r} has no argument {key!r}")
        default = parameters[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        kind = type(default)
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)
                            or not 0 <= value <= MAX_INT_KWARG):
            raise ValueError(f"{key}: expected an integer in [0, {MAX_INT_KWARG}], got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{key}: expected text, got {value!r}")
    return kwargs


def create_model(name: str, **kwargs: Any):
    """Build a registered generator (a ``torch.nn.Module``) with its kwargs resolved.

    The module carries ``ldct_name``, ``ldct_kwargs`` and ``hu_norm`` so that
    ``save_checkpoint`` can describe it without further arguments.
    """
    info = get_model_info(name)
    full_kwargs = resolve_kwargs(name, **kwargs)
    model = info.load_class()(**full_kwargs)
    model.ldct_name = name
    model.ldct_kwargs = full_kwargs
    if info.hu_norm is not None:
        model.hu_norm = info.hu_norm
    return model


register_model(ModelInfo(
    name="redcnn",
    target="ldct_cli.models.redcnn:RedCNN",
    title="RED-CNN: residual encoder-decoder CNN (5 conv + 5 deconv, 96 ch, 5x5, 3 shortcuts)",
    paper="H. Chen et al., Low-Dose CT With a Residual Encoder-Decoder Convolutional Neural Network, "
          "IEEE TMI 36(12), 2017",
    hu_norm=UNIT_RANGE,
    recipe="supervised",
))
register_model(ModelInfo(
    name="wgan_vgg",
    target="ldct_cli.models.wgan_vgg:WganVggGenerator",
    title="WGAN-VGG generator: 8 conv layers 3x3, 32 channels (1 in the last), ReLU",
    paper="Q. Yang et al., Low-Dose CT Image Denoising Using a Generative Adversarial Network With "
          "Wasserstein Distance and Perceptual Loss, IEEE TMI 37(6), 2018",
    hu_norm=UNIT_RANGE,
    recipe="wgan_gp",
    objective="adversarial",
))
register_model(ModelInfo(
    name="pix2pix",
    target="ldct_cli.models.pix2pix:UNetGenerator",
    title="Pix2Pix U-Net generator: 7 down / 7 up, 4x4 stride-2 convs, widths 64-512, BatchNorm, skips, "
          "dropout, tanh",
    paper="P. Isola et al., Image-to-Image Translation with Conditional Adversarial Networks, CVPR 2017",
    hu_norm=SYMMETRIC_RANGE,
    recipe="pix2pix",
    objective="adversarial",
))
register_variant("pix2pix", "pix2pix_small",
                 "Pix2Pix U-Net at half the paper's width (32-256): a quarter of the parameters, to train on a CPU",
                 base_channels=32, max_channels=256)
register_model(ModelInfo(
    name="redcnn_wgan",
    target="ldct_cli.models.redcnn:RedCNN",
    title="RED-CNN generator trained with WGAN-GP against a simple CNN critic (0.95 MSE + 0.05 adversarial)",
    paper="H. Ryu, LDCT Denoising With REDCNN & WGAN-GP, 2024: RED-CNN + WGAN-GP with a simple CNN discriminator and variable-dose training "
          "(after H. Chen et al., IEEE TMI 2017, and I. Gulrajani et al., NeurIPS 2017)",
    hu_norm=UNIT_RANGE,
    recipe="wgan_gp",
    objective="adversarial",
))
register_model(ModelInfo(
    name="cascade",
    target="ldct_cli.models.cascade:Cascade",
    title="Cascade: DRL (dilated convs + edge layer) on perceptual loss, then CNN10 difference "
          "network(s) on MSE; levels=2 (default) or 3",
    paper="S. Ataei, J. Alirezaie, P. Babyn, Cascaded Convolutional Neural Networks with Perceptual Loss "
          "for Low Dose CT Denoising, 2020; DRL: M. Gholizadeh-Ansari et al., J. Digit. "
          "Imaging 33, 2020; CNN10: D. Wu et al., arXiv:1705.04267, 2017",
    hu_norm=UNIT_RANGE,
    recipe="cascade",
))
register_model(ModelInfo(
    name="cpca",
    target="ldct_cli.models.cpca:CPCA",
    title="CPCA: contracting-path conv autoencoder (4 conv + 4 deconv, 32 maps, 3x3, 1x1 64->32 after "
          "each path); 2.5D with in_slices 3/5/7 (3D filters, initialised from a 2D model)",
    paper="H. Shan et al., 3-D Convolutional Encoder-Decoder Network for Low-Dose CT via Transfer Learning "
          "From a 2-D Trained Network, IEEE TMI 37(6), 2018",
    hu_norm=UNIT_RANGE,
    recipe="wgan_gp",
    objective="adversarial",
))
register_model(ModelInfo(
    name="ct_features",
    target="ldct_cli.models.ct_autoencoder:CtAutoencoder",
    title="CT feature extractor: convolutional autoencoder trained on full-dose CT patches; "
          "its encoder gives the perceptual loss's features (--perceptual ct)",
    paper="M. Li et al., SACNN: Self-Attention Convolutional Neural Network for Low-Dose CT "
          "Denoising With Self-Supervised Perceptual Loss Network, IEEE TMI 39(7), 2020",
    hu_norm=UNIT_RANGE,
    kind="features",
    recipe="autoencoder",
))


def _register_classical(name: str, cls: str, title: str, paper: str) -> None:
    """A weight-free filter of sec. 2.2.1 of Lalithnarayan, Somayaji and Shaikh, "Denoising of
    Low Dose CT Images Using Generative Models": works in HU, nothing to train."""
    register_model(ModelInfo(name=name, target=f"ldct_cli.models.classical:{cls}", title=title,
                             paper=(f"{paper} (a classical baseline of Lalithnarayan, Somayaji and Shaikh, "
                                    "'Denoising of Low Dose CT Images Using Generative Models', 2020, sec. 2.2.1)"),
                             hu_norm=None, kind="classical", recipe="none"))


_register_classical(
    "nlm", "NonLocalMeans",
    "Non-local means (scikit-image fast NLM, 5x5 patches, 13x13 search); strength = h in HU",
    "A. Buades, B. Coll, J.-M. Morel, A non-local algorithm for image denoising, CVPR 2005")
_register_classical(
    "tv", "TotalVariation",
    "Total-variation denoising (scikit-image, Chambolle); strength = weight in HU",
    "A. Chambolle, An algorithm for total variation minimization and applications, "
    "J. Math. Imaging Vis. 20, 2004")
_register_classical(
    "bm3d", "Bm3d",
    "BM3D (optional 'bm3d' package: non-commercial licence, closed binary); strength = noise SD in HU",
    "K. Dabov et al., Image denoising by sparse 3-D transform-domain collaborative filtering, "
    "IEEE TIP 16(8), 2007")
