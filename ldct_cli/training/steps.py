"""The training recipes: one registry (``RECIPES``) of what each recipe needs, and its step.

A ``Recipe`` states once everything the loop and the config resolver need to know about a
way of training: its step function, the adversary it trains beside the generator, how many
batches one generator update consumes, how its networks are initialized, what validation
scores, and which configs it accepts. Adding a recipe is one step function and one entry.

Each step takes a bundle of batches in model units, ``low`` (n, B, k, P, P) and
``full`` (n, B, 1, P, P), updates the networks in ``Parts`` and returns its losses as
floats. The generator may run under autocast (bf16/fp16 on CUDA); critics and
discriminators always run in fp32: they are small next to the generator and the
perceptual network, and the gradient penalty's double backward is the part of a GAN
most sensitive to rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ldct_cli.training.config import TrainConfig


@dataclass
class Parts:
    """The networks and optimizers of a run (``generator`` may be DDP-wrapped)."""

    generator: nn.Module
    opt_g: torch.optim.Optimizer
    critic: nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    perceptual: nn.Module | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    world_size: int = 1
    step: int = 0  # the step being taken (set by the loop; the cascade's stage follows from it)
    # The loss unit in model units (config.loss.units): 1, or the HU per model unit.
    loss_unit: float = 1.0


def average_gradients(module: nn.Module, world_size: int) -> None:
    """All-reduce a critic's gradients across ranks (mean).

    The critics are not wrapped in DistributedDataParallel: the gradient penalty's
    ``autograd.grad(create_graph=True)`` and several critic forwards per backward are
    what DDP's reducer does not support, so their gradients are averaged here, in one
    flat buffer, after each backward.
    """
    if world_size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def pixel_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(output, target)
    if kind == "l1":
        return F.l1_loss(output, target)
    raise ValueError(kind)


def content_loss(parts: Parts, config: TrainConfig, output: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted pixel and perceptual terms of the generator's loss."""
    loss_cfg = config.loss
    total = output.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    if loss_cfg.pixel != "none" and loss_cfg.pixel_weight > 0:
        # MSE scales with the square of the unit, L1 with the unit.
        unit = parts.loss_unit ** (2 if loss_cfg.pixel == "mse" else 1)
        terms[loss_cfg.pixel] = unit * pixel_loss(output.float(), target, loss_cfg.pixel)
        total = total + loss_cfg.pixel_weight * terms[loss_cfg.pixel]
    if parts.perceptual is not None and loss_cfg.perceptual_weight > 0:
        terms["perceptual"] = parts.perceptual(output, target).float()
        total = total + loss_cfg.perceptual_weight * terms["perceptual"]
    return total, terms


def _update_generator(parts: Parts, loss: torch.Tensor) -> None:
    parts.opt_g.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.opt_g)
    parts.scaler.update()


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in values.items()}


def supervised_step(parts: Parts, config: TrainConfig, low: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    """Pixel and/or perceptual loss, no adversary (RED-CNN; the CNN-MSE and CNN-VGG variants)."""
    with parts.autocast():
        output = parts.generator(low[0])
        loss, terms = content_loss(parts, config, output, full[0])
    _update_generator(parts, loss)
    return {"loss": float(loss.detach()), **_floats(terms)}


def autoencoder_step(parts: Parts, config: TrainConfig, low: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    """Reconstruct full-dose patches (the self-supervised CT feature extractor)."""
    target = full[0]
    with parts.autocast():
        output = parts.generator(target)
        loss = config.loss.pixel_weight * pixel_loss(output.float(), target, config.loss.pixel)
    _update_generator(parts, loss)
    return {"loss": float(loss.detach())}


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's (||grad D(x_hat)||_2 - 1)^2 at random points between real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def wgan_gp_step(parts: Parts, config: TrainConfig, low: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    """n_critic critic updates, each on its own batch, then one generator update
    (Yang et al. 2018, Algorithm 1; Gulrajani et al. 2017)."""
    critic, n_critic = parts.critic, config.loss.n_critic
    for i in range(n_critic):
        with torch.no_grad(), parts.autocast():
            fake = parts.generator(low[i])
        fake = fake.float()
        real = full[i]
        score_real, score_fake = critic(real).mean(), critic(fake).mean()
        penalty = gradient_penalty(critic, real, fake)
        loss_d = score_fake - score_real + config.loss.gradient_penalty * penalty
        parts.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        average_gradients(critic, parts.world_size)
        parts.opt_d.step()
    critic.requires_grad_(False)  # the generator's update needs no critic gradients
    try:
        with parts.autocast():
            output = parts.generator(low[n_critic])
            content, terms = content_loss(parts, config, output, full[n_critic])
        # The critic is 1-Lipschitz in model units (its gradient penalty); times the unit it is
        # 1-Lipschitz in that unit.
        adversarial = -parts.loss_unit * critic(output.float()).mean()
        loss_g = config.loss.adversarial_weight * adversarial + content
        _update_generator(parts, loss_g)
    finally:
        critic.requires_grad_(True)
    return {"loss": float(loss_g.detach()), "critic": float(loss_d.detach()),
            "wasserstein": float((score_real - score_fake).detach()),
            "gp": float(penalty.detach()), "adversarial": float(adversarial.detach()), **_floats(terms)}


def pix2pix_step(parts: Parts, config: TrainConfig, low: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    """One discriminator and one generator update: cGAN loss + lambda_L1 * L1 (Isola et al. 2017)."""
    critic = parts.critic
    condition, real = low[0], full[0]
    with parts.autocast():
        fake = parts.generator(condition)
    fake32 = fake.float()
    logits_real = critic(torch.cat([condition, real], 1))
    logits_fake = critic(torch.cat([condition, fake32.detach()], 1))
    # Halved, as in the paper, so D learns at half the rate of G.
    loss_d = 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                    + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))
    parts.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    average_gradients(critic, parts.world_size)
    parts.opt_d.step()
    critic.requires_grad_(False)
    try:
        logits = critic(torch.cat([condition, fake32], 1))
        adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        with parts.autocast():
            content, terms = content_loss(parts, config, fake, real)
        loss_g = config.loss.adversarial_weight * adversarial + content
        _update_generator(parts, loss_g)
    finally:
        critic.requires_grad_(True)
    return {"loss": float(loss_g.detach()), "discriminator": float(loss_d.detach()),
            "adversarial": float(adversarial.detach()), **_floats(terms)}


def cascade_stage(step: int, stage_steps: tuple[int, ...]) -> int:
    """The stage (0 = DRL, k = the k-th difference network) that ``step`` belongs to."""
    ends = 0
    for stage, steps in enumerate(stage_steps):
        ends += steps
        if step < ends:
            return stage
    return len(stage_steps) - 1


def cascade_step(parts: Parts, config: TrainConfig, low: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    """The cascade of Ataei, Alirezaie and Babyn, "Cascaded Convolutional Neural Networks
    with Perceptual Loss for Low Dose CT Denoising", one level at a time: the DRL network on
    the configured loss (perceptual + pixel), then each difference network on MSE to ``previous - full``,
    the levels before it frozen; inference subtracts each predicted difference."""
    net = parts.generator
    stage = cascade_stage(parts.step, config.schedule.stage_steps)
    net.trained_levels.fill_(stage + 1)
    if stage == 0:
        with parts.autocast():
            output = net.drl(low[0])
            loss, terms = content_loss(parts, config, output, full[0])
    else:
        done = [net.drl, *net.diffs[:stage - 1]]
        for module in done:
            module.eval()  # frozen: BatchNorm uses its statistics, as at inference
        try:
            with torch.no_grad(), parts.autocast():
                previous = net.level_output(low[0], stage).float()
        finally:
            for module in done:
                module.train()
        with parts.autocast():
            difference = net.diffs[stage - 1](previous)
        terms = {"mse": F.mse_loss(difference.float(), previous - full[0])}
        loss = terms["mse"]
    _update_generator(parts, loss)
    return {"loss": float(loss.detach()), "stage": float(stage + 1), **_floats(terms)}


# ---------------------------------------------------------------- the registry

StepFn = Callable[[Parts, "TrainConfig", torch.Tensor, torch.Tensor], dict[str, float]]


def _no_config_problem(config: TrainConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Recipe:
    """One way of training a registered model (``ModelInfo.recipe`` names it)."""

    name: str
    step: StepFn
    # The adversary trained beside the generator (built on the CPU; None: no adversary).
    critic: Callable[[TrainConfig], nn.Module] | None = None
    # Batches of patches one generator update consumes (WGAN-GP's critic draws its own).
    batches_per_step: Callable[[TrainConfig], int] = lambda config: 1
    # Applied to a freshly built generator before any warm start (the paper's init).
    init_generator: Callable[[nn.Module], None] | None = None
    # What the trained network is asked to do: "denoise" (validated on low -> full dose,
    # against the input's own scores) or "reconstruct" (full -> full dose: a feature extractor).
    objective: str = "denoise"
    # The kind of registered model (``ModelInfo.kind``) that trains with it.
    model_kind: str = "generator"
    # True: only the models registered with this recipe train with it, and they with no other.
    exclusive: bool = False
    # False: one process only (no torchrun / DDP).
    distributed: bool = True
    # A problem with a config for this recipe, as a sentence (None: fine).
    config_problem: Callable[[TrainConfig], str | None] = _no_config_problem
    # A problem with the built generator for this config (None: fine).
    network_problem: Callable[[nn.Module, TrainConfig], str | None] = lambda generator, config: None


def _wgan_critic(config: TrainConfig) -> nn.Module:
    from ldct_cli.training.critics import SimpleCnnCritic, WganCritic

    if config.loss.critic == "simple_cnn":
        return SimpleCnnCritic(in_channels=1)
    return WganCritic(in_channels=1, patch_size=config.data.patch_size)


def _patchgan(config: TrainConfig) -> nn.Module:
    from ldct_cli.training.critics import PatchGanDiscriminator, init_pix2pix_weights

    critic = PatchGanDiscriminator(in_channels=config.context_slices + 1)
    critic.apply(init_pix2pix_weights)
    return critic


def _pix2pix_init(generator: nn.Module) -> None:
    from ldct_cli.training.critics import init_pix2pix_weights

    generator.apply(init_pix2pix_weights)


def _supervised_problem(config: TrainConfig) -> str | None:
    loss = config.loss
    if not ((loss.pixel != "none" and loss.pixel_weight > 0)
            or (loss.perceptual != "none" and loss.perceptual_weight > 0)):
        return "recipe supervised needs a pixel or a perceptual loss term"
    return None


def _wgan_problem(config: TrainConfig) -> str | None:
    if config.loss.adversarial_weight <= 0:
        return ("recipe wgan_gp needs loss.adversarial_weight > 0 (without it use recipe supervised: "
                "the CNN-MSE / CNN-VGG variants)")
    return None


def _pix2pix_problem(config: TrainConfig) -> str | None:
    if config.loss.units == "hu":
        return ("loss.units 'hu' is for a pixel loss weighed against a WGAN critic; pix2pix's cGAN loss "
                "has no intensity unit, so it would only scale the L1 term (change loss.pixel_weight instead)")
    return None


def _cascade_network_problem(generator: nn.Module, config: TrainConfig) -> str | None:
    levels = int(generator.levels)
    if len(config.schedule.stage_steps) != levels:
        return (f"schedule.stage_steps has {len(config.schedule.stage_steps)} stage(s); a "
                f"{levels}-level cascade needs {levels} (DRL, then each difference network)")
    return None


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("supervised", supervised_step, config_problem=_supervised_problem),
    Recipe("wgan_gp", wgan_gp_step, critic=_wgan_critic,
           batches_per_step=lambda config: config.loss.n_critic + 1, config_problem=_wgan_problem),
    Recipe("pix2pix", pix2pix_step, critic=_patchgan, init_generator=_pix2pix_init,
           config_problem=_pix2pix_problem),
    Recipe("autoencoder", autoencoder_step, objective="reconstruct", model_kind="features"),
    # Each stage trains a different part of the network, which DDP's reducer cannot follow.
    Recipe("cascade", cascade_step, exclusive=True, distributed=False,
           network_problem=_cascade_network_problem),
)}
