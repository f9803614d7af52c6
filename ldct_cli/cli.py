"""The ``ldct`` command line: each command validates, configures, calls the library, reports."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ldct_cli._version import __version__
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.models.registry import get_model_info, list_models

app = typer.Typer(
    name="ldct",
    help="Denoise low-dose CT DICOM series with trained generative models "
         "(RED-CNN, WGAN-VGG, Pix2Pix).",
    pretty_exceptions_show_locals=False,  # a traceback must never print a DICOM header
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Decoding and encoding scale with cores; beyond 4 the model is the bottleneck anyway.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldct-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Denoise low-dose CT DICOM series with trained generative models.

    Example: [bold]ldct denoise study/ denoised/ --weights runs/redcnn[/bold]
    """


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def denoise(
    input_path: Annotated[Path, typer.Argument(
        metavar="IN", help="A DICOM file, a series folder, or a whole tree of studies (never written to).")],
    output_dir: Annotated[Path, typer.Argument(
        metavar="OUT", help="Folder for the derived series (created; must not be inside IN).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help=f"Registered model whose bundled weights to use: {', '.join(list_models())}.")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="A checkpoint file (.safetensors), or an `ldct train` run folder "
                                "(its best checkpoint).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices (or tiles) per forward pass.")] = 4,
    precision: Annotated[str, typer.Option(
        help="fp32, bf16 or fp16. Reduced precision uses CUDA autocast; on a CPU it is always fp32.")] = "fp32",
    tile: Annotated[Optional[int], typer.Option(
        help="Process slices in tiles of this many pixels (overlapping, blended without seams) "
             "for large matrices or small memory.")] = None,
    blend: Annotated[float, typer.Option(
        help="Output = (1-B)*denoised + B*input. 0.3 keeps some CT texture (cascade paper); "
             "1 writes the input's pixels unchanged (the I/O path alone).")] = 0.0,
    transfer_syntax: Annotated[str, typer.Option(
        help="explicit: Explicit VR Little Endian. keep: keep a lossless input syntax "
             "(RLE, JPEG-LS, JPEG 2000, Deflated); JPEG Lossless becomes JPEG-LS lossless.")] = "explicit",
    series_number_offset: Annotated[int, typer.Option(
        help="Output Series Number = input Series Number + this.")] = 1000,
    overwrite: Annotated[bool, typer.Option(
        help="Write series again even when their output folder is complete.")] = False,
    workers: Annotated[int, typer.Option(
        help="Processes that decode and encode DICOM beside the model (0: none).")] = DEFAULT_WORKERS,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON summary on stdout (per series: input, output, slices, "
                       "seconds, status, error).")] = False,
) -> None:
    """Denoise every CT series under IN; write one new derived DICOM series per input series.

    Series are found recursively, sorted along the slice normal and converted to HU;
    every common transfer syntax decodes. Each output series gets new deterministic
    UIDs, DERIVED\\SECONDARY image type, and references to its source; patient, study,
    geometry and acquisition attributes are kept. Non-CT objects are skipped.
    A complete output series is skipped on a rerun (see --overwrite).

    Exit code: 0 all done, 1 some file or series failed, 2 bad usage.

    Examples:

      ldct denoise study/ out/ --weights runs/redcnn

      ldct denoise export/ out/ --model pix2pix --device cuda --batch-size 16

      ldct denoise big.dcm out/ --weights redcnn.safetensors --tile 256 --json
    """
    from ldct_cli.api import build_denoiser
    from ldct_cli.pipeline import DenoiseOptions

    def build(options):
        return build_denoiser(model=model, weights=weights, device=device, batch_size=batch_size,
                              precision=precision, tile=tile, options=options)

    _run_pipeline(input_path, output_dir, build=build, quiet=quiet, json_out=json_out,
                  options=lambda: DenoiseOptions(blend=blend, transfer_syntax=transfer_syntax,
                                                 series_number_offset=series_number_offset,
                                                 overwrite=overwrite, workers=workers))


def _run_pipeline(input_path: Path, output_dir: Path, *, build, options, quiet: bool,
                  json_out: bool) -> None:
    """What `denoise` and `simulate` share: start the workers, build the image transform
    (a model or the dose simulator) meanwhile, stream every series, report, exit."""
    from ldct_cli.cli_progress import RichProgress
    from ldct_cli.pipeline import make_executor, run_denoise

    try:
        opts = options()
        # Workers start first: they import their libraries while the model loads.
        with make_executor(opts.workers) as executor:
            transform, derivation = build(opts)
            show = not quiet and sys.stderr.isatty()
            with RichProgress(err, enabled=show) as progress:
                summary = run_denoise(input_path, output_dir, denoiser=transform,
                                      derivation=derivation, options=opts, progress=progress,
                                      executor=executor)
    except UsageError as exc:
        raise _fail(str(exc), EXIT_USAGE)
    except LdctError as exc:
        raise _fail(str(exc), EXIT_FAILED)

    for path, reason in summary.skipped_files:
        err.print(f"skipped {path}: {reason}", markup=False, soft_wrap=True)
    for path, reason in summary.failed_files:
        err.print(f"[red]failed[/red] {path}: {reason}", soft_wrap=True)
    for result in summary.series:
        if result.status == "failed":
            err.print(f"[red]failed[/red] series {result.input}: {result.error}", soft_wrap=True)
        elif result.status == "skipped":
            err.print(f"skipped series {result.input}: {result.error}", markup=False, soft_wrap=True)
    done = sum(r.status == "done" for r in summary.series)
    n_failed = sum(r.status == "failed" for r in summary.series) + len(summary.failed_files)
    if json_out:
        payload = {"version": __version__, "input": str(input_path), "output": str(output_dir),
                   **dict(derivation.settings), **summary.to_json()}
        typer.echo(json.dumps(payload, indent=2))
    elif not quiet:
        err.print(f"{done} series written to {output_dir}, "
                  f"{sum(r.status == 'skipped' for r in summary.series)} skipped, {n_failed} failed",
                  markup=False)
    if not summary.series and not summary.failed_files and not json_out:
        err.print(f"[yellow]no CT series found in {input_path}[/yellow]")
    raise typer.Exit(summary.exit_code)


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False,
) -> None:
    """List every registered model: what it is and the paper it comes from.

    Example: ldct models --json
    """
    from ldct_cli.api import bundled_checkpoint

    rows = []
    for name in list_models():
        info = get_model_info(name)
        bundled = bundled_checkpoint(name)
        rows.append({"name": name, "title": info.title, "paper": info.paper,
                     "hu_norm": info.hu_norm.to_dict(),
                     "bundled_weights": str(bundled) if bundled else None})
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("model", "what", "paper", "bundled weights")
    for row in rows:
        table.add_row(row["name"], row["title"], row["paper"], row["bundled_weights"] or "none yet")
    Console().print(table)


def _terminate(signum, frame):
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so partial output is removed.
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    app()
