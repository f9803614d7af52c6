"""The ``ldct`` command line: each command validates, configures, calls the library, reports."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
# typer 0.29 vendors click and exports neither (pinned; tests/e2e/test_cli_output.py fails if they move)
from typer._click.exceptions import UsageError as ClickUsageError
from typer._click.globals import get_current_context
from typer.core import TyperGroup

from ldct_cli._version import __version__
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.models.registry import get_model_info, list_models
from ldct_cli.precision import PRECISIONS as RUN_PRECISIONS
from ldct_cli.training.config import PERCEPTUAL, PRECISIONS as TRAIN_PRECISIONS

class _LdctGroup(TyperGroup):
    """The ``ldct`` group: what no single command can do for itself.

    A usage error found while parsing a command's options (a bad value, a missing
    argument) still answers ``--json`` with a JSON error object on stdout; a Ctrl-C or
    SIGTERM that a command does not handle itself says what is left and exits 130 / 143
    (commands write through temp files and staging folders, so nothing is half-written).
    """

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["ldct.argv"] = argv
        return ctx

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClickUsageError as exc:
            if "--json" in ctx.meta.get("ldct.argv", ()):
                typer.echo(json.dumps({"version": __version__, "error": exc.format_message(),
                                       "exit_code": exc.exit_code}, indent=2))
            raise
        except (KeyboardInterrupt, typer.Abort):
            err.print("interrupted: stopped; no file is left half-written (each is written through a "
                      "temporary name); run the same command again to redo it", markup=False)
            raise typer.Exit(_interrupted_exit_code()) from None


app = typer.Typer(
    name="ldct",
    cls=_LdctGroup,
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


def _one_of(*values: str) -> str:
    """An option's values as its --help metavar, the way typer shows a choice: <a|b|c>."""
    return "<" + "|".join(values) + ">"


# Checked by the library (one-line errors); listed here for --help, which must not import
# torch or pydicom to say so (tests/e2e/test_cli_output.py checks they agree with the library).
DEVICES = _one_of("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = _one_of(*RUN_PRECISIONS)
TRANSFER_SYNTAXES = _one_of("explicit", "keep")
FILTERS = _one_of("ramp", "shepp-logan", "hann", "gauss:TAU")
WINDOW_PRESETS = _one_of("redcnn", "full", "abdomen", "chest", "head")


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
    """One ``error:`` line on stderr and, for a command given --json, a JSON error object on
    stdout (a pipeline reading stdout gets an answer too); raise what it returns."""
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    ctx = get_current_context(silent=True)
    if ctx is not None and ctx.params.get("json_out"):
        typer.echo(json.dumps({"version": __version__, "error": message, "exit_code": code}, indent=2))
    return typer.Exit(code)


@contextlib.contextmanager
def _errors_exit(also: tuple[type[BaseException], ...] = ()):
    """Each command's library calls run inside this: a library error (or one of ``also``)
    becomes one ``error:`` line (and the --json error object) and the exit code, 2 for a
    usage error, 1 for anything else."""
    try:
        yield
    except (LdctError, *also) as exc:
        raise _fail(str(exc), EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED) from None


@app.command()
def denoise(
    input_path: Annotated[Path, typer.Argument(
        metavar="IN", help="A DICOM file, a series folder, or a whole tree of studies (never written to).")],
    output_dir: Annotated[Path, typer.Argument(
        metavar="OUT", help="Folder for the derived series (created; must not be inside IN).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help=f"A model with bundled weights ({', '.join(list_models())}; `ldct models` "
                              f"says which are bundled) or a classical filter ({', '.join(list_models('classical'))}).")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="A checkpoint file (.safetensors), or an `ldct train` run folder "
                                "(its best checkpoint).")] = None,
    strength: Annotated[str, typer.Option(
        metavar=_one_of("auto", "HU"),
        help="Classical filters only: auto (a factor times each series' measured noise SD: NLM's h "
             "0.9 SD, the TV weight 0.6 SD, BM3D's sigma 1 SD), or a fixed value in HU.")] = "auto",
    device: Annotated[str, typer.Option(
        metavar=DEVICES, help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices (or tiles) per forward pass.")] = 4,
    precision: Annotated[str, typer.Option(
        metavar=PRECISIONS,
        help="fp32, bf16 or fp16. Reduced precision uses CUDA autocast; on a CPU it is always fp32.")] = "fp32",
    tile: Annotated[Optional[int], typer.Option(
        help="Process slices in tiles of this many pixels (overlapping, blended without seams) "
             "for large matrices or small memory.")] = None,
    blend: Annotated[float, typer.Option(
        help="Output = (1-B)*denoised + B*input. 0.3 keeps some CT texture (cascade paper); "
             "1 writes the input's pixels unchanged (the I/O path alone).")] = 0.0,
    transfer_syntax: Annotated[str, typer.Option(
        metavar=TRANSFER_SYNTAXES,
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
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the series a run would write or skip (and why), with their slices "
                          "and output folders; write nothing. The model and options are checked.")] = False,
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

      ldct denoise export/ out/ --model redcnn --device cuda --batch-size 16

      ldct denoise big.dcm out/ --weights redcnn.safetensors --tile 256 --json

      ldct denoise study/ out_nlm/ --model nlm --strength 100

      ldct denoise archive/ out/ --model redcnn --dry-run
    """
    from ldct_cli.api import build_denoiser
    from ldct_cli.pipeline import DenoiseOptions

    def build(options):
        return build_denoiser(model=model, weights=weights, device=device, batch_size=batch_size,
                              precision=precision, tile=tile, options=options,
                              strength=_strength(strength))

    if model is not None and weights is None:
        _warn_below_bar(model)

    def options():
        return DenoiseOptions(blend=blend, transfer_syntax=transfer_syntax, overwrite=overwrite,
                              series_number_offset=series_number_offset, workers=workers)

    if dry_run:
        _dry_run(input_path, output_dir, build=build, options=options, json_out=json_out)
    _run_pipeline(input_path, output_dir, build=build, quiet=quiet, json_out=json_out, options=options)


def _dry_run(input_path: Path, output_dir: Path, *, build, options, json_out: bool) -> None:
    """``denoise --dry-run``: what a run would do with each series found, writing nothing.

    The run's own rules: its output folder, skipped when complete (unless --overwrite);
    files skipped or failed at discovery. Exits as the run would (1: a file failed or no
    CT series).
    """
    from ldct_cli.dicom.read import discover
    from ldct_cli.fsutil import is_complete, is_within
    from ldct_cli.pipeline import ALREADY_COMPLETE, RunSummary, SeriesResult, output_folder

    with _errors_exit():
        opts = options()
        if not input_path.exists():
            raise UsageError(f"{input_path}: no such file or folder")
        root = input_path if input_path.is_dir() else input_path.parent
        if is_within(output_dir, root) or is_within(input_path, output_dir):
            raise UsageError(f"{output_dir}: OUT and IN ({input_path}) must not lie inside each other")
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"{output_dir}: exists and is not a folder")
        _, derivation = build(opts)  # as the run does: unknown models, bad weights fail here
        found = discover(input_path)
    summary = RunSummary(skipped_files=[(str(p), r) for p, r in found.skipped],
                         failed_files=[(str(p), r) for p, r in found.failed])
    for series in found.series:
        uid = derivation.uid("series", series.key)
        final = output_folder(series, input_path, output_dir, derivation, uid)
        complete = is_complete(final, series.n_slices) and not series.bad and not opts.overwrite
        summary.series.append(SeriesResult(
            input=str(series.folder), output=str(final), series_uid=series.series_uid, output_series_uid=uid,
            slices=series.n_slices + len(series.bad), status="skipped" if complete else "would write",
            error=ALREADY_COMPLETE if complete else None))
    if json_out:
        typer.echo(json.dumps({"version": __version__, "dry_run": True, "input": str(input_path),
                               "output": str(output_dir), **summary.to_json()}, indent=2))
        raise typer.Exit(summary.exit_code)
    _print_table(["series", "slices", "would", "output folder (in OUT)"],
                 [[_shown_folder(r.input, input_path), str(r.slices),
                   "skip: complete" if r.status == "skipped" else "write",
                   str(Path(r.output).relative_to(output_dir))] for r in summary.series],
                 text_columns=("series", "would", "output folder (in OUT)"),
                 caption=f"dry run: nothing written; {sum(r.status != 'skipped' for r in summary.series)} "
                         f"of {len(summary.series)} series would be written to {output_dir}"
                         + ("; complete ones are skipped (--overwrite writes them again)"
                            if any(r.status == "skipped" for r in summary.series) else ""))
    for path, reason in summary.skipped_files:
        err.print(f"would skip {path}: {reason}", markup=False, soft_wrap=True)
    for path, reason in summary.failed_files:
        err.print(f"[red]would fail[/red] {escape(str(path))}: {escape(reason)}", soft_wrap=True)
    if not summary.series:
        err.print(f"[yellow]no CT series found in {escape(str(input_path))}[/yellow]")
    raise typer.Exit(summary.exit_code)


def _warn_below_bar(model: str) -> None:
    """One line on stderr when bundled weights are used that miss the quality bar."""
    from ldct_cli.bundled import bundled_entry

    try:
        entry = bundled_entry(model)
    except LdctError:
        return  # a bad manifest is reported, with the exit code, when the weights load
    if entry is not None and entry.meets_bar is False:
        missed = entry.failed_checks()
        shown = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
        err.print(f"warning: the bundled {model} weights are a preview: they miss the quality bar "
                  f"({shown}); see `ldct models {model}`", markup=False)


def _run_pipeline(input_path: Path, output_dir: Path, *, build, options, quiet: bool,
                  json_out: bool) -> None:
    """What `denoise` and `simulate` share: start the workers, build the image transform
    (a model or the dose simulator) meanwhile, stream every series, report, exit."""
    from ldct_cli.cli_progress import RichProgress
    from ldct_cli.pipeline import make_executor, run_denoise

    with _errors_exit():
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
        except KeyboardInterrupt:
            err.print(f"interrupted: the series written before this one are complete in {output_dir}; the "
                      "slices finished of this one are kept, hidden; run the same command again to continue",
                      markup=False)
            raise typer.Exit(_interrupted_exit_code())

    for path, reason in summary.skipped_files:
        err.print(f"skipped {path}: {reason}", markup=False, soft_wrap=True)
    for path, reason in summary.failed_files:
        err.print(f"[red]failed[/red] {escape(str(path))}: {escape(reason)}", soft_wrap=True)
    for result in summary.series:
        if result.status == "failed":
            err.print(f"[red]failed[/red] series {escape(result.input)}: {escape(str(result.error))}",
                      soft_wrap=True)
        elif result.status == "incomplete":
            err.print(f"[yellow]incomplete[/yellow] series {escape(result.input)}: {escape(str(result.error))}",
                      soft_wrap=True)
        elif result.status == "skipped":
            err.print(f"skipped series {result.input}: {result.error}", markup=False, soft_wrap=True)
    done = sum(r.status == "done" for r in summary.series)
    n_incomplete = sum(r.status == "incomplete" for r in summary.series)
    n_failed = sum(r.status == "failed" for r in summary.series) + len(summary.failed_files)
    if json_out:
        payload = {"version": __version__, "input": str(input_path), "output": str(output_dir),
                   **{key: _setting_value(value) for key, value in derivation.settings},
                   **summary.to_json()}
        typer.echo(json.dumps(payload, indent=2))
    elif not quiet:
        err.print(f"{done} series written to {output_dir}, "
                  + (f"{n_incomplete} written incomplete, " if n_incomplete else "")
                  + f"{sum(r.status == 'skipped' for r in summary.series)} skipped, {n_failed} failed",
                  markup=False)
    if not summary.series and not summary.failed_files and not json_out:
        err.print(f"[yellow]no CT series found in {escape(str(input_path))}[/yellow]")
    raise typer.Exit(summary.exit_code)


@app.command()
def simulate(
    input_path: Annotated[Path, typer.Argument(
        metavar="IN", help="Full-dose CT: a file, a series folder or a tree of studies (never written to).")],
    output_dir: Annotated[Path, typer.Argument(
        metavar="OUT", help="Folder for the simulated series (created; must not be inside IN).")],
    dose: Annotated[float, typer.Option(help="Dose fraction to simulate, e.g. 0.25 for quarter dose.")],
    i0: Annotated[Optional[float], typer.Option(
        help="Photons per ray at full dose for every slice (default: matched per slice to the "
             "slice's own measured noise, so --dose is a fraction of that scan's dose).")] = None,
    recon_filter: Annotated[Optional[str], typer.Option(
        "--filter", metavar=FILTERS,
        help="FBP window of the inserted noise: ramp, shepp-logan, hann or gauss:TAU "
             "(default: fitted to each series' measured noise texture; see ldct noise).")] = None,
    texture_offset: Annotated[float, typer.Option(
        help="Shift the fitted window's TAU by this much: negative sharper, positive softer "
             "(a kernel near the scan's own; not with --filter).")] = 0.0,
    electronic_noise: Annotated[float, typer.Option(
        help="Electronic noise per ray: its standard deviation in detector counts (0: none).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the noise: the same seed gives the same series.")] = 0,
    views: Annotated[int, typer.Option(help="Projection views over 180 degrees (parallel beam).")] = 720,
    device: Annotated[str, typer.Option(
        metavar=DEVICES, help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices per batch.")] = 4,
    transfer_syntax: Annotated[str, typer.Option(
        metavar=TRANSFER_SYNTAXES, help="explicit or keep (as for denoise).")] = "explicit",
    series_number_offset: Annotated[int, typer.Option(
        help="Output Series Number = input Series Number + this.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Write complete series again.")] = False,
    workers: Annotated[int, typer.Option(help="Processes that decode and encode DICOM.")] = DEFAULT_WORKERS,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Simulate a lower dose for every full-dose CT series under IN (projection-domain noise insertion).

    Each slice is forward projected (parallel beam), Poisson-like noise for the dose
    fraction is added to the line integrals, taking the noise the full-dose image
    already has into account, and the noise alone is reconstructed by filtered
    back-projection and added to the image. Scan-matched by default: each slice's
    photon count follows its own measured noise (tube current modulation included), the
    window follows the series' noise texture (sharp kernels get sharp noise), and what
    was measured and chosen goes into Derivation Description and the --json summary.
    Each output is a derived DICOM series, like the output of denoise, so it can be
    denoised and evaluated.

    Exit code: 0 all done, 1 some file or series failed, 2 bad usage.

    Examples:

      ldct simulate abdomen/ quarter/ --dose 0.25

      ldct simulate abdomen/ quarter/ --dose 0.25 --i0 48000 --filter hann   # fixed, not matched

      ldct simulate study/ low/ --dose 0.1 --electronic-noise 10 --seed 3 --device cuda
    """
    from ldct_cli.pipeline import DenoiseOptions
    from ldct_cli.simulate import build_simulator

    def build(options):
        return build_simulator(dose=dose, i0=i0, electronic_noise=electronic_noise, seed=seed,
                               n_views=views, device=device, batch_size=batch_size, options=options,
                               recon_filter=recon_filter, texture_offset=texture_offset)

    _run_pipeline(input_path, output_dir, build=build, quiet=quiet, json_out=json_out,
                  options=lambda: DenoiseOptions(transfer_syntax=transfer_syntax,
                                                 series_number_offset=series_number_offset,
                                                 overwrite=overwrite, workers=workers))


@app.command()
def phantom(
    output_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the phantom study.")],
    slices: Annotated[int, typer.Option(help="Number of slices (3 mm apart by default).")] = 32,
    size: Annotated[int, typer.Option(help="Matrix size (size x size).")] = 512,
    pixel_mm: Annotated[float, typer.Option(help="Pixel spacing in mm.")] = 0.7,
    slice_mm: Annotated[float, typer.Option(help="Slice spacing and thickness in mm.")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed: anatomy variations and noise.")] = 0,
    dose: Annotated[Optional[float], typer.Option(
        help="Also write a matched simulated low-dose series at this dose fraction, e.g. 0.25.")] = None,
    device: Annotated[str, typer.Option(
        metavar=DEVICES, help="auto, cpu, cuda or cuda:N (for the noise simulation).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing phantom in OUT.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No messages.")] = False,
) -> None:
    """Write a synthetic abdominal CT study as DICOM: OUT/full_dose, and with --dose its low-dose partner.

    Body, fat, muscle, liver, kidneys, spleen, contrast vessels, spine and ribs, lungs,
    bowel gas and low-contrast lesions, varying smoothly along z, with the quantum noise
    of a full-dose scan; realistic CT headers.

    Examples:

      ldct phantom demo/ --dose 0.25

      ldct phantom small/ --slices 8 --size 256 --seed 2
    """
    from ldct_cli.pipeline import DenoiseOptions
    from ldct_cli.simulate import make_phantom

    with _errors_exit():
        result = make_phantom(output_dir, n_slices=slices, size=size, seed=seed, pixel_mm=pixel_mm,
                              slice_mm=slice_mm, dose=dose, device=device,
                              options=DenoiseOptions(overwrite=overwrite, workers=0))
    if not quiet:
        err.print(f"full dose: {result.full_dose} ({result.slices} slices)", markup=False)
        if result.low_dose:
            err.print(f"low dose:  {result.low_dose}", markup=False)


@app.command()
def noise(
    input_path: Annotated[Path, typer.Argument(
        metavar="IN", help="A DICOM file, a series folder or a tree of studies (never written to).")],
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for noise.json and the NPS picture nps.png (must not be inside IN).")] = None,
    per_slice: Annotated[bool, typer.Option(help="Also print a row per slice.")] = False,
    every: Annotated[int, typer.Option(help="Measure every N-th slice only (a quicker look at a long series).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results (per slice too) as JSON on stdout.")] = False,
) -> None:
    """Measure each CT series' own quantum noise from its images: SD per slice, texture, NPS.

    Noise is read in soft tissue (-50 to 150 HU) at least 10 pixels inside the body, on
    the image's first and second differences, which anatomy hardly reaches: the level is
    the mode of their local SDs (5x5 windows, a quadratic fit removed), the texture the
    ratio of the two, fitted as the FBP window gauss:TAU that ldct simulate uses by
    default. The SD and NPS are those of noise with that texture at the measured level.
    Slices with too little soft tissue (lungs, head) give no estimate. Method and its
    check against real quarter-dose scans: docs/simulation.md.

    Exit code: 0 all measured, 1 a file or series could not be, 2 bad usage.

    Examples:

      ldct noise study/

      ldct noise study/ --out noise/ --per-slice

      ldct noise big_series/ --every 5 --json
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table as RichTable

    from ldct_cli import scan_noise
    from ldct_cli.fsutil import atomic_path, is_within

    if out is not None and input_path.exists() and is_within(out, input_path if input_path.is_dir()
                                                                   else input_path.parent):
        raise _fail(f"--out {out}: must not be inside the input {input_path}", EXIT_USAGE)
    bar = Progress(TextColumn("measuring noise"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, transient=True, disable=quiet or json_out)
    with _errors_exit():
        with bar:
            task = bar.add_task("slices", total=None)
            reports, found = scan_noise.measure(
                input_path, every=every, progress=lambda n: bar.advance(task, n),
                on_discovered=lambda series: bar.update(task, total=sum(
                    len(range(0, s.n_slices, every)) for s in series)))
    if not reports:
        raise _fail(f"{input_path}: no CT series found", EXIT_FAILED)
    payload = {"input": str(input_path), "series": [r.to_dict() for r in reports],
               "failed_files": [{"path": str(p), "error": e} for p, e in found.failed]}
    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "noise.json") as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
        written = [out / "noise.json", *scan_noise.write_nps_plots(out, reports)]
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
    else:
        table = RichTable("series", "slices", "SD (HU)", "SD range", "window", "f_avg /mm",
                          title="Quantum noise measured from the images")
        for column in table.columns[1:]:
            column.justify = "right"
        for r in reports:
            span = f"{r.noise_sd_range_hu[0]:g}-{r.noise_sd_range_hu[1]:g}" if r.noise_sd_range_hu else "-"
            table.add_row(escape(_shown_folder(r.folder, input_path)), f"{r.measured}/{r.slices}",
                          _num(r.noise_sd_hu), span, r.recon_filter or "-", _num(r.nps_f_avg_mm))
        Console(highlight=False).print(table)
        if per_slice:
            for r in reports:
                rows = RichTable("slice", "z (mm)", "SD (HU)", "level (HU)", "sharpness",
                                 "tissue px", title=escape(_shown_folder(r.folder, input_path)))
                for column in rows.columns:
                    column.justify = "right"
                for row in r.rows:
                    rows.add_row(str(row.index), _num(row.z_mm), _num(row.noise_sd_hu), _num(row.level_hu),
                                 _num(row.sharpness), str(row.tissue_pixels))
                Console(highlight=False).print(rows)
        if written:
            err.print(f"written: {', '.join(str(p) for p in written)}", markup=False)
    for r in reports:
        if r.error:
            err.print(f"error: {r.error}", markup=False)
    for path, error in found.failed:
        err.print(f"error: {error}", markup=False)
    raise typer.Exit(EXIT_FAILED if any(r.error for r in reports) or found.failed else EXIT_OK)


def _shown_folder(folder: str, root: Path) -> str:
    """A series folder as the table shows it: relative to IN when inside it."""
    try:
        rel = Path(folder).resolve().relative_to(root.resolve() if root.is_dir() else root.resolve().parent)
    except ValueError:
        return folder
    return str(rel) if str(rel) != "." else root.name


def _setting_value(text: str):
    """A derivation setting for JSON: numbers as numbers ("0.25" -> 0.25), words as they are."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _strength(text: str) -> float | None:
    """``--strength``: None for auto, else a positive number of HU."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{text!r}: give auto or a positive number of HU", param_hint="--strength")
    return value


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def _print_table(header: list[str], rows: list[list[str]], *, text_columns=(), title: str = "",
                 caption: str = "", fit: bool = True) -> None:
    """A table on stdout that fits the terminal: text columns wrap, numbers are right-aligned
    and never broken (headers wrap instead); every cell is escaped (labels are not markup).
    ``fit=False``: as wide as the table needs, wider than the terminal if need be."""
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table as RichTable

    table = RichTable(title=escape(title), caption=escape(caption), box=box.SIMPLE_HEAD,
                      caption_justify="left")
    for k, name in enumerate(header):
        if name in text_columns:  # these share what the numbers leave
            table.add_column(escape(name), overflow="fold")
        else:  # as wide as the longest number or header word: numbers stay whole
            width = max([len(str(row[k])) for row in rows] + [len(word) for word in name.split()])
            table.add_column(escape(name), justify="right", width=width)
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    out = Console(highlight=False)
    if not fit:
        needed = Measurement.get(out, out.options.update_width(10_000), table).maximum
        out = Console(highlight=False, width=max(out.width, needed))
    out.print(table)


@app.command()
def prepare(
    dataset: Annotated[Path, typer.Argument(metavar="DATASET", help="Dataset folder to create.")],
    low: Annotated[Optional[Path], typer.Option(help="Low-dose series folder (paired mode, with --full).")] = None,
    full: Annotated[Optional[Path], typer.Option(
        help="Full-dose series folder (paired mode), or a tree of full-dose series (with --simulate-dose).")] = None,
    mayo: Annotated[Optional[Path], typer.Option(
        help="A root with one folder per patient, each holding a low- and a full-dose series (Mayo/AAPM layout).")] = None,
    low_pattern: Annotated[str, typer.Option(help="With --mayo: folder pattern of the low-dose series.")] = "*quarter*",
    full_pattern: Annotated[str, typer.Option(help="With --mayo: folder pattern of the full-dose series.")] = "*full*",
    simulate_dose: Annotated[Optional[str], typer.Option(
        help="Simulate the low dose from --full at this fraction (e.g. 0.25), or at several "
             "(0.1,0.25,0.5: a low-dose file each, for variable-dose training; the first is the primary).")] = None,
    i0: Annotated[Optional[float], typer.Option(
        help="With --simulate-dose: photons per ray at full dose (default: matched to each slice's noise).")] = None,
    recon_filter: Annotated[Optional[str], typer.Option(
        "--filter", metavar=FILTERS,
        help="With --simulate-dose: FBP window of the noise, ramp, shepp-logan, hann or "
             "gauss:TAU (default: fitted to each series' noise texture).")] = None,
    realizations: Annotated[int, typer.Option(
        help="With --simulate-dose: noise draws per dose, each a low-dose file of its own; training "
             "draws among them, so the network sees more noise than one draw per slice.")] = 1,
    texture_spread: Annotated[str, typer.Option(
        help="With --simulate-dose: TAU offsets of the fitted noise texture, one per realization in "
             "turn, e.g. 0,-1,2 with --realizations 3: each scan's own kernel and a sharper and a "
             "softer one around it (negative: sharper).")] = "0",
    seed: Annotated[int, typer.Option(help="Seed of the simulated noise and of the split.")] = 0,
    spacing: Annotated[Optional[float], typer.Option(help="Resample in-plane to this pixel spacing (mm).")] = None,
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    split_by: Annotated[str, typer.Option(
        metavar=_one_of("auto", "case", "block"),
        help="case: whole cases per split; block: contiguous blocks of slices along z (for one or "
             "few patients); auto: by case, or by block when there are fewer cases than splits.")] = "auto",
    gap: Annotated[int, typer.Option(help="With --split-by block: slices left out between blocks.")] = 4,
    patch_size: Annotated[int, typer.Option(help="Training patch size (recorded for ldct train).")] = 64,
    patches_per_slice: Annotated[int, typer.Option(help="Patches drawn per slice (recorded).")] = 16,
    min_body_fraction: Annotated[float, typer.Option(
        help="Patches with less body (HU > -500) than this are rejected when sampling (recorded).")] = 0.5,
    device: Annotated[str, typer.Option(metavar=DEVICES, help="auto, cpu, cuda or cuda:N (simulation).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing DATASET.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Turn DICOM folders into a training dataset of paired low/full-dose slices.

    Slices are paired by position along the slice normal; HU from the rescale tags,
    padding to air; int16 HU arrays per case (memory-mappable .npy), a manifest with
    sources, geometry, the split and the patch-sampling settings. Written atomically.

    Examples:

      ldct prepare data/ --low qd/ --full fd/

      ldct prepare data/ --mayo mayo_root/ --low-pattern '*QD*' --full-pattern '*FD*'

      ldct prepare data/ --full abdomen/ --simulate-dose 0.25 --split-by block

      ldct prepare data/ --full abdomen/ --simulate-dose 0.1,0.25,0.5

      ldct prepare data/ --full abdomen/ --simulate-dose 0.25 --realizations 3
    """
    from ldct_cli import prepare as prep
    from ldct_cli.cli_progress import CaseBars

    try:
        fractions = tuple(float(x) for x in split.split(","))
    except ValueError:
        raise _fail(f"--split {split!r}: three numbers, e.g. 0.8,0.1,0.1", EXIT_USAGE)
    with _errors_exit():
        split_settings = prep.SplitSettings(fractions=fractions, by=split_by, seed=seed, gap=gap)
        patch = prep.PatchSettings(patch_size=patch_size, patches_per_slice=patches_per_slice,
                                   min_body_fraction=min_body_fraction)
        modes = [mayo is not None, low is not None, simulate_dose is not None]
        if sum(modes) != 1 or (low is not None and full is None) or (simulate_dose is not None and full is None):
            raise UsageError("choose one mode: --low DIR --full DIR, --mayo ROOT, or --full DIR --simulate-dose A")
        if texture_spread != "0" and simulate_dose is None:
            raise UsageError("--texture-spread needs --simulate-dose")
        if realizations != 1 and simulate_dose is None:
            raise UsageError("--realizations needs --simulate-dose (real low-dose series have one noise draw)")
        simulator = simulation = None
        if mayo is not None:
            sources = prep.mayo_sources(mayo, low_pattern=low_pattern, full_pattern=full_pattern)
        elif low is not None:
            sources = prep.paired_sources(low, full)
        else:
            simulator, simulation = prep.simulation_plan(
                simulate_dose, realizations=realizations, texture_spread=texture_spread, i0=i0,
                recon_filter=recon_filter, seed=seed, device=device)
            sources = prep.simulated_sources(full)
        how = {"command": "ldct prepare", "low": str(low) if low else None, "full": str(full) if full else None,
               "mayo": str(mayo) if mayo else None, "low_pattern": low_pattern, "full_pattern": full_pattern}
        with CaseBars(err, enabled=not quiet and sys.stderr.isatty()) as bars:
            manifest = prep.prepare(dataset, sources, simulator=simulator, simulation=simulation,
                                    spacing_mm=spacing, patch=patch, split=split_settings,
                                    overwrite=overwrite, how=how, progress=bars.update)
    if manifest["split_settings"].get("note"):
        err.print(f"note: {manifest['split_settings']['note']}", markup=False, soft_wrap=True)
    if not quiet:
        n = {name: sum(r["stop"] - r["start"] for r in ranges) for name, ranges in manifest["split"].items()}
        err.print(f"{dataset}: {len(manifest['cases'])} cases; slices train {n['train']}, "
                  f"val {n['val']}, test {n['test']} (split by {manifest['split_settings']['by']})",
                  markup=False)


@app.command()
def evaluate(
    test_dirs: Annotated[Optional[list[Path]], typer.Argument(
        metavar="TEST_DIR...", help="Series to score: the low-dose input, each model's output...")] = None,
    reference: Annotated[Optional[Path], typer.Option(
        help="Full-dose reference series (folder). Without it: reference-free metrics, each test "
             "series against the series it was derived from.")] = None,
    preset: Annotated[str, typer.Option(
        metavar=WINDOW_PRESETS,
        help="Window and data range L for PSNR/SSIM: redcnn [-160,240] L=400, full [-1024,3071], "
             "abdomen, chest, head.")] = "redcnn",
    window: Annotated[Optional[str], typer.Option(help="Custom window LO,HI in HU (overrides --preset).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Report folder: CSV, JSON, PNG pictures and report.html.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(
        help="Labels of the TEST_DIRs, in order (default: Series Description or folder name).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A `ldct prepare` dataset to score models on.")] = None,
    split: Annotated[str, typer.Option(
        metavar=_one_of("train", "val", "test"), help="With --data: the split to score.")] = "test",
    dose: Annotated[Optional[float], typer.Option(
        help="With --data: which simulated dose of a variable-dose dataset to score "
             "(default: its first, primary dose).")] = None,
    every: Annotated[int, typer.Option(
        help="With --data: score every N-th slice of the split only (a quicker look at a long "
             "split, e.g. --split train --every 10).")] = 1,
    model: Annotated[Optional[list[str]], typer.Option(
        help="With --data: bundled model(s) or classical filter(s) (nlm, tv) to run.")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option(help="With --data: checkpoint(s) to run.")] = None,
    roi_size: Annotated[int, typer.Option(help="Side of the uniform ROIs (noise, bias, NPS), pixels.")] = 32,
    roi_file: Annotated[Optional[Path], typer.Option(
        help=escape('JSON file of ROIs used on every slice instead of the automatic ones, and ROI pairs for '
                    'CNR: {"roi_px": 16, "uniform": [[row, col], ...], "cnr": [{"name": "lesion", '
                    '"a": [row, col], "b": [row, col]}]} (top-left corners, pixels).'))] = None,
    rois: Annotated[int, typer.Option(help="Uniform ROIs per slice.")] = 4,
    montage_slices: Annotated[int, typer.Option(help="Slices shown in each montage, spread along z.")] = 3,
    montage_z: Annotated[Optional[str], typer.Option(
        help="Show the slices nearest these positions instead, e.g. -120.5,-60 (mm along the normal).")] = None,
    device: Annotated[str, typer.Option(metavar=DEVICES, help="auto, cpu, cuda or cuda:N.")] = "auto",
    wide: Annotated[bool, typer.Option(
        "--wide", help="Every column in the table (RMSE, NPS f_peak, CNR...), wider than 80 characters.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full results as JSON on stdout.")] = False,
) -> None:
    """Score denoised series: PSNR, SSIM, RMSE, noise, HU bias and NPS, as tables and pictures.

    Test slices are paired with the reference by position along the slice normal (the
    Frame of Reference is kept by denoise and simulate). Every output names the window,
    the data range L and the SSIM variant.

    Examples:

      ldct evaluate --reference fd/ ld/ out_redcnn/ out_pix2pix/ --out report/

      ldct evaluate ld/ out_redcnn/ --out report/                 # reference-free

      ldct evaluate --data dataset/ --split test --weights runs/redcnn --out report/
    """
    from ldct_cli import evaluate as ev
    from ldct_cli.metrics import get_window

    with _errors_exit():
        try:
            chosen = get_window(window if window else preset)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        from ldct_cli.inference import resolve_device

        torch_device = resolve_device(device)
        from_file = ev.read_roi_file(roi_file) if roi_file is not None else {"roi_px": roi_size}
        settings = ev.Settings(window=chosen, n_rois=rois, device=str(torch_device), **from_file)
        if data is not None:
            if test_dirs or reference:
                raise UsageError("--data takes no TEST_DIR or --reference: the dataset holds both")
            from ldct_cli.api import build_denoisers

            for name in model or []:
                _warn_below_bar(name)
            denoisers = build_denoisers(models=model or [], weights=weights or [], device=device)
            tests, references = ev.dataset_inputs(data, split, denoisers, dose=dose, every=every)
        else:
            if dose is not None:
                raise UsageError("--dose picks a dose of a variable-dose --data DATASET; give --data")
            if every != 1:
                raise UsageError("--every picks slices of a --data DATASET's split; give --data")
            if not test_dirs:
                raise UsageError("give TEST_DIRs (with --reference or not), or --data DATASET")
            if label and len(label) != len(test_dirs):
                raise UsageError(f"{len(label)} --label for {len(test_dirs)} TEST_DIRs")
            tests = [s for k, d in enumerate(test_dirs)
                     for s in ev.load_input(d, label[k] if label else None)]
            references = ev.load_input(reference) if reference is not None else None
        if montage_z:
            try:
                montage_slices = [float(z) for z in montage_z.split(",")]
            except ValueError:
                raise UsageError(f"--montage-z {montage_z!r}: positions in mm, e.g. -120.5,-60") from None
        report = ev.evaluate(tests, reference=references, settings=settings, out=out,
                             montage_slices=montage_slices)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report, wide=wide, out=out)


def _print_report(report: dict, *, wide: bool, out: Path | None) -> None:
    """``ldct evaluate``'s table, its notes and where the report went."""
    from ldct_cli import evaluate as ev

    s = report["settings"]
    _print_table(*ev.summary_rows(report, wide=wide), text_columns=ev.TEXT_COLUMNS,
                 title=f"mean ± SD over slices; window [{s['window_hu'][0]:g}, {s['window_hu'][1]:g}] HU, "
                       f"L = {s['data_range_L']:g}",
                 caption=f"SSIM: {s['ssim_variant']}" + ("" if wide else "; all columns: --wide, or the "
                                                         "CSV files of --out"), fit=not wide)
    for series in report["series"]:
        for note in series["notes"]:
            err.print(f"note: {series['label']}: {note}", markup=False)
    if out is not None:
        err.print(f"report: {out / 'report.html'}", markup=False)


def _set_values(items: list[str]) -> dict:
    """``--set section.key=value`` pairs; values are read as TOML (numbers, true, "text", [..])."""
    import tomllib

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.pixel_weight=0.5")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except ValueError:
            values[key.strip()] = text.strip()  # bare words are text: --set loss.pixel=l1
    return values


def _variant_presets() -> list[str]:
    """Bundled recipe files that are variants, not a model's own recipe (cnn_mse, cascade3...)."""
    from ldct_cli.training.config import presets

    models = set(list_models(None))
    return [name for name in presets() if name not in models]


@app.command()
def train(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help=f"Generator to train: {', '.join(list_models(('generator', 'features')))}.")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Dataset folder made by `ldct prepare`.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Run folder to create (config, checkpoints, metrics log, curves).")] = None,
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", help="TOML (or a run's config.json) over the model's paper recipe; or a "
                               f"bundled preset: {', '.join(_variant_presets())}.")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue this run folder exactly where it stopped.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many generator updates.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        help="Stop (and save) after this many minutes of this session.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per batch.")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side in pixels.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Generator learning rate.")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate (and save) every N steps.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save the full state every N steps.")] = None,
    keep_every: Annotated[Optional[int], typer.Option(
        help="Also keep the generator of every Nth step (OUT/steps/step_NNNNNN.safetensors), "
             "to choose a checkpoint afterwards on data the run never saw. Default: off.")] = None,
    perceptual: Annotated[Optional[str], typer.Option(
        metavar=_one_of(*PERCEPTUAL),
        help="Perceptual features: vgg19, vgg16 (need --vgg-weights) or ct (bundled). "
             "Default: the recipe's; 'auto' = the recipe's VGG (vgg19; vgg16 for cascade) with a "
             "VGG file, else ct.")] = None,
    vgg_weights: Annotated[Optional[Path], typer.Option(
        help="torchvision's vgg19-dcbb9e9d.pth / vgg16-397923af.pth (or $LDCT_VGG_WEIGHTS).")] = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Warm start: begin from this checkpoint (or run folder's best) of the same model, "
             "e.g. a CNN-MSE run before WGAN-VGG. Recorded in the checkpoints.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, patches and noise.")] = None,
    device: Annotated[Optional[str], typer.Option(metavar=DEVICES, help="auto, cpu, cuda or cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option(
        metavar=_one_of(*TRAIN_PRECISIONS),
        help="auto (bf16 on CUDA when supported), fp32, bf16, fp16. The CPU trains in fp32.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader processes drawing patches.")] = None,
    set_values: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Any config key: --set loss.perceptual_weight=0.05 (repeatable).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Train a generator with its paper's losses and hyperparameters (defaults < --config < flags).

    Writes OUT/config.json, state.pt (to resume), best.safetensors and last.safetensors (for `ldct denoise --weights OUT`), metrics.jsonl and curves.png. Validation on full held-out slices every --val-every steps keeps the best PSNR.

    Ctrl-C (or SIGTERM) saves and stops; continue with --resume OUT. Multi-GPU and multi-node: launch with torchrun (DistributedDataParallel; rank 0 writes).

    Exit codes: 0 done, 1 failed, 2 bad options, 130 (Ctrl-C) or 143 (SIGTERM) interrupted (state saved).

    Examples:

      ldct train --model redcnn --data dataset/ --out runs/redcnn

      ldct train --model wgan_vgg --data dataset/ --out runs/wgan --vgg-weights vgg19-dcbb9e9d.pth

      ldct train --config wgan_mse --data dataset/ --out runs/wgan_mse --max-minutes 60

      ldct train --resume runs/redcnn --max-steps 200000

      torchrun --nproc_per_node 4 -m ldct_cli train --model pix2pix --data dataset/ --out runs/p2p
    """
    from ldct_cli.cli_progress import RichTrainProgress
    from ldct_cli.training.loop import train as run_training

    rank0 = int(os.environ.get("RANK", "0")) == 0
    flags = {"data.path": str(data) if data is not None else None, "schedule.max_steps": max_steps,
             "schedule.max_minutes": max_minutes, "data.batch_size": batch_size,
             "data.patch_size": patch_size, "optimizer.lr": lr, "schedule.val_every": val_every,
             "schedule.checkpoint_every": checkpoint_every, "schedule.keep_every": keep_every,
             "loss.perceptual": perceptual,
             "vgg_weights": str(vgg_weights) if vgg_weights is not None else None, "seed": seed,
             "init": str(init) if init is not None else None,
             "device": device, "precision": precision, "data.workers": workers}
    with _errors_exit(also=(FloatingPointError,)):
        flags.update(_set_values(set_values or []))
        cfg, run_dir = _train_config({k: v for k, v in flags.items() if v is not None}, model=model,
                                     config=config, out=out, resume=resume)
        show = rank0 and not quiet and not json_out
        with RichTrainProgress(err, enabled=show) as bar:
            result = run_training(cfg, run_dir, resume=resume is not None, progress=bar)
    if not rank0:
        return
    if json_out:
        typer.echo(json.dumps(result.summary(cfg), indent=2))
    elif not quiet:
        best = result.best
        err.print(f"{result.run_dir}: {result.step} steps ({result.stopped}), "
                  f"{result.patches_per_s:.1f} patches/s, waiting for data {100 * result.data_wait_fraction:.1f}%"
                  + (f"; best val PSNR {best['psnr']:.2f} dB at step {best['step']} "
                     f"(input {result.input_metrics['psnr']:.2f} dB)" if best else ""), markup=False)
    if result.stopped == "interrupted":
        err.print(f"interrupted: state saved at step {result.step}; continue with "
                  f"ldct train --resume {result.run_dir}", markup=False)
        raise typer.Exit(128 + int(result.stop_signal or signal.SIGINT))


def _train_config(given: dict, *, model: str | None, config: str | None, out: Path | None,
                  resume: Path | None):
    """The resolved config and run folder of ``ldct train``: a new run, or ``--resume`` of one
    with only the resumable flags changed."""
    from ldct_cli.training.config import changed_on_resume, resolve_config
    from ldct_cli.training.loop import CONFIG_FILE

    if resume is not None:
        changed = changed_on_resume(resume / CONFIG_FILE, given)
        if model or config or changed or (out is not None and out != resume):
            raise UsageError("--resume continues a run as it was configured; only --max-steps, "
                             "--max-minutes, --device and --workers may change"
                             + (f" (not {', '.join(changed)})" if changed else ""))
        if not (resume / CONFIG_FILE).is_file():
            raise UsageError(f"{resume}: not a run folder (no {CONFIG_FILE})")
        cfg, run_dir = resolve_config(model=None, config_file=resume / CONFIG_FILE, overrides=given), resume
    else:
        if out is None:
            raise UsageError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg, run_dir = resolve_config(model=model, config_file=config, overrides=given), out
        if not cfg.data.path:
            raise UsageError("--data DATASET is required (a folder made by `ldct prepare`)")
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        raise UsageError(f"{cfg.data.path}: not a dataset (no manifest.json); make one with `ldct prepare`")
    return cfg, run_dir


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(
        metavar="[NAME]", help="One model in detail: its paper, training data and held-out scores.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable list, with each bundled "
                                                          "checkpoint's whole manifest entry.")] = False,
) -> None:
    """List every registered model: its kind, whether weights are bundled, their held-out score.

    The scores, in [-160, 240] HU: the mean PSNR gain on real quarter-dose scans of other
    patients and scanners (AAPM/Mayo, never trained on), the gain on held-out real CT with
    simulated quarter dose, and whether the quality bar of docs/bundled_weights.md
    is met (both: on real data, each group at least the best NLM + 0.5 dB).
    `ldct models NAME` says what the model is, its paper, what its weights were trained on
    and every held-out score. Generators denoise (`ldct denoise --model NAME`); the
    "features" network is the CT perceptual-loss extractor that `ldct train` uses.

    Examples:

      ldct models

      ldct models redcnn

      ldct models --json
    """
    from ldct_cli.bundled import bundled_checkpoint, describe_lines, read_manifest, score_cells, weights_dir

    with _errors_exit():
        if name is not None:
            get_model_info(name)
        manifest = read_manifest()
    rows, damaged = [], False
    names = [name] if name is not None else list_models(None)
    for name in names:
        info = get_model_info(name)
        entry = manifest.get(name)
        row = {"name": name, "kind": info.kind, "recipe": info.recipe, "objective": info.objective,
               "variant_of": info.variant_of, "title": info.title, "paper": info.paper,
               "hu_norm": info.hu_norm.to_dict() if info.hu_norm is not None else None,
               "bundled_weights": None, "meets_bar": None, "bundled": None}
        if entry is not None:
            try:
                row["bundled_weights"] = str(bundled_checkpoint(name))
            except LdctError as exc:
                err.print(f"error: {exc}", markup=False)
                damaged = True
            row["meets_bar"] = entry.meets_bar
            row["bundled"] = entry.record
        rows.append(row)
    if json_out:
        typer.echo(json.dumps(rows if len(rows) > 1 else rows[0], indent=2, ensure_ascii=False))
    elif len(rows) > 1:
        _print_table(["name", "kind", "bundled", "real-data gain (dB)", "held-out gain (dB)", "quality bar"],
                     [[row["name"], row["kind"], *score_cells(row)] for row in rows],
                     text_columns=("name", "kind", "bundled", "quality bar"),
                     caption=f"weights folder: {weights_dir()}; details: ldct models NAME")
    else:
        import textwrap

        [row] = rows
        out = Console(highlight=False)
        about = (f"{row['kind']}, {row['objective']}, recipe {row['recipe']}"
                 if row["kind"] != "classical" else "classical filter")
        if row["variant_of"]:
            about += f"; a variant of {row['variant_of']}"
        out.print(f"[bold]{escape(row['name'])}[/bold] ({escape(about)}): {escape(row['title'])}")
        for line in [f"paper: {row['paper']}", *describe_lines(row), f"weights folder: {weights_dir()}"]:
            # one item a paragraph, its continuation lines indented under it
            out.print(textwrap.fill(line, width=max(40, out.width - 1), initial_indent="  ",
                                    subsequent_indent="    ", break_on_hyphens=False), markup=False)
    if damaged:
        raise typer.Exit(EXIT_FAILED)


_received_signal = {"number": signal.SIGINT}


def _terminate(signum, frame):
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C; the exit code says which (143).
    _received_signal["number"] = signum
    raise KeyboardInterrupt


def _interrupted_exit_code() -> int:
    """128 + the signal that stopped us: 130 for Ctrl-C, 143 for SIGTERM (the shell convention)."""
    return 128 + int(_received_signal["number"])


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    app()
