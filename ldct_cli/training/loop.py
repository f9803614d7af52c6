"""The training loop: one function for every recipe, resumable, validated, DDP-aware.

A run folder holds ``config.json`` (the resolved config), ``state.pt`` (everything needed
to continue: networks, optimizers, RNG states, step, best score), ``last.safetensors``
and ``best.safetensors`` (generators that ``ldct denoise --weights`` loads as they are),
``metrics.jsonl`` (one record per log, validation) and ``curves.png``; with
``schedule.keep_every`` N, ``steps/step_NNNNNN.safetensors`` every N steps as well.

Exact resume: the patches of step ``s`` are a pure function of (seed, rank, s) (see
``data.PatchSampler``), the learning rate a function of ``s`` alone, and the torch RNG
states (dropout, the gradient penalty's mixing weights) are saved and restored; so on the
CPU an interrupted-and-resumed run reproduces an uninterrupted one's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ldct_cli.checkpoint import save_checkpoint, tensors_sha256
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.fsutil import atomic_path
from ldct_cli.metrics import get_window, psnr, rmse_hu, ssim
from ldct_cli.models.layout import to_channels_last
from ldct_cli.models.registry import create_model, get_model_info
from ldct_cli.training.config import OptimizerConfig, TrainConfig
from ldct_cli.training.steps import RECIPES, Parts, Recipe

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
LOG_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
BEST = "best.safetensors"
LAST = "last.safetensors"
STEPS_DIR = "steps"


class TrainProgress(Protocol):
    """What the loop reports (rank 0 only); the CLI draws it, tests may record it."""

    def started(self, *, start_step: int, max_steps: int, info: dict[str, Any]) -> None: ...
    def stepped(self, step: int, losses: dict[str, float], patches_per_s: float) -> None: ...
    def validated(self, step: int, metrics: dict[str, float], *, best: bool) -> None: ...


@dataclass
class TrainResult:
    """How a run ended and what it reached."""

    run_dir: Path
    start_step: int
    step: int  # generator updates done, in all sessions of this run
    stopped: str  # "max_steps", "max_minutes" or "interrupted"
    input_metrics: dict[str, float]  # the low-dose input itself, scored like the outputs
    best: dict[str, Any] | None
    last_val: dict[str, Any] | None
    patches_per_s: float  # this session, all ranks
    data_wait_fraction: float  # of this session's time after its first batch spent waiting for patches
    seconds: float
    world_size: int
    generator_sha256: str
    rank: int = 0
    stop_signal: int | None = None  # the signal behind "interrupted" (SIGINT, SIGTERM)
    losses: list[dict[str, float]] = field(default_factory=list)

    def summary(self, config: TrainConfig) -> dict[str, Any]:
        """What ``ldct train --json`` prints."""
        return {"run": str(self.run_dir), "model": config.model, "recipe": config.recipe,
                "steps": self.step, "stopped": self.stopped, "seconds": round(self.seconds, 1),
                "patches_per_s": round(self.patches_per_s, 2),
                "data_wait_fraction": round(self.data_wait_fraction, 4),
                "world_size": self.world_size, "input": self.input_metrics, "best": self.best,
                "last": self.last_val}


def lr_at(opt: OptimizerConfig, step: int) -> float:
    """Exponential decay from ``lr`` to ``lr_final`` over ``decay_steps``, then flat."""
    if opt.lr_final <= 0 or opt.decay_steps <= 0:
        return opt.lr
    t = min(step, opt.decay_steps) / opt.decay_steps
    return opt.lr * (opt.lr_final / opt.lr) ** t


def _set_lr(optimizer: torch.optim.Optimizer | None, opt: OptimizerConfig, step: int,
            scale: float = 1.0) -> float:
    lr = lr_at(opt, step) * scale
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    return lr


@dataclass
class Plateau:
    """Reduce-on-plateau and early stopping, counted in validations without a new best PSNR
    (Ryu, "LDCT Denoising With REDCNN & WGAN-GP": factor 0.5, patience 4;
    early stopping, patience 6)."""

    lr_scale: float = 1.0
    since_reduce: int = 0
    since_best: int = 0

    def after_validation(self, improved: bool, schedule) -> tuple[bool, bool]:
        """Count one validation; returns (reduce the learning rates now, stop now)."""
        if improved:
            self.since_best = self.since_reduce = 0
            return False, False
        self.since_best += 1
        self.since_reduce += 1
        reduce = 0 < schedule.plateau_patience < self.since_reduce  # as torch's ReduceLROnPlateau
        if reduce:
            self.since_reduce = 0
        stop = 0 < schedule.early_stop_patience <= self.since_best
        return reduce, stop


# ---------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (or none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(rank, world, local, False)
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank, world, local, True)


def _device(config: TrainConfig, dist_info: Dist) -> torch.device:
    from ldct_cli.inference import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    return device


def _any_rank(flag: bool, dist_info: Dist) -> bool:
    """True on every rank when it is true on one (all ranks stop together)."""
    if dist_info.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier(dist_info: Dist) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------- signals

class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to save and stop after the current step; a second
    Ctrl-C stops at once (without saving)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the signal that asked, for the exit code (128 + it)
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------- building

def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(config: TrainConfig, device: torch.device):
    from ldct_cli.inference import effective_precision

    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    precision = effective_precision(precision, device)
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def _perceptual(config: TrainConfig, device: torch.device):
    if config.loss.perceptual == "none" or config.loss.perceptual_weight <= 0:
        return None
    from ldct_cli.training.perceptual import PerceptualLoss, perceptual_extractor

    extractor = perceptual_extractor(config.loss.perceptual, vgg_weights=config.vgg_weights or None,
                                     ct_weights=config.ct_weights or None,
                                     layer=config.loss.perceptual_layer or None)
    return PerceptualLoss(extractor).to(device)


def _adam(params, opt: OptimizerConfig) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def _warm_start(generator: torch.nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Load ``config.init``'s weights into the fresh generator: the same network (the same model,
    or another registered on the same class) and kwargs, or, for a model that can
    ``inflate_from`` (CPCA, Shan et al., "Transfer Learning for Low-Dose CT Denoising"),
    a 2D checkpoint into its 2.5D form."""
    from ldct_cli.checkpoint import load_checkpoint

    source, info = load_checkpoint(config.init)  # checksum verified; builds what the file describes
    wanted = dict(generator.ldct_kwargs)
    inflate = (info.model == config.model and hasattr(generator, "inflate_from")
               and info.model_kwargs.get("in_slices") == 1 and wanted.get("in_slices", 1) > 1
               and {**info.model_kwargs, "in_slices": wanted["in_slices"]} == wanted)
    # redcnn_wgan is the RED-CNN network under another recipe: a redcnn checkpoint starts it.
    same_network = (info.model == config.model or get_model_info(info.model).target
                    == get_model_info(config.model).target)
    if not inflate and (not same_network or info.model_kwargs != wanted):
        raise UsageError(f"{info.path}: --init needs a checkpoint of {config.model} {wanted}, "
                         f"this one is {info.model} {info.model_kwargs}")
    if info.hu_norm != generator.hu_norm:
        raise UsageError(f"{info.path}: --init checkpoint uses another HU normalization than {config.model}")
    if inflate:
        generator.inflate_from(source)  # 3D filters: the 2D one at the centre slice, zeros beside
    else:
        generator.load_state_dict(source.state_dict())
    return {"file": str(info.path), "tensors_sha256": info.tensors_sha256,
            "step": info.training.get("step"), "recipe": info.training.get("recipe"),
            "inflated_from_2d": inflate}


def _check_network(generator: torch.nn.Module, config: TrainConfig, recipe: Recipe,
                   dist_info: Dist) -> None:
    """What the config asks of this network (its patch-size multiple, the recipe's needs)."""
    multiple = generator.size_multiple
    if config.data.patch_size % multiple:
        raise UsageError(f"data.patch_size {config.data.patch_size} must be a multiple of "
                         f"{multiple} for model {config.model!r}")
    problem = recipe.network_problem(generator, config)
    if problem:
        raise UsageError(problem)
    if dist_info.world_size > 1 and not recipe.distributed:
        raise UsageError(f"recipe {recipe.name} trains in one process (no torchrun / DDP)")


# ---------------------------------------------------------------- validation

def _validate(generator: torch.nn.Module, slices, *, device: torch.device, precision: str,
              window) -> dict[str, float]:
    """PSNR/SSIM (in ``window``) and RMSE of the generator on full held-out slices."""
    from ldct_cli.inference import Denoiser

    # A copy: the Denoiser switches to eval mode and channels-last, which must not touch
    # the module being trained (its BatchNorm statistics, its DDP buckets).
    denoiser = Denoiser(copy.deepcopy(generator), generator.hu_norm, device, precision=precision,
                        batch_size=1)
    outputs = np.stack([denoiser(s.low_hu[None])[0] for s in slices])
    return _score(outputs, np.stack([s.full_hu for s in slices]), window)


def _score(test_hu: np.ndarray, ref_hu: np.ndarray, window) -> dict[str, float]:
    return {"psnr": float(np.mean(psnr(test_hu, ref_hu, window))),
            "ssim": float(np.mean(ssim(test_hu, ref_hu, window))),
            "rmse_hu": float(np.mean(rmse_hu(test_hu, ref_hu)))}


class WeightAverage:
    """An exponential moving average of a generator's weights (``config.ema_decay``).

    Its decay warms up as min(decay, (1 + step) / (10 + step)), so the average follows the
    first steps closely; buffers (BatchNorm statistics, a cascade's trained levels) are
    copied, not averaged. A pure function of the steps taken: resume stays exact.
    """

    def __init__(self, generator: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(generator).requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, param in zip(self.module.parameters(), generator.parameters()):
            average.lerp_(param.detach(), 1.0 - decay)
        for average, buffer in zip(self.module.buffers(), generator.buffers()):
            average.copy_(buffer)


# ---------------------------------------------------------------- log and curves

class RunFolder:
    """The run folder this process created or resumed, by identity, not only by path.

    A folder renamed while its run still writes (``mv runs/a runs/b`` and a new
    ``runs/a``, or a SIGTERM whose last save lands after the rename) would otherwise get
    the old run's checkpoint and log lines under the new run's name. Every write checks
    first that the path still names the same folder, and stops with an error if not.
    """

    def __init__(self, path: Path):
        self.path = path
        self._identity = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def check(self) -> None:
        if self._stat() != self._identity:
            raise LdctError(f"{self.path}: the run folder was moved, removed or replaced while "
                            "training; stopped without writing into it (if it was moved, the moved "
                            "folder holds this run's last save)")


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, appended and flushed as training goes."""

    def __init__(self, path: Path, folder: RunFolder | None = None):
        self.path = path
        self.folder = folder

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after the resumed checkpoint (they will be redone)."""
        kept = [r for r in self.records() if r["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        if self.folder is not None:
            self.folder.check()
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def write_curves(records: list[dict], path: Path, *, title: str) -> None:
    """Training losses and validation scores against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    base = next((r for r in records if r["kind"] == "input"), None)
    fig, (ax_loss, ax_psnr, ax_ssim) = plt.subplots(1, 3, figsize=(15, 4))
    keys = [k for k in (train[0] if train else {}) if k not in ("step", "kind", "lr", "patches_per_s", "time_s")]
    for key in keys:
        values = [r.get(key) for r in train]
        ax_loss.plot([r["step"] for r in train], values, label=key, lw=1)
    if keys and all(v > 0 for k in keys for v in (r.get(k, 1) for r in train)):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", title="training losses")
    if keys:
        ax_loss.legend(fontsize=8)
    for ax, key, label in ((ax_psnr, "psnr", "PSNR (dB)"), (ax_ssim, "ssim", "SSIM")):
        ax.plot([r["step"] for r in val], [r[key] for r in val], "o-", label="output")
        if base is not None:
            ax.axhline(base[key], color="gray", ls="--", label="low-dose input")
        ax.set(xlabel="step", title=f"validation {label}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------- the loop

def prepare_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool) -> None:
    """Create a new run folder (refusing a non-empty one) or check a resumed one."""
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise UsageError(f"{run_dir}: no {STATE_FILE} to resume from")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir}: exists and is not empty (continue it with --resume {run_dir}, "
                         "or choose another --out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


class _Run:
    """One session of a run folder: the networks built (or restored from ``state.pt``), one
    step at a time, validated and saved. ``train`` drives it."""

    def __init__(self, config: TrainConfig, run_dir: Path, dist_info: Dist, *, resume: bool):
        from ldct_cli.training.data import PatchSampler, SamplerSettings

        self.config, self.run_dir, self.dist, self.resume = config, run_dir, dist_info, resume
        self.recipe = RECIPES[config.recipe]
        self.device = _device(config, dist_info)
        self._build_networks()
        self.settings = SamplerSettings(
            patch_size=config.data.patch_size, batch_size=config.data.batch_size,
            context_slices=config.context_slices, batches_per_step=self.recipe.batches_per_step(config),
            body_threshold_hu=config.data.body_threshold_hu,
            min_body_fraction=config.data.min_body_fraction, augment=config.data.augment,
            dose_files=tuple(config.data.dose_files), target=config.data.target)
        # Checks the dataset against the settings before anything is written.
        PatchSampler(config.data.path, split="train", settings=self.settings, seed=config.seed,
                     rank=dist_info.rank, world_size=dist_info.world_size)
        self.window = get_window(config.window)
        self.val_slices, self.input_metrics = [], {}
        if dist_info.main:
            self._load_validation()
            prepare_run_dir(run_dir, config, resume=resume)
        _barrier(dist_info)
        self._to_device()
        torch.manual_seed(config.seed + 1000 * dist_info.rank + 1)
        self.precision, autocast = _autocast(config, self.device)
        self.opt_g = _adam(self.generator.parameters(), config.optimizer)
        self.opt_d = _adam(self.critic.parameters(), config.critic_optimizer) if self.critic is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.best, self.elapsed_before, self.plateau = 0, None, 0.0, Plateau()
        self.folder = RunFolder(run_dir) if dist_info.main else None
        self.log = MetricsLog(run_dir / LOG_FILE, self.folder)
        self.average = WeightAverage(self.generator, config.ema_decay) if config.ema_decay > 0 else None
        if resume:
            self._restore()
        elif dist_info.main and self.input_metrics:
            self.log.append({"step": 0, "kind": "input", **self.input_metrics})
        net = self.generator
        if dist_info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.parts = Parts(generator=net, opt_g=self.opt_g, critic=self.critic, opt_d=self.opt_d,
                           perceptual=self.perceptual, autocast=autocast, scaler=self.scaler,
                           world_size=dist_info.world_size,
                           loss_unit=self.generator.hu_norm.scale_hu if config.loss.units == "hu" else 1.0)
        # What validation scores and the checkpoints hold.
        self.exported = self.average.module if self.average is not None else self.generator
        self.patches_per_step = config.data.batch_size * self.settings.batches_per_step * dist_info.world_size
        self.t0 = time.monotonic()

    # ------------------------------------------------------------ building and restoring

    def _build_networks(self) -> None:
        config = self.config
        # Same initial weights on every rank (DDP would broadcast them anyway); each rank's
        # own random stream (dropout, the penalty's mixing weights) is seeded after this.
        torch.manual_seed(config.seed)
        self.generator = create_model(config.model, **config.model_kwargs)
        _check_network(self.generator, config, self.recipe, self.dist)
        self.critic = self.recipe.critic(config).to(self.device) if self.recipe.critic is not None else None
        if self.recipe.init_generator is not None:
            self.recipe.init_generator(self.generator)
        self.init_source = _warm_start(self.generator, config) if config.init and not self.resume else None
        self.perceptual = _perceptual(config, self.device)

    def _load_validation(self) -> None:
        from ldct_cli.training.data import validation_slices

        config = self.config
        self.val_slices = validation_slices(config.data.path, split="val", count=config.schedule.val_slices,
                                            context_slices=config.context_slices)
        if self.recipe.objective == "reconstruct":
            # The network learns to reproduce full-dose images: score that.
            for s in self.val_slices:
                s.low_hu = np.repeat(s.full_hu[None], config.context_slices, axis=0)
        else:
            centre = config.context_slices // 2
            self.input_metrics = _score(np.stack([s.low_hu[centre] for s in self.val_slices]),
                                        np.stack([s.full_hu for s in self.val_slices]), self.window)

    def _to_device(self) -> None:
        # channels-last: tensor-core friendly on CUDA; on the CPU oneDNN trains RED-CNN 1.8x and
        # WGAN-VGG 1.4x faster that way (measured), but not every network gains.
        channels_last = self.device.type == "cuda" or self.generator.cpu_channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = self.generator.to(self.device).train()
        if channels_last:
            to_channels_last(self.generator)
            if self.critic is not None:
                to_channels_last(self.critic)

    def _restore(self) -> None:
        state = torch.load(self.run_dir / STATE_FILE, map_location="cpu", weights_only=True)
        self.generator.load_state_dict(state["generator"])
        if self.average is not None:
            self.average.module.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.opt_d.load_state_dict(state["opt_d"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state.get("best")
        self.plateau = Plateau(**state.get("plateau", {}))
        self.init_source = state.get("init")
        if len(state["rng"]) == self.dist.world_size:
            _set_rng_state(state["rng"][self.dist.rank], self.device)
        else:  # resumed on another number of processes: continues, but not bit for bit
            torch.manual_seed(self.config.seed + 1000 * self.dist.rank + 1 + self.step)
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.dist.main:
            self.log.truncate_after(self.step)

    # ------------------------------------------------------------ running

    def describe(self, sampler) -> dict[str, Any]:
        return {"sampler": sampler.describe(), "device": str(self.device), "precision": self.precision,
                "world_size": self.dist.world_size, "input": self.input_metrics,
                "perceptual": self.config.loss.perceptual if self.perceptual is not None else "none"}

    def sampler(self):
        """The training patches from the current step on (a pure function of seed, rank, step)."""
        from ldct_cli.training.data import PatchSampler

        return PatchSampler(self.config.data.path, split="train", settings=self.settings, seed=self.config.seed,
                            start_step=self.step, rank=self.dist.rank, world_size=self.dist.world_size)

    def take_step(self, low_hu: torch.Tensor, full_hu: torch.Tensor) -> tuple[dict[str, float], float]:
        """One generator update on a bundle of HU batches; returns its losses and learning rate."""
        config, hu_norm = self.config, self.generator.hu_norm
        low = hu_norm.to_model(low_hu.to(self.device, non_blocking=True))
        full = hu_norm.to_model(full_hu.to(self.device, non_blocking=True))
        if self.memory_format is torch.channels_last:  # (n, B, k, P, P): per batch
            low = [b.contiguous(memory_format=self.memory_format) for b in low]
            full = [b.contiguous(memory_format=self.memory_format) for b in full]
        lr = _set_lr(self.opt_g, config.optimizer, self.step, self.plateau.lr_scale)
        _set_lr(self.opt_d, config.critic_optimizer, self.step, self.plateau.lr_scale)
        self.parts.step = self.step
        losses = self.recipe.step(self.parts, config, low, full)
        if self.average is not None:
            self.average.update(self.generator, self.step)
        self.step += 1
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"step {self.step}: a loss is not finite ({losses}); lower the "
                                     "learning rate or use --precision fp32")
        return losses, lr

    def validate(self) -> tuple[dict[str, float] | None, bool, bool]:
        """Score the exported generator (rank 0) and apply the plateau schedule (every rank);
        returns (scores or None on other ranks, a new best, stop early)."""
        val, is_best, reduce, early_stop = None, False, False, False
        if self.dist.main:
            val = _validate(self.exported, self.val_slices, device=self.device, precision=self.precision,
                            window=self.window)
            is_best = self.best is None or val["psnr"] > self.best["psnr"]
            if is_best:
                self.best = {"step": self.step, **val}
            self.log.append({"step": self.step, "kind": "val", "best": is_best, **val})
            write_curves(self.log.records(), self.run_dir / CURVES_FILE,
                         title=f"{self.config.model} ({self.config.recipe}) {self.run_dir.name}")
            reduce, early_stop = self.plateau.after_validation(is_best, self.config.schedule)
        if _any_rank(reduce, self.dist):
            self.plateau.lr_scale *= self.config.schedule.plateau_factor
        early_stop = _any_rank(early_stop, self.dist)
        _barrier(self.dist)
        return val, is_best, early_stop

    def save(self, is_best: bool, val: dict | None) -> None:
        """state.pt and last.safetensors (and best.safetensors, steps/); rank 0 writes."""
        rng = _rng_state(self.device)
        gathered: list[Any] = [rng]
        if self.dist.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
        if not self.dist.main:
            return
        self.folder.check()
        config, step = self.config, self.step
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            torch.save(self._state(gathered), tmp)
        training = self._provenance(val)
        files = [LAST] + ([BEST] if is_best else [])
        if config.schedule.keep_every and step % config.schedule.keep_every == 0:
            (self.run_dir / STEPS_DIR).mkdir(exist_ok=True)
            files.append(f"{STEPS_DIR}/step_{step:06d}.safetensors")
        for name in files:
            save_checkpoint(self.exported, self.run_dir / name, training=training, config=config.to_dict())

    def _state(self, rng: list[Any]) -> dict[str, Any]:
        """Everything ``_restore`` needs to continue exactly."""
        return {"step": self.step, "generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(),
                "ema": self.average.module.state_dict() if self.average is not None else None,
                "critic": self.critic.state_dict() if self.critic is not None else None,
                "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": rng, "best": self.best, "init": self.init_source, "plateau": asdict(self.plateau),
                "elapsed_s": self.elapsed_before + (time.monotonic() - self.t0),
                "config": self.config.to_dict()}

    def _provenance(self, val: dict | None) -> dict[str, Any]:
        """The ``training`` record of each checkpoint written."""
        perceptual = self.perceptual
        return {"step": self.step, "recipe": self.config.recipe, "dataset": str(self.config.data.path),
                "perceptual": self.config.loss.perceptual if perceptual is not None else "none",
                "perceptual_source": getattr(perceptual.extractor, "source", None) if perceptual is not None else None,
                "init": self.init_source, "world_size": self.dist.world_size, "precision": self.precision,
                "validation": val, "input_validation": self.input_metrics, "best": self.best}

    def generator_sha256(self) -> str:
        return tensors_sha256(_unwrap(self.parts.generator).state_dict())


class _Meter:
    """This session's clock: throughput (over each log interval and in all), time spent
    waiting for patches after the first batch, and the ``max_minutes`` deadline."""

    def __init__(self, run: _Run):
        self.patches_per_step = run.patches_per_step
        self.start_step = run.step
        self.t0 = self.t_steady = self.window_t = time.monotonic()
        self.window_steps, self.wait_s = 0, 0.0
        minutes = run.config.schedule.max_minutes
        self.deadline = self.t0 + 60 * minutes if minutes > 0 else math.inf

    def fetch(self, batches, step: int):
        t = time.monotonic()
        batch = next(batches)
        if step > self.start_step:  # the first fetch also waits for the workers to start
            self.wait_s += time.monotonic() - t
        else:
            self.t_steady = time.monotonic()
        return batch

    def stepped(self) -> float:
        """Count a step; the patches per second since the last log."""
        self.window_steps += 1
        return self.window_steps * self.patches_per_step / max(time.monotonic() - self.window_t, 1e-9)

    def logged(self) -> None:
        self.window_t, self.window_steps = time.monotonic(), 0

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline


def train(config: TrainConfig, run_dir: Path | str, *, resume: bool = False,
          progress: TrainProgress | None = None) -> TrainResult:
    """Train ``config.model`` with its recipe into ``run_dir`` (or continue it); see module doc."""
    dist_info = setup_distributed(config.device)
    try:
        return _train(_Run(config, Path(run_dir), dist_info, resume=resume), progress)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(run: _Run, progress: TrainProgress | None) -> TrainResult:
    from ldct_cli.training.data import make_loader

    schedule, main = run.config.schedule, run.dist.main
    report = progress if main else None
    sampler = run.sampler()
    if report is not None:
        report.started(start_step=run.step, max_steps=schedule.max_steps, info=run.describe(sampler))
    run.t0 = time.monotonic()
    meter = _Meter(run)
    stopped, signum, last_val, losses_seen = "max_steps", None, None, []
    if run.step < schedule.max_steps:
        with _StopRequest() as stop_request:
            loader = make_loader(sampler, workers=run.config.data.workers)
            batches = iter(loader)
            while run.step < schedule.max_steps:
                sample_step, low_hu, full_hu = meter.fetch(batches, run.step)
                assert sample_step == run.step, (sample_step, run.step)
                losses, lr = run.take_step(low_hu, full_hu)
                losses_seen.append(losses)
                rate, step = meter.stepped(), run.step
                last = step == schedule.max_steps
                if main and (step % schedule.log_every == 0 or last):
                    run.log.append({"step": step, "kind": "train", "lr": lr, "patches_per_s": round(rate, 2),
                                    "time_s": round(run.elapsed_before + time.monotonic() - run.t0, 2), **losses})
                    meter.logged()
                if report is not None:
                    report.stepped(step, losses, rate)
                val, is_best, early_stop = None, False, False
                validating = step % schedule.val_every == 0 or last
                if validating:
                    val, is_best, early_stop = run.validate()
                    if val is not None:
                        last_val = {"step": step, **val}
                        if report is not None:
                            report.validated(step, val, best=is_best)
                halt = _any_rank(stop_request.requested or meter.past_deadline(), run.dist)
                keep = schedule.keep_every and step % schedule.keep_every == 0
                if validating or keep or step % schedule.checkpoint_every == 0 or last or halt or early_stop:
                    run.save(is_best, val)
                if early_stop:
                    stopped = "early_stop"
                    break
                if halt:
                    stopped = "interrupted" if _any_rank(stop_request.requested, run.dist) else "max_minutes"
                    break
            del batches, loader
        signum = stop_request.signum
    return _result(run, meter, stopped=stopped, signum=signum, last_val=last_val, losses=losses_seen)


def _result(run: _Run, meter: _Meter, *, stopped: str, signum: int | None, last_val: dict | None,
            losses: list[dict[str, float]]) -> TrainResult:
    seconds = time.monotonic() - run.t0
    done = run.step - meter.start_step
    return TrainResult(
        run_dir=run.run_dir, start_step=meter.start_step, step=run.step, stopped=stopped,
        input_metrics=run.input_metrics, best=run.best, last_val=last_val,
        patches_per_s=done * run.patches_per_step / seconds if done else 0.0,
        data_wait_fraction=meter.wait_s / max(time.monotonic() - meter.t_steady, 1e-9) if done else 0.0,
        seconds=seconds, world_size=run.dist.world_size, rank=run.dist.rank,
        generator_sha256=run.generator_sha256(), losses=losses, stop_signal=signum)
