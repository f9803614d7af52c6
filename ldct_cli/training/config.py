"""Training configuration: frozen dataclasses, one resolver (defaults < recipe < file < flags).

Every registered model has a recipe file ``recipes/<model>.toml`` with the numbers of
its paper; a user's ``--config`` (TOML or the ``config.json`` of an earlier run, or the
name of a bundled preset such as ``wgan_mse``) overrides it, and command-line flags
override both. An unknown key is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ldct_cli.errors import UsageError
from ldct_cli.models.registry import get_model_info, list_models
from ldct_cli.precision import PRECISIONS as RUN_PRECISIONS

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
PIXEL_LOSSES = ("mse", "l1", "none")
CRITICS = ("wgan", "simple_cnn")
# The perceptual feature networks (ldct_cli.training.perceptual); "auto" picks one of them.
PERCEPTUAL_KINDS = ("vgg19", "vgg16", "ct")
PERCEPTUAL = ("none", "auto", *PERCEPTUAL_KINDS)
LOSS_UNITS = ("model", "hu")
TARGETS = ("full", "noisier2noise")  # data.target (ldct_cli.training.data)
PRECISIONS = ("auto", *RUN_PRECISIONS)


@dataclass(frozen=True)
class DataConfig:
    """Where patches come from and how they are drawn (``ldct_cli.training.data``)."""

    path: str = ""
    patch_size: int = 64
    batch_size: int = 16
    augment: bool = True  # random flips and 90-degree rotations
    body_threshold_hu: float = -500.0
    min_body_fraction: float = 0.5
    workers: int = 2  # DataLoader worker processes; 0 samples in the training process
    # Which of a multi-dose dataset's low-dose files (manifest "low_doses" order, 0 the primary)
    # training draws from; () draws from all. Validation always uses the primary.
    dose_files: tuple[int, ...] = ()
    # What the network learns to output: "full", the full-dose slice; "noisier2noise" (a
    # dataset simulated from the full dose only), the full dose less its expected noise given
    # the input, so the network removes the full dose's own noise too (training/data.py).
    target: str = "full"


@dataclass(frozen=True)
class LossConfig:
    """The generator's loss terms; a recipe's variants switch terms on and off."""

    pixel: str = "mse"  # "mse", "l1" or "none"
    pixel_weight: float = 1.0
    perceptual: str = "none"  # "auto": vgg19 when a VGG file is given, else the CT features
    perceptual_weight: float = 0.0
    perceptual_layer: str = ""  # "" = the extractor's default (VGG: conv5_4 / conv5_3); "a,b": several
    perceptual_vgg: str = "vgg19"  # the ImageNet VGG that "auto" takes when a VGG file is given
    adversarial_weight: float = 0.0
    gradient_penalty: float = 10.0  # WGAN-GP's lambda
    n_critic: int = 4  # critic updates per generator update (WGAN-GP)
    # WGAN-GP's critic: "wgan" (Yang et al.) or "simple_cnn" (Ryu, "LDCT Denoising With
    # REDCNN & WGAN-GP")
    critic: str = "wgan"
    # The unit the generator's pixel and WGAN terms (and their logged values) are measured
    # in: "model", the network's normalized intensities, or "hu" (1 unit = 1 HU: MSE in HU²,
    # L1 in HU, the critic's score as a 1-Lipschitz function of HU). A squared error and a
    # 1-Lipschitz critic scale differently with the unit (by u² and u), so weights that
    # balance them, like the 0.95 / 0.05 of Ryu, "LDCT Denoising With REDCNN & WGAN-GP",
    # mean something only with their unit.
    units: str = "model"


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam; the learning rate decays exponentially from ``lr`` to ``lr_final`` over
    ``decay_steps`` and stays there (a schedule of the step alone, so resuming and a
    different ``--max-steps`` cannot change it)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_final: float = 0.0  # 0: no decay
    decay_steps: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """How long to train and how often to validate, log and save."""

    max_steps: int = 100_000
    max_minutes: float = 0.0  # 0: no time limit
    val_every: int = 500
    val_slices: int = 4  # full held-out slices scored at each validation
    checkpoint_every: int = 500
    # Also keep the exported generator of every Nth step as steps/step_NNNNNN.safetensors
    # (0: off), so a checkpoint can be chosen afterwards on data the run never saw.
    keep_every: int = 0
    log_every: int = 10
    # Counted in validations without a new best PSNR (0: off). Reduce-on-plateau multiplies
    # both learning rates by plateau_factor after more than plateau_patience of them
    # (torch's ReduceLROnPlateau); early stopping ends the run after early_stop_patience.
    plateau_patience: int = 0
    plateau_factor: float = 0.5
    early_stop_patience: int = 0
    # Recipe cascade: steps of each level's stage, in order (DRL, then each difference
    # network); the last stage also runs any steps past their sum, up to max_steps.
    stage_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved with the run and in its checkpoints."""

    model: str
    recipe: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()  # the generator's
    critic_optimizer: OptimizerConfig = OptimizerConfig()  # the critic's / discriminator's
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # autocast on CUDA: bf16 when supported; CPU always fp32
    window: str = "redcnn"  # PSNR/SSIM window: ldct evaluate's default preset, [-160, 240] HU
    vgg_weights: str = ""  # a torchvision-layout VGG file (or $LDCT_VGG_WEIGHTS)
    ct_weights: str = ""  # "" = the bundled weights/ct_features.safetensors
    init: str = ""  # warm start: a checkpoint of the same model whose weights the run starts from
    # > 0: validation and the best/last checkpoints use an exponential moving average of the
    # generator's weights, updated after every step with this decay (0.999: about the last
    # 1000 steps); state.pt keeps the raw weights as well, to resume.
    ema_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @property
    def context_slices(self) -> int:
        return int(self.model_kwargs.get("in_slices", 1))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def presets() -> list[str]:
    """Bundled config files: one per model (its paper's recipe) plus named variants."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def read_config_file(path_or_preset: Path | str) -> dict[str, Any]:
    """A TOML or JSON config file, or a bundled preset by name, as a nested dict."""
    path = Path(path_or_preset)
    if not path.is_file():
        preset = RECIPES_DIR / f"{path_or_preset}.toml"
        if preset.is_file() and os.sep not in str(path_or_preset):
            path = preset
        else:
            raise UsageError(f"--config {path_or_preset}: no such file, and not a bundled preset "
                             f"({', '.join(presets())})")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UsageError(f"{path}: cannot read config ({exc})") from None


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "model_kwargs":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value, hint, where: str):
    """Check (and gently convert: int -> float, list -> tuple) one value against its type."""
    origin = get_origin(hint)
    if origin is tuple and get_args(hint)[1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config {where}: expected a list, got {value!r}")
        return tuple(_coerce(v, get_args(hint)[0], where) for v in value)
    if origin is tuple:
        items = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise UsageError(f"config {where}: expected {len(items)} numbers, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, items))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config {where}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config {where}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config {where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UsageError(f"config {where}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise UsageError(f"config {where}: expected text, got {value!r}")
        return value
    return value


def _build(cls, values: dict, where: str = ""):
    """A (nested) frozen dataclass from a dict; unknown keys are errors."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        place = f"[{where}]" if where else "the top level"
        raise UsageError(f"config: unknown key(s) {', '.join(unknown)} in {place} "
                         f"(known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise UsageError(f"config {key}: expected a table")
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def resolve_config(*, model: str | None, config_file: Path | str | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < the model's recipe file < ``config_file`` < ``overrides`` (dotted keys).

    ``overrides`` come from command-line flags: ``{"schedule.max_steps": 200, "seed": 1}``.
    """
    user = read_config_file(config_file) if config_file is not None else {}
    file_model = user.get("model")
    if model and file_model and file_model != model:
        raise UsageError(f"--config {config_file} is for model {file_model!r}, not --model {model!r}")
    name = model or file_model
    if not name:
        raise UsageError("name the model to train: --model NAME (or `model = ...` in --config)")
    info = get_model_info(name)
    recipe_file = RECIPES_DIR / f"{info.preset}.toml"
    tree: dict[str, Any] = {"model": name, "recipe": info.recipe}
    if recipe_file.is_file():
        tree = _merge(tree, tomllib.loads(recipe_file.read_text()))
    tree = _merge(tree, user)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    config = _build(TrainConfig, tree)
    return validate(config)


def _models_of(recipe: str) -> list[str]:
    return [name for name in list_models(None) if get_model_info(name).recipe == recipe]


def validate(config: TrainConfig) -> TrainConfig:
    """Check the values' ranges and combinations; resolve ``perceptual = "auto"``."""
    def bad(message: str):
        raise UsageError(f"config: {message}")

    info = get_model_info(config.model)
    if info.kind == "classical":
        bad(f"model {config.model!r} is a classical filter: there is nothing to train "
            "(use it with ldct denoise / ldct evaluate --model)")
    from ldct_cli.training.steps import RECIPES  # torch: only when a run is configured

    recipe = RECIPES.get(config.recipe)
    if recipe is None:
        bad(f"recipe {config.recipe!r} is not one of {', '.join(RECIPES)}")
    if info.kind != recipe.model_kind:
        bad(f"model {config.model!r} ({info.kind}) cannot train with recipe {config.recipe!r}")
    loss, data, sched = config.loss, config.data, config.schedule
    if loss.pixel not in PIXEL_LOSSES:
        bad(f"loss.pixel {loss.pixel!r} is not one of {', '.join(PIXEL_LOSSES)}")
    if loss.units not in LOSS_UNITS:
        bad(f"loss.units {loss.units!r} is not one of {', '.join(LOSS_UNITS)}")
    if loss.perceptual not in PERCEPTUAL:
        bad(f"loss.perceptual {loss.perceptual!r} is not one of {', '.join(PERCEPTUAL)}")
    if config.precision not in PRECISIONS:
        bad(f"precision {config.precision!r} is not one of {', '.join(PRECISIONS)}")
    if data.patch_size < 8 or data.batch_size < 1 or data.workers < 0:
        bad("data.patch_size >= 8, data.batch_size >= 1 and data.workers >= 0")
    if data.target not in TARGETS:
        bad(f"data.target {data.target!r} is not one of {', '.join(TARGETS)}")
    if any(i < 0 for i in data.dose_files) or len(set(data.dose_files)) != len(data.dose_files):
        bad(f"data.dose_files {list(data.dose_files)}: distinct indices, 0 or more")
    if sched.max_steps < 1 or sched.val_every < 1 or sched.checkpoint_every < 1 or sched.log_every < 1:
        bad("schedule.max_steps, val_every, checkpoint_every and log_every must be at least 1")
    if sched.max_minutes < 0 or sched.val_slices < 1 or sched.keep_every < 0:
        bad("schedule.max_minutes >= 0, schedule.val_slices >= 1 and schedule.keep_every >= 0")
    if loss.n_critic < 1:
        bad("loss.n_critic must be at least 1")
    if loss.critic not in CRITICS:
        bad(f"loss.critic {loss.critic!r} is not one of {', '.join(CRITICS)}")
    if sched.plateau_patience < 0 or sched.early_stop_patience < 0 or not 0 < sched.plateau_factor < 1:
        bad("schedule.plateau_patience and early_stop_patience >= 0, 0 < plateau_factor < 1")
    from ldct_cli.metrics import get_window

    try:
        get_window(config.window)
    except ValueError as exc:
        bad(f"window: {exc}")
    if not 0.0 <= config.ema_decay < 1.0:
        bad(f"ema_decay {config.ema_decay:g}: 0 (off) or a decay in (0, 1), e.g. 0.999")
    for opt in (config.optimizer, config.critic_optimizer):
        if opt.lr <= 0 or opt.lr_final < 0 or opt.decay_steps < 0:
            bad("optimizer lr > 0, lr_final >= 0, decay_steps >= 0")
    if loss.perceptual_vgg not in ("vgg19", "vgg16"):
        bad(f"loss.perceptual_vgg {loss.perceptual_vgg!r} is not one of vgg19, vgg16")
    if any(n < 1 for n in sched.stage_steps):
        bad("schedule.stage_steps: each stage needs at least 1 step")
    if (recipe.exclusive or RECIPES[info.recipe].exclusive) and config.recipe != info.recipe:
        bad(f"model {config.model!r} cannot train with recipe {config.recipe!r}"
            + (f" (the {config.recipe} recipe is for the {' and '.join(_models_of(config.recipe))} model)"
               if recipe.exclusive else ""))
    problem = recipe.config_problem(config)
    if problem:
        bad(problem)
    if loss.perceptual == "auto":
        vgg = config.vgg_weights or os.environ.get("LDCT_VGG_WEIGHTS", "")
        # Layers name VGG convolutions; the CT feature extractor has one output.
        resolved = (replace(loss, perceptual=loss.perceptual_vgg) if vgg
                    else replace(loss, perceptual="ct", perceptual_layer=""))
        config = replace(config, loss=resolved, vgg_weights=vgg)
    elif loss.perceptual == "ct" and loss.perceptual_layer:
        # Layers name VGG convolutions (a recipe's list, e.g. the cascade's); the CT
        # extractor has one output, so --perceptual ct uses it whatever the recipe lists.
        config = replace(config, loss=replace(loss, perceptual_layer=""))
    elif loss.perceptual in ("vgg19", "vgg16") and not config.vgg_weights:
        config = replace(config, vgg_weights=os.environ.get("LDCT_VGG_WEIGHTS", ""))
    return config


# What a resumed run may change: how long it goes on and where it runs, never what it learns.
RESUMABLE_KEYS = ("schedule.max_steps", "schedule.max_minutes", "device", "data.workers")


def changed_on_resume(config_file: Path, given: dict[str, Any]) -> list[str]:
    """The dotted keys of ``given`` that a resumed run may not change and that differ from its
    saved ``config.json`` (repeating a saved value is fine)."""
    return sorted(key for key in set(given) - set(RESUMABLE_KEYS)
                  if not _same_as_saved(config_file, key, given[key]))


def _same_as_saved(config_file: Path, key: str, value) -> bool:
    try:
        saved = json.loads(Path(config_file).read_text())
        for part in key.split("."):
            saved = saved[part]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if key == "data.path":
        return Path(str(saved)).resolve() == Path(str(value)).resolve()
    return saved == value or str(saved) == str(value)
