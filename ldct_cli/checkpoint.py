"""Self-describing checkpoints: safetensors weights plus a JSON header that rebuilds the model.

safetensors holds only tensors and strings, so loading a file from anywhere can never
run code (unlike pickle-based ``torch.load``). The header records the model name and
constructor kwargs, the HU normalization, the training summary and config, the tool
version, and a sha256 of the tensors that is checked on every load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldct_cli._version import __version__
from ldct_cli.errors import CheckpointError, UsageError
from ldct_cli.fsutil import atomic_path
from ldct_cli.models.normalization import HUNormalization

FORMAT = "ldct-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
# What ``--weights RUN_DIR`` means: the best checkpoint that ``ldct train`` kept.
RUN_DIR_CHECKPOINT = "best" + SUFFIX


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything a checkpoint says about itself."""

    model: str
    model_kwargs: dict[str, Any]
    hu_norm: HUNormalization
    tensors_sha256: str
    tool_version: str
    created: str
    training: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "hu_norm": self.hu_norm.to_dict(),
            "tensors_sha256": self.tensors_sha256,
            "tool_version": self.tool_version,
            "created": self.created,
            "training": self.training,
            "config": self.config,
        }


def tensors_sha256(state_dict) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(model, path: Path | str, *, training: dict | None = None,
                    config: dict | None = None) -> CheckpointInfo:
    """Write ``model`` (made by ``create_model``) to ``path`` atomically; return its info."""
    from safetensors.torch import save

    path = Path(path)
    for attr in ("ldct_name", "ldct_kwargs", "hu_norm"):
        if not hasattr(model, attr):
            raise CheckpointError(f"model has no {attr!r}: build it with ldct_cli.create_model")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = CheckpointInfo(
        model=model.ldct_name,
        model_kwargs=dict(model.ldct_kwargs),
        hu_norm=model.hu_norm,
        tensors_sha256=tensors_sha256(state),
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training=dict(training or {}),
        config=dict(config or {}),
        path=path,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialized here and written with open(), so the file gets the user's umask
    # (safetensors' own save_file makes every file 0600).
    payload = save(state, metadata={"ldct": json.dumps(info.header(), sort_keys=True)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return info


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A checkpoint file as given, or a training run folder's best checkpoint."""
    path = Path(path)
    if path.is_dir():
        best = path / RUN_DIR_CHECKPOINT
        if not best.is_file():
            raise CheckpointError(f"{path}: a folder, but it holds no {RUN_DIR_CHECKPOINT} "
                                  "(expected an `ldct train` run folder or a checkpoint file)")
        return best
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def read_checkpoint_info(path: Path | str) -> CheckpointInfo:
    """The header of a checkpoint, without loading its tensors."""
    from safetensors import safe_open

    path = resolve_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from None
    try:
        header = json.loads(metadata["ldct"])
        if header.get("format") != FORMAT:
            raise ValueError("not an ldct-cli checkpoint")
        if int(header["format_version"]) > FORMAT_VERSION:
            raise ValueError(f"format version {header['format_version']} is newer than this "
                             f"ldct-cli ({__version__}) can read")
        from ldct_cli.models.registry import check_stored_kwargs, get_model_info

        get_model_info(header["model"])  # an unknown name is a UsageError naming the registry's
        return CheckpointInfo(
            model=header["model"],
            model_kwargs=check_stored_kwargs(header["model"], dict(header["model_kwargs"])),
            hu_norm=HUNormalization.from_dict(header["hu_norm"]),
            tensors_sha256=header["tensors_sha256"],
            tool_version=header["tool_version"],
            created=header["created"],
            training=header.get("training", {}),
            config=header.get("config", {}),
            path=path,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad ldct-cli checkpoint header ({exc})") from None
    except UsageError as exc:  # a model name the registry does not know
        raise CheckpointError(f"{path}: {exc}") from None


def load_checkpoint(path: Path | str, *, device: str = "cpu"):
    """Rebuild the model a checkpoint describes; returns ``(model, info)``, model in eval mode.

    The tensors' sha256 must match the header; the model's HU normalization comes from
    the checkpoint (the contract it was trained under), not from the registry default.
    """
    from safetensors.torch import load_file

    from ldct_cli.models.registry import create_model

    info = read_checkpoint_info(path)
    state = load_file(str(info.path), device="cpu")
    actual = tensors_sha256(state)
    if actual != info.tensors_sha256:
        raise CheckpointError(f"{info.path}: checksum mismatch (tensors sha256 {actual[:12]}…, "
                              f"header says {info.tensors_sha256[:12]}…): the file is damaged")
    model = create_model(info.model, **info.model_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{info.path}: weights do not fit model {info.model!r} ({first})") from None
    model.hu_norm = info.hu_norm
    return model.to(device).eval(), info
