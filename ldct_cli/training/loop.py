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
from ldct_cli.training.config import TrainConfig, batches_per_step, OptimizerConfig
from ldct_cli.training.steps import STEPS, Parts

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


def _critic(config: TrainConfig, device: torch.device):
    if config.recipe == "wgan_gp":
        from ldct_cli.training.critics import SimpleCnnCritic, WganCritic

        if config.loss.critic == "simple_cnn":
            return SimpleCnnCritic(in_channels=1).to(device)
        return WganCritic(in_channels=1, patch_size=config.data.patch_size).to(device)
    if config.recipe == "pix2pix":
        from ldct_cli.training.critics import PatchGanDiscriminator, init_pix2pix_weights

        critic = PatchGanDiscriminator(in_channels=config.context_slices + 1)
        critic.apply(init_pix2pix_weights)
        return critic.to(device)
    return None


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


def _check_patch_size(generator: torch.nn.Module, config: TrainConfig) -> None:
    multiple = int(getattr(generator, "size_multiple", 1))
    if config.data.patch_size % multiple:
        raise UsageError(f"data.patch_size {config.data.patch_size} must be a multiple of "
                         f"{multiple} for model {config.model!r}")


def _check_cascade(generator: torch.nn.Module, config: TrainConfig, dist_info: Dist) -> None:
    if config.recipe != "cascade":
        return
    levels = int(generator.levels)
    if len(config.schedule.stage_steps) != levels:
        raise UsageError(f"schedule.stage_steps has {len(config.schedule.stage_steps)} stage(s); a "
                         f"{levels}-level cascade needs {levels} (DRL, then each difference network)")
    if dist_info.world_size > 1:
        # Each stage trains a different part of the network, which DDP's reducer cannot follow.
        raise UsageError("recipe cascade trains in one process (no torchrun / DDP)")


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


def train(config: TrainConfig, run_dir: Path | str, *, resume: bool = False,
          progress: TrainProgress | None = None) -> TrainResult:
    """Train ``config.model`` with its recipe into ``run_dir`` (or continue it); see module doc."""
    from ldct_cli.training.data import PatchSampler, SamplerSettings, make_loader, validation_slices

    run_dir = Path(run_dir)
    dist_info = setup_distributed(config.device)
    try:
        device = _device(config, dist_info)
        # Same initial weights on every rank (DDP would broadcast them anyway), then a
        # different random stream per rank for dropout and the penalty's mixing weights.
        torch.manual_seed(config.seed)
        generator = create_model(config.model, **config.model_kwargs)
        _check_patch_size(generator, config)
        _check_cascade(generator, config, dist_info)
        critic = _critic(config, device)
        if config.recipe == "pix2pix":
            from ldct_cli.training.critics import init_pix2pix_weights

            generator.apply(init_pix2pix_weights)
        init_source = _warm_start(generator, config) if config.init and not resume else None
        perceptual = _perceptual(config, device)
        settings = SamplerSettings(
            patch_size=config.data.patch_size, batch_size=config.data.batch_size,
            context_slices=config.context_slices, batches_per_step=batches_per_step(config),
            body_threshold_hu=config.data.body_threshold_hu,
            min_body_fraction=config.data.min_body_fraction, augment=config.data.augment,
            dose_files=tuple(config.data.dose_files))
        # Built here to check the dataset against the settings before anything is written.
        sampler = PatchSampler(config.data.path, split="train", settings=settings, seed=config.seed,
                               rank=dist_info.rank, world_size=dist_info.world_size)
        window = get_window(config.window)
        val_slices, input_metrics = [], {}
        if dist_info.main:
            val_slices = validation_slices(config.data.path, split="val", count=config.schedule.val_slices,
                                           context_slices=config.context_slices)
            if config.recipe == "autoencoder":
                # The feature extractor learns to reproduce full-dose images: score that.
                for s in val_slices:
                    s.low_hu = np.repeat(s.full_hu[None], config.context_slices, axis=0)
            else:
                centre = config.context_slices // 2
                input_metrics = _score(np.stack([s.low_hu[centre] for s in val_slices]),
                                       np.stack([s.full_hu for s in val_slices]), window)
            prepare_run_dir(run_dir, config, resume=resume)
        _barrier(dist_info)

        # channels-last: tensor-core friendly on CUDA; on the CPU oneDNN trains RED-CNN 1.8x and
        # WGAN-VGG 1.4x faster that way (measured), but not every network gains.
        memory_format = (torch.channels_last if device.type == "cuda"
                         or getattr(generator, "cpu_channels_last", True) else torch.contiguous_format)
        generator = generator.to(device).train()
        if memory_format is torch.channels_last:
            to_channels_last(generator)
            if critic is not None:
                to_channels_last(critic)
        torch.manual_seed(config.seed + 1000 * dist_info.rank + 1)
        precision, autocast = _autocast(config, device)
        opt_g = _adam(generator.parameters(), config.optimizer)
        opt_d = _adam(critic.parameters(), config.critic_optimizer) if critic is not None else None
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        step, best, elapsed_before = 0, None, 0.0
        plateau = Plateau()
        folder = RunFolder(run_dir) if dist_info.main else None
        log = MetricsLog(run_dir / LOG_FILE, folder)
        average = WeightAverage(generator, config.ema_decay) if config.ema_decay > 0 else None
        if resume:
            state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)
            generator.load_state_dict(state["generator"])
            if average is not None:
                average.module.load_state_dict(state["ema"])
            opt_g.load_state_dict(state["opt_g"])
            if critic is not None:
                critic.load_state_dict(state["critic"])
                opt_d.load_state_dict(state["opt_d"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step, best = int(state["step"]), state.get("best")
            plateau = Plateau(**state.get("plateau", {}))
            init_source = state.get("init")
            if len(state["rng"]) == dist_info.world_size:
                _set_rng_state(state["rng"][dist_info.rank], device)
            else:  # resumed on another number of processes: continues, but not bit for bit
                torch.manual_seed(config.seed + 1000 * dist_info.rank + 1 + step)
            elapsed_before = float(state.get("elapsed_s", 0.0))
            if dist_info.main:
                log.truncate_after(step)
        elif dist_info.main and input_metrics:
            log.append({"step": 0, "kind": "input", **input_metrics})
        net = generator
        if dist_info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(generator, device_ids=[device.index] if device.type == "cuda" else None)
        hu_norm = generator.hu_norm
        parts = Parts(generator=net, opt_g=opt_g, critic=critic, opt_d=opt_d, perceptual=perceptual,
                      autocast=autocast, scaler=scaler, world_size=dist_info.world_size,
                      loss_unit=hu_norm.scale_hu if config.loss.units == "hu" else 1.0)
        step_fn = STEPS[config.recipe]
        exported = average.module if average is not None else generator  # what validation scores and checkpoints hold
        sampler = PatchSampler(config.data.path, split="train", settings=settings, seed=config.seed,
                               start_step=step, rank=dist_info.rank, world_size=dist_info.world_size)

        def save(kind_best: bool, val: dict | None) -> None:
            """state.pt and last.safetensors (and best.safetensors); rank 0 writes."""
            rng = _rng_state(device)
            if dist_info.world_size > 1:
                import torch.distributed as dist

                gathered: list[Any] = [None] * dist_info.world_size
                dist.all_gather_object(gathered, rng)
            else:
                gathered = [rng]
            if not dist_info.main:
                return
            folder.check()
            training = {"step": step, "recipe": config.recipe, "dataset": str(config.data.path),
                        "perceptual": config.loss.perceptual if parts.perceptual is not None else "none",
                        "perceptual_source": (getattr(parts.perceptual.extractor, "source", None)
                                              if parts.perceptual is not None else None),
                        "init": init_source,
                        "world_size": dist_info.world_size, "precision": precision,
                        "validation": val, "input_validation": input_metrics, "best": best}
            state = {"step": step, "generator": generator.state_dict(), "opt_g": opt_g.state_dict(),
                     "ema": average.module.state_dict() if average is not None else None,
                     "critic": critic.state_dict() if critic is not None else None,
                     "opt_d": opt_d.state_dict() if opt_d is not None else None,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": gathered, "best": best, "init": init_source, "plateau": asdict(plateau),
                     "elapsed_s": elapsed_before + (time.monotonic() - t0),
                     "config": config.to_dict()}
            with atomic_path(run_dir / STATE_FILE) as tmp:
                torch.save(state, tmp)
            save_checkpoint(exported, run_dir / LAST, training=training, config=config.to_dict())
            if kind_best:
                save_checkpoint(exported, run_dir / BEST, training=training, config=config.to_dict())
            if config.schedule.keep_every and step % config.schedule.keep_every == 0:
                (run_dir / STEPS_DIR).mkdir(exist_ok=True)
                save_checkpoint(exported, run_dir / STEPS_DIR / f"step_{step:06d}.safetensors",
                                training=training, config=config.to_dict())

        max_steps = config.schedule.max_steps
        if progress is not None and dist_info.main:
            progress.started(start_step=step, max_steps=max_steps,
                             info={"sampler": sampler.describe(), "device": str(device), "precision": precision,
                                   "world_size": dist_info.world_size, "input": input_metrics,
                                   "perceptual": config.loss.perceptual if parts.perceptual is not None else "none"})
        start_step = step
        t0 = t_steady = time.monotonic()
        wait_s, last_val, losses_seen = 0.0, None, []
        patches_per_step = config.data.batch_size * batches_per_step(config) * dist_info.world_size
        stopped = "max_steps"
        rate_t, rate_steps = time.monotonic(), 0
        deadline = t0 + 60 * config.schedule.max_minutes if config.schedule.max_minutes > 0 else math.inf
        if step >= max_steps:
            stopped = "max_steps"
        else:
            with _StopRequest() as stop_request:
                loader = make_loader(sampler, workers=config.data.workers)
                batches = iter(loader)
                while step < max_steps:
                    t_wait = time.monotonic()
                    sample_step, low_hu, full_hu = next(batches)
                    if step > start_step:  # the first fetch also waits for the workers to start
                        wait_s += time.monotonic() - t_wait
                    else:
                        t_steady = time.monotonic()
                    assert sample_step == step, (sample_step, step)
                    low = hu_norm.to_model(low_hu.to(device, non_blocking=True))
                    full = hu_norm.to_model(full_hu.to(device, non_blocking=True))
                    if memory_format is torch.channels_last:  # (n, B, k, P, P): per batch
                        low = [b.contiguous(memory_format=memory_format) for b in low]
                        full = [b.contiguous(memory_format=memory_format) for b in full]
                    lr = _set_lr(opt_g, config.optimizer, step, plateau.lr_scale)
                    _set_lr(opt_d, config.critic_optimizer, step, plateau.lr_scale)
                    parts.step = step
                    losses = step_fn(parts, config, low, full)
                    if average is not None:
                        average.update(generator, step)
                    step += 1
                    rate_steps += 1
                    losses_seen.append(losses)
                    if not all(math.isfinite(v) for v in losses.values()):
                        raise FloatingPointError(f"step {step}: a loss is not finite ({losses}); lower the "
                                                 "learning rate or use --precision fp32")
                    now = time.monotonic()
                    rate = rate_steps * patches_per_step / max(now - rate_t, 1e-9)
                    if dist_info.main:
                        if step % config.schedule.log_every == 0 or step == max_steps:
                            log.append({"step": step, "kind": "train", "lr": lr,
                                        "patches_per_s": round(rate, 2),
                                        "time_s": round(elapsed_before + now - t0, 2), **losses})
                            rate_t, rate_steps = now, 0
                        if progress is not None:
                            progress.stepped(step, losses, rate)
                    val = None
                    is_best = early_stop = False
                    validating = step % config.schedule.val_every == 0 or step == max_steps
                    if validating:
                        if dist_info.main:
                            val = _validate(exported, val_slices, device=device, precision=precision,
                                            window=window)
                            is_best = best is None or val["psnr"] > best["psnr"]
                            if is_best:
                                best = {"step": step, **val}
                            last_val = {"step": step, **val}
                            log.append({"step": step, "kind": "val", "best": is_best, **val})
                            write_curves(log.records(), run_dir / CURVES_FILE,
                                         title=f"{config.model} ({config.recipe}) {run_dir.name}")
                            if progress is not None:
                                progress.validated(step, val, best=is_best)
                        # Rank 0 alone validates; every rank applies its decisions.
                        reduce, early_stop = (plateau.after_validation(is_best, config.schedule)
                                              if dist_info.main else (False, False))
                        if _any_rank(reduce, dist_info):
                            plateau.lr_scale *= config.schedule.plateau_factor
                        early_stop = _any_rank(early_stop, dist_info)
                        _barrier(dist_info)
                    halt = _any_rank(stop_request.requested or time.monotonic() > deadline, dist_info)
                    keep = config.schedule.keep_every
                    if (validating or step % config.schedule.checkpoint_every == 0 or (keep and step % keep == 0)
                            or step == max_steps or halt or early_stop):
                        save(is_best, val)
                    if early_stop:
                        stopped = "early_stop"
                        break
                    if halt:
                        stopped = "interrupted" if _any_rank(stop_request.requested, dist_info) else "max_minutes"
                        break
                del batches, loader
        seconds = time.monotonic() - t0
        done = step - start_step
        return TrainResult(
            run_dir=run_dir, start_step=start_step, step=step, stopped=stopped, input_metrics=input_metrics,
            best=best, last_val=last_val,
            patches_per_s=done * patches_per_step / seconds if done else 0.0,
            data_wait_fraction=wait_s / max(time.monotonic() - t_steady, 1e-9) if done else 0.0,
            seconds=seconds,
            world_size=dist_info.world_size, rank=dist_info.rank,
            generator_sha256=tensors_sha256(_unwrap(net).state_dict()), losses=losses_seen,
            stop_signal=stop_request.signum)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
