"""One optimisation step per recipe: supervised, WGAN-GP, pix2pix, autoencoder, cascade.

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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


STEPS = {
    "supervised": supervised_step,
    "wgan_gp": wgan_gp_step,
    "pix2pix": pix2pix_step,
    "autoencoder": autoencoder_step,
    "cascade": cascade_step,
}
