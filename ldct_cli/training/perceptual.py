"""Perceptual losses: ImageNet VGG features (Yang et al., TMI 2018) or a CT autoencoder (Li et al., TMI 2020).

The VGG stacks are defined here with torchvision's module indices, so torchvision's
published ``.pth`` files load without torchvision; the files are verified by the sha256
prefix in their names and read with ``weights_only=True`` (tensors only, no code).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldct_cli.errors import UsageError
from ldct_cli.fsutil import file_sha256
from ldct_cli.models.ct_autoencoder import CtAutoencoder
from ldct_cli.training.config import PERCEPTUAL_KINDS

# Conv widths and max-pools ("M") of VGG (Simonyan & Zisserman, ICLR 2015), configs D and E.
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# The last conv of each net: Yang et al. take the 16th conv of VGG19 (conv5_4).
DEFAULT_VGG_LAYER = {"vgg19": "conv5_4", "vgg16": "conv5_3"}
# torchvision's file names; the 8 hex digits are the start of the file's sha256.
VGG_FILES = {"vgg19": "vgg19-dcbb9e9d.pth", "vgg16": "vgg16-397923af.pth"}
VGG_WEIGHTS_ENV = "LDCT_VGG_WEIGHTS"
VGG_URL = "https://download.pytorch.org/models/{file}"
# ImageNet statistics the VGG weights were trained with (per RGB channel).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsError(UsageError):
    """Weights of a perceptual feature extractor that are missing, corrupt or do not fit."""


def _check_arch(arch: str) -> None:
    if arch not in VGG_CFGS:
        raise UsageError(f"unknown VGG architecture {arch!r}; known: {', '.join(VGG_CFGS)}")


def vgg_conv_indices(arch: str) -> dict[str, int]:
    """Layer name ``convX_Y`` -> index in torchvision's ``features`` (conv + ReLU per conv, one per pool)."""
    _check_arch(arch)
    names: dict[str, int] = {}
    index, block, conv = 0, 1, 1
    for item in VGG_CFGS[arch]:
        if item == "M":
            block, conv = block + 1, 1
            index += 1
        else:
            names[f"conv{block}_{conv}"] = index
            conv += 1
            index += 2
    return names


def _layer_index(arch: str, layer: str | None) -> int:
    """Index of the named conv in ``features`` (None: the net's last conv)."""
    layer = DEFAULT_VGG_LAYER[arch] if layer is None else layer
    indices = vgg_conv_indices(arch)
    if layer not in indices:
        raise UsageError(f"{arch} has no layer {layer!r}; its layers: {', '.join(indices)}")
    return indices[layer]


def _vgg_features(arch: str, *, last_index: int) -> nn.Sequential:
    """torchvision's ``features`` stack of ``arch``, kept up to and including ``last_index``."""
    layers: list[nn.Module] = []
    c_in = 3
    for item in VGG_CFGS[arch]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(item)
    return nn.Sequential(*layers[:last_index + 1])


class _FrozenExtractor(nn.Module):
    """A feature extractor that is always in eval mode and never trained."""

    def _freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "_FrozenExtractor":
        # The parent model's .train() recurses into its children; a perceptual network
        # must keep its eval-mode behaviour whatever the generator's mode is.
        return super().train(False)


class VggFeatures(_FrozenExtractor):
    """Frozen VGG feature maps: (B, 1, H, W) CT in [0, 1] -> features of one or several convolutions.

    ``layer`` names a convolution (Yang et al., TMI 2018: conv5_4 of VGG19, which is
    ``features[:35]``), or several, comma-separated (Ataei, Alirezaie and Babyn, "Cascaded
    Convolutional Neural Networks with Perceptual Loss for Low Dose CT Denoising": the last
    conv of VGG16's blocks 1-4, ``conv1_2,conv2_2,conv3_3,conv4_3``). Each is taken before
    its ReLU.
    One layer gives a tensor, several a list. The state-dict keys are torchvision's
    (``features.0.weight``, ...). Built with random weights; ``perceptual_extractor``
    loads the ImageNet ones.
    """

    def __init__(self, arch: str = "vgg19", *, layer: str | None = None):
        super().__init__()
        _check_arch(arch)
        self.arch = arch
        self.layers = _layer_names(arch, layer)
        self.layer = ",".join(self.layers)
        self._taps = sorted(_layer_index(arch, name) for name in self.layers)
        # The stack up to the deepest layer asked for; the last named one is the deepest.
        self.features = _vgg_features(arch, last_index=self._taps[-1])
        # Not persistent: the state dict stays exactly torchvision's layout.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, 1, H, W) grey image in [0, 1] -> (B, C, h, w) features, or a list of them."""
        # The grey CT goes to all three colour channels, then ImageNet normalisation,
        # which is the input VGG was trained on.
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out = (rgb - self.mean) / self.std
        if len(self._taps) == 1:
            return self.features(out)
        taps = []
        for index, module in enumerate(self.features):
            out = module(out)
            if index in self._taps:
                taps.append(out)
        return taps


def _layer_names(arch: str, layer: str | None) -> list[str]:
    """The VGG convolutions named by ``layer`` (comma-separated), checked, in network order."""
    names = [DEFAULT_VGG_LAYER[arch]] if not layer else [n.strip() for n in layer.split(",") if n.strip()]
    if not names:
        raise UsageError(f"no {arch} layer named in {layer!r}")
    indices = [_layer_index(arch, name) for name in names]  # checks each name
    if len(set(indices)) != len(indices):
        raise UsageError(f"{arch} layer list {layer!r} names a layer twice")
    return [name for _, name in sorted(zip(indices, names))]


def _expected_vgg_shapes(arch: str, layer: str | None) -> dict[str, tuple[int, ...]]:
    """State-dict key -> tensor shape of the stack up to ``layer`` (from the config, nothing built)."""
    last_index = _layer_index(arch, layer)
    shapes: dict[str, tuple[int, ...]] = {}
    index, c_in = 0, 3
    for item in VGG_CFGS[arch]:
        if index > last_index:
            break
        if item == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (int(item), c_in, 3, 3)
        shapes[f"features.{index}.bias"] = (int(item),)
        c_in = int(item)
        index += 2
    return shapes


def _how_to_get_vgg(arch: str) -> str:
    file = VGG_FILES[arch]
    return (f"on a machine with internet run python -c \"import torchvision; "
            f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\" and copy "
            f"~/.cache/torch/hub/checkpoints/{file}, or download {VGG_URL.format(file=file)}; "
            f"then pass --vgg-weights FILE or set {VGG_WEIGHTS_ENV}")


def find_vgg_weights(arch: str, path: Path | str | None) -> Path:
    """The VGG weight file to use: ``path``, else ``$LDCT_VGG_WEIGHTS``; a folder means its torchvision file."""
    _check_arch(arch)
    if path is None:
        path = os.environ.get(VGG_WEIGHTS_ENV) or None
    if path is None:
        raise PerceptualWeightsError(f"no ImageNet {arch} weights given: {_how_to_get_vgg(arch)}")
    path = Path(path).expanduser()
    # A folder such as torch's hub cache holds the file under torchvision's name.
    return path / VGG_FILES[arch] if path.is_dir() else path


def load_vgg_weights(arch: str, path: Path | str, *, layer: str | None = None,
                     verify_hash: bool = True) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision VGG file that the stack up to ``layer`` needs
    (comma-separated layers: up to the deepest).

    ``verify_hash`` checks the file's sha256 against the prefix in torchvision's file
    name (``VGG_FILES``), whatever the file is called on disk.
    """
    _check_arch(arch)
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"{path}: no such {arch} weight file; {_how_to_get_vgg(arch)}")
    if verify_hash:
        expected = VGG_FILES[arch].rsplit("-", 1)[1].split(".")[0]
        actual = file_sha256(path)[:len(expected)]
        if actual != expected:
            raise PerceptualWeightsError(f"{path}: not torchvision's {VGG_FILES[arch]} (sha256 starts "
                                         f"with {actual}, expected {expected})")
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or non-weight files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PerceptualWeightsError(f"{path}: not a {arch} weight file ({first})") from None
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{path}: not a {arch} state dict (holds a {type(state).__name__})")
    kept: dict[str, torch.Tensor] = {}
    for key, shape in _expected_vgg_shapes(arch, _layer_names(arch, layer)[-1]).items():
        if key not in state:
            raise PerceptualWeightsError(f"{path}: no tensor {key!r}; not a torchvision {arch} file")
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            found = tuple(getattr(state[key], "shape", ()))
            raise PerceptualWeightsError(f"{path}: {key} has shape {found}, {arch} needs {shape}")
        kept[key] = state[key]
    return kept


class CtFeatures(_FrozenExtractor):
    """Frozen ``CtAutoencoder`` encoder (SACNN, Li et al., TMI 2020): (B, 1, H, W) -> (B, 128, H/4, W/4)."""

    def __init__(self, autoencoder: CtAutoencoder):
        super().__init__()
        self.in_slices = autoencoder.context_slices
        # A copy: freezing must not change the caller's (perhaps still training) model.
        self.encoder = copy.deepcopy(autoencoder.encoder)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) image in the unit range -> (B, C, H/4, W/4) features."""
        if x.shape[1] == 1 and self.in_slices > 1:
            # A multi-slice encoder sees one image as a stack of identical slices.
            x = x.expand(-1, self.in_slices, -1, -1)
        return self.encoder(x)


class PerceptualLoss(nn.Module):
    """Feature-space MSE, L_VGG of Yang et al. (TMI 2018): ||phi(a) - phi(b)||_F^2 / (w h d), batch mean.

    With an extractor that returns several feature maps (Ataei, Alirezaie and Babyn,
    "Cascaded Convolutional Neural Networks with Perceptual Loss for Low Dose CT Denoising",
    eq. 3) the loss is the sum over them of that normalised distance.
    """

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) generator output and target -> scalar loss; gradients reach ``output`` only."""
        features_out = self.extractor(output)
        # The target is a constant of the loss: no graph to keep for it.
        with torch.no_grad():
            features_target = self.extractor(target)
        if isinstance(features_out, torch.Tensor):
            features_out, features_target = [features_out], [features_target]
        # The mean over all B * d * h * w elements equals the per-image ||.||_F^2 / (w h d)
        # averaged over the batch.
        return sum(F.mse_loss(a, b) for a, b in zip(features_out, features_target))


def _ct_extractor(ct_weights: Path | str | None) -> CtFeatures:
    from ldct_cli.bundled import bundled_checkpoint, weights_dir
    from ldct_cli.checkpoint import load_checkpoint, read_checkpoint_info

    if ct_weights is None:
        path = bundled_checkpoint("ct_features")  # sha256 checked against the manifest
        if path is None:
            raise PerceptualWeightsError(f"{weights_dir()}: no bundled CT feature weights; "
                                         "`ldct train --model ct_features` makes them (then --set ct_weights=FILE)")
    else:
        path = Path(ct_weights)
        if not path.exists():
            raise PerceptualWeightsError(f"{path}: no such CT feature checkpoint "
                                         "(`ldct train --model ct_features` makes one)")
    # Header first: a wrong model is refused before its (maybe large) network is built.
    info = read_checkpoint_info(path)
    if info.model != "ct_features":
        raise PerceptualWeightsError(f"{info.path}: holds a {info.model!r} model, not the "
                                     "'ct_features' autoencoder that --perceptual ct needs")
    model, _ = load_checkpoint(path)
    if not isinstance(model, CtAutoencoder):
        raise PerceptualWeightsError(f"{info.path}: 'ct_features' did not build a CtAutoencoder "
                                     f"(got {type(model).__name__})")
    extractor = CtFeatures(model)
    extractor.source = {"kind": "ct", "file": str(info.path), "tensors_sha256": info.tensors_sha256}
    return extractor


def perceptual_extractor(kind: str, *, vgg_weights: Path | str | None = None,
                         ct_weights: Path | str | None = None,
                         layer: str | None = None) -> nn.Module:
    """A frozen feature extractor: ImageNet VGG (Yang et al., TMI 2018) or CT autoencoder (Li et al., TMI 2020).

    The extractor's ``source`` attribute says which file it came from (recorded in checkpoints).
    ``layer`` names a VGG conv (``convX_Y``; default the last one); it does not apply to ``ct``.
    """
    if kind not in PERCEPTUAL_KINDS:
        raise UsageError(f"unknown perceptual network {kind!r}; choose one of {', '.join(PERCEPTUAL_KINDS)}")
    if kind == "ct":
        if layer is not None:
            raise UsageError("a layer applies only to the VGG perceptual networks, not to 'ct'")
        return _ct_extractor(ct_weights)
    extractor = VggFeatures(kind, layer=layer)
    path = find_vgg_weights(kind, vgg_weights)
    extractor.load_state_dict(load_vgg_weights(kind, path, layer=extractor.layer), strict=True)
    # What a checkpoint records of the network that shaped its loss.
    extractor.source = {"kind": kind, "file": str(path), "layer": extractor.layer}
    return extractor
