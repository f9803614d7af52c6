"""The scripting API behind the CLI: load weights, build a denoiser, denoise a series."""

from __future__ import annotations

from pathlib import Path

from ldct_cli.bundled import bundled_checkpoint
from ldct_cli.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info
from ldct_cli.dicom.write import Derivation
from ldct_cli.errors import UsageError
from ldct_cli.models.registry import get_model_info
from ldct_cli.pipeline import DenoiseOptions, SeriesResult, now_for_dicom, run_denoise

def resolve_weights(*, model: str | None, weights: Path | str | None) -> Path:
    """The checkpoint that ``--model`` / ``--weights`` name (``--weights`` wins; both must agree)."""
    if weights is not None:
        path = Path(weights)
        if model is not None:
            info = read_checkpoint_info(path)
            if info.model != model:
                raise UsageError(f"--weights {path} holds a {info.model!r} model, not {model!r}")
        return path
    if model is None:
        raise UsageError("name a model: --model NAME (bundled weights) or --weights CHECKPOINT")
    bundled = bundled_checkpoint(model)
    if bundled is None:
        raise UsageError(f"no bundled weights for {model!r} (`ldct models` lists what is bundled): "
                         f"train it with `ldct train --model {model}` and pass --weights with the run "
                         "folder or a checkpoint file")
    return bundled


def build_classical(model: str, *, strength: float | None = None,
                    options: DenoiseOptions = DenoiseOptions()):
    """A weight-free filter (``kind == "classical"``) and its Derivation; ``strength`` in HU
    (None: automatic, from each series' measured noise)."""
    from ldct_cli.models.registry import create_model

    denoiser = create_model(model, **({} if strength is None else {"strength_hu": float(strength)}))
    date, time = now_for_dicom()
    derivation = Derivation.filtering(model=model, description=denoiser.describe(),
                                      strength_hu=denoiser.strength_hu, blend=options.blend,
                                      transfer_syntax=options.transfer_syntax,
                                      series_number_offset=options.series_number_offset,
                                      processed_date=date, processed_time=time)
    return (None if options.blend >= 1.0 else denoiser), derivation


def build_denoiser(*, model: str | None = None, weights: Path | str | None = None,
                   device: str = "auto", batch_size: int = 4, precision: str = "fp32",
                   tile: int | None = None, options: DenoiseOptions = DenoiseOptions(),
                   strength: float | None = None):
    """Load the checkpoint and return ``(Denoiser or None, Derivation)``.

    A classical ``model`` (nlm, tv, bm3d) needs no weights; ``strength`` (HU) is its one
    parameter, and only theirs. With ``options.blend == 1`` the model never runs, so only
    its header is read.
    """
    if model is not None and get_model_info(model).kind == "classical":
        if weights is not None:
            raise UsageError(f"--model {model} is a classical filter: it takes no --weights")
        return build_classical(model, strength=strength, options=options)
    if strength is not None:
        raise UsageError("--strength is the parameter of the classical filters (nlm, tv, bm3d) only")
    path = resolve_weights(model=model, weights=weights)
    kind = get_model_info(read_checkpoint_info(path).model).kind
    if kind != "generator":
        raise UsageError(f"{path}: a {kind} model, not a denoising generator")
    if options.blend >= 1.0:
        info: CheckpointInfo = read_checkpoint_info(path)
        denoiser = None
        used_precision = "fp32"
    else:
        from ldct_cli.inference import Denoiser, resolve_device

        torch_device = resolve_device(device)
        net, info = load_checkpoint(path)
        denoiser = Denoiser(net, info.hu_norm, torch_device, precision=precision,
                            batch_size=batch_size, tile=tile)
        used_precision = denoiser.precision
    date, time = now_for_dicom()
    derivation = Derivation.denoising(model=info.model, weights_sha256=info.tensors_sha256,
                                      blend=options.blend, precision=used_precision,
                                      transfer_syntax=options.transfer_syntax,
                                      series_number_offset=options.series_number_offset,
                                      processed_date=date, processed_time=time)
    return denoiser, derivation


def denoise_series(input_dir: Path | str, output_dir: Path | str, *, weights: Path | str,
                   device: str = "auto", batch_size: int = 4, precision: str = "fp32",
                   tile: int | None = None, options: DenoiseOptions = DenoiseOptions()) -> SeriesResult:
    """Denoise the one CT series in ``input_dir`` into a derived series under ``output_dir``.

    Returns its result: status "done", "incomplete" (written without the ``bad_files``,
    each with its reason; a rerun retries them), "skipped" (already complete) or
    "failed", with the output folder and the error.
    """
    from ldct_cli.dicom.read import discover

    found = discover(Path(input_dir))
    if len(found.series) != 1:
        raise UsageError(f"{input_dir}: expected one CT series, found {len(found.series)} "
                         "(use run_denoise or `ldct denoise` for trees)")
    denoiser, derivation = build_denoiser(weights=weights, device=device, batch_size=batch_size,
                                          precision=precision, tile=tile, options=options)
    summary = run_denoise(Path(input_dir), Path(output_dir), denoiser=denoiser, derivation=derivation,
                          options=options, discovery=found)
    return summary.series[0]


def build_denoisers(*, models: list[str] = (), weights: list[Path | str] = (),
                    device: str = "auto") -> dict[str, object]:
    """Denoisers by label for ``ldct evaluate --data``: each bundled model or classical filter
    by its name, each checkpoint as "MODEL (FILE NAME)" (the whole path when two share a name)."""
    denoisers: dict[str, object] = {}
    for name in models:
        denoisers[name], _ = build_denoiser(model=name, device=device)
    for path in weights:
        built, derivation = build_denoiser(weights=path, device=device)
        label = f"{derivation.setting('model')} ({Path(path).name})"
        if label in denoisers:
            label = f"{derivation.setting('model')} ({path})"
        denoisers[label] = built
    return denoisers
