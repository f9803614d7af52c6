"""``ldct denoise``: discover series, stream them through a denoiser, write derived series.

Decoding and encoding run in worker processes while the model runs in this one, with a
bounded number of slices in flight, so throughput approaches the model's own and memory
stays flat whatever the series length. Each series is written into a hidden staging
folder and renamed into place only when complete: an interrupted or failed series
leaves nothing behind, and a rerun skips series whose folder exists.

A bad slice (its file's header or pixels cannot be used, its matrix is not its series',
or it cannot be written as a derived slice) is left out, whatever the cause: the other
slices are written, the series is published *incomplete* (``INCOMPLETE_MARKER`` in its
folder lists the bad files) so a rerun retries it, and each bad file is one entry of
``RunSummary.failed_files``. Only what is not one file's fault (the model, the disk) fails
the whole series.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ldct_cli.dicom.read import (Discovery, Series, brief, discover, load_slice, padding_mask, quiet_pydicom,
                                 rescale_of, stored_to_hu)
from ldct_cli.dicom.write import (
    TRANSFER_SYNTAX_CHOICES,
    CopyJob,
    Derivation,
    OutputUIDs,
    SliceJob,
    copy_slice,
    hu_to_stored,
    write_slice,
)
from ldct_cli.errors import DicomError, LdctError, SeriesError, UsageError
from ldct_cli.fsutil import (INCOMPLETE_MARKER, STAGING_PREFIX, AlreadyComplete, FolderBusy, atomic_path,
                             complete_slices, is_complete, is_within, safe_name, staged_folder)


@dataclass(frozen=True)
class DenoiseOptions:
    """How ``denoise`` runs and writes (the model and device live in the ``Denoiser``)."""

    blend: float = 0.0  # output = (1 - blend) * denoised + blend * input
    transfer_syntax: str = "explicit"
    series_number_offset: int = 1000
    overwrite: bool = False
    workers: int = 2  # decode/encode processes; 0 runs them in this process

    def __post_init__(self):
        if not 0.0 <= self.blend <= 1.0:
            raise UsageError(f"--blend {self.blend}: must be between 0 and 1")
        if self.transfer_syntax not in TRANSFER_SYNTAX_CHOICES:
            raise UsageError(f"--transfer-syntax {self.transfer_syntax!r}: expected "
                             f"{' or '.join(TRANSFER_SYNTAX_CHOICES)}")
        if self.workers < 0:
            raise UsageError("--workers must be 0 or more")


@dataclass
class SeriesResult:
    """What happened to one input series (paths and UIDs only: never patient tags)."""

    input: str
    output: str | None
    series_uid: str
    output_series_uid: str | None
    slices: int  # files of the series, bad ones included
    status: str  # "done", "incomplete" (written but for ``bad_files``), "skipped" or "failed"
    seconds: float = 0.0
    error: str | None = None
    clipped_pixels: int = 0
    resumed_slices: int = 0  # slices a stopped run had finished, kept instead of redone
    measured: dict | None = None  # what was measured of this series and set from it (scan-matched
    # simulation, an automatic filter strength)
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, why): not written


@dataclass
class RunSummary:
    """The whole run: per-series results plus the files skipped or failed on discovery."""

    series: list[SeriesResult] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    failed_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when any file or series failed or is incomplete, or when no CT series was found at all."""
        failed = self.failed_files or any(r.status in ("failed", "incomplete") for r in self.series)
        return 1 if failed or not self.series else 0

    def to_json(self) -> dict[str, Any]:
        """Each bad file is in ``failed_files`` with its error; a series' ``bad_files`` are paths."""
        return {
            "series": [{**asdict(r), "bad_files": [p for p, _ in r.bad_files]} for r in self.series],
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files],
            "failed_files": [{"path": p, "error": r} for p, r in self.failed_files],
            "exit_code": self.exit_code,
        }


class Progress(Protocol):
    """What the pipeline reports as it goes (the CLI draws it; the library never prints)."""

    def run_started(self, n_series: int) -> None: ...
    def series_started(self, series: Series, output: Path) -> None: ...
    def slices_done(self, n: int) -> None: ...
    def series_finished(self, result: SeriesResult) -> None: ...


class NoProgress:
    def run_started(self, n_series: int) -> None:
        pass

    def series_started(self, series: Series, output: Path) -> None:
        pass

    def slices_done(self, n: int) -> None:
        pass

    def series_finished(self, result: SeriesResult) -> None:
        pass


class InlineExecutor(cf.Executor):
    """Runs each task at submit time, in this process (``--workers 0``)."""

    def submit(self, fn, /, *args, **kwargs):
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # the caller sees it at .result(), as with a pool
            future.set_exception(exc)
        return future


def _warm_up() -> None:
    """Runs once in each new worker: its imports happen while this process loads the model."""
    import ldct_cli.dicom.write  # noqa: F401  (pydicom, numpy, the decoders)


def _worker_init(parent_pid: int | None = None) -> None:
    # Ctrl-C reaches the whole process group: only the main process handles it (and
    # removes partial output); workers finish or drop their task quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")  # why: ldct_cli.dicom.read
    if parent_pid is not None:
        _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the main process dies, even by kill -9 or the OOM killer (which
    no handler sees): the kernel's parent-death signal where Linux offers it, and a thread
    that watches the parent's pid everywhere (a dead parent's children are re-parented)."""
    import threading

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:  # already gone before the signal was set
        os._exit(1)
    threading.Thread(target=watch, name="ldct-parent-watch", daemon=True).start()


def make_executor(workers: int) -> cf.Executor:
    """A pool of ``workers`` processes (spawned: no forked torch state), or inline for 0.

    The workers start at once, in the background, rather than on the first slice.
    """
    if workers == 0:
        return InlineExecutor()
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(os.getpid(),))
    for _ in range(workers):
        pool.submit(_warm_up)
    return pool


def ordered_map(executor: cf.Executor, fn: Callable, items: Iterable, lookahead: int) -> Iterator:
    """``map`` in order with at most ``lookahead`` tasks in flight; pending ones cancelled on exit."""
    queue: deque[cf.Future] = deque()
    iterator = iter(items)
    try:
        for item in iterator:
            queue.append(executor.submit(fn, item))
            if len(queue) >= lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        for future in queue:
            future.cancel()


def check_paths(input_path: Path, output_dir: Path) -> None:
    """Refuse what could write inside the input or lose data, before any work."""
    if not input_path.exists():
        raise UsageError(f"{input_path}: no such file or folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: exists and is not a folder")
    root = input_path if input_path.is_dir() else input_path.parent
    if is_within(output_dir, root):
        where = input_path if input_path.is_dir() else f"{root}, the folder of the input file {input_path.name}"
        raise UsageError(f"{output_dir}: OUT is inside IN ({where}); nothing is ever written "
                         "inside the input tree")
    if is_within(input_path, output_dir):
        raise UsageError(f"{input_path}: IN is inside OUT ({output_dir}); choose an OUT outside IN")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{STAGING_PREFIX}probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise UsageError(f"{output_dir}: cannot write to OUT ({exc.strerror or exc})") from None


def output_folder(series: Series, input_path: Path, output_dir: Path, derivation: Derivation,
                  series_uid: str) -> Path:
    """OUT / <the series' folder relative to IN> / <number>_<description>_<model>_<uid hash>.

    Every component is sanitized, so no tag value can make a path leave OUT.
    """
    root = input_path if input_path.is_dir() else input_path.parent
    relative = series.folder.relative_to(root)
    parts = [safe_name(p) for p in relative.parts]
    label = safe_name(f"S{series.number if series.number is not None else 0}_{series.description}",
                      max_len=40)
    tag = series_uid.rsplit(".", 1)[-1][-8:]
    return output_dir.joinpath(*parts, f"{label}_{safe_name(derivation.label)}_{tag}")


ALREADY_COMPLETE = "already complete (use --overwrite to write it again)"


def process_series(series: Series, final: Path, *, denoiser, derivation: Derivation,
                   options: DenoiseOptions, executor: cf.Executor,
                   progress: Progress | None = None) -> SeriesResult:
    """Denoise one discovered series into the folder ``final``; never raises for bad data.

    Bad slices (the series' own ``bad`` files, and those that fail here) are left out and
    listed in ``bad_files``: the rest is published, marked incomplete (module docstring).
    """
    progress = progress or NoProgress()
    series_uid = derivation.uid("series", series.key)
    result = SeriesResult(input=str(series.folder), output=str(final), series_uid=series.series_uid,
                          output_series_uid=series_uid, slices=series.n_slices + len(series.bad),
                          status="done", bad_files=[(str(p), r) for p, r in series.bad])
    start = time.perf_counter()
    progress.series_started(series, final)
    try:
        adapt = getattr(denoiser, "adapt_to_series", None)
        if adapt is not None and options.blend < 1.0:  # fit the model to this series (its noise)
            denoiser, derivation = adapt(series, derivation)
        with staged_folder(final, overwrite=options.overwrite, resume=True,
                           n_files=series.n_slices) as staging:
            done = _resumable_slices(staging, series)
            result.resumed_slices = len(done)
            result.clipped_pixels, bad = _stream(series, staging, denoiser=denoiser, derivation=derivation,
                                                 options=options, executor=executor, progress=progress,
                                                 skip=done)
            result.bad_files += bad
            if len(bad) == series.n_slices:  # nothing to publish: staging is removed
                raise SeriesError(f"{series.folder}: no slice could be used ({len(result.bad_files)} bad "
                                  "files, each reported)")
            _mark_incomplete(staging, series, result.bad_files)
        if result.bad_files:
            result.status = "incomplete"
            result.error = (f"incomplete: {len(result.bad_files)} of {result.slices} files could not be used "
                            "(each reported); a rerun retries them")
        details = getattr(denoiser, "series_details", None)
        result.measured = details() if details is not None else None
    except AlreadyComplete:  # another run finished it while this one waited
        result.status, result.error = "skipped", ALREADY_COMPLETE
    except Exception as exc:  # one bad series never stops the others
        result.status, result.output = "failed", None
        if isinstance(exc, (LdctError, FolderBusy)):
            result.error = str(exc)
        elif isinstance(exc, OSError):  # a bad element is an EncodeError: this is the disk's
            result.error = f"{final}: cannot write ({exc.strerror or brief(exc)})"
        else:  # a case nobody foresaw: still one line, naming the series
            result.error = f"{series.folder}: unexpected {type(exc).__name__}: {brief(exc)}"
    result.seconds = round(time.perf_counter() - start, 3)
    progress.series_finished(result)
    return result


def _slices_sha256(series: Series) -> str:
    """What the output of ``series`` is made from: its slices' files and SOP Instance UIDs, in order."""
    listing = [[s.path.relative_to(series.folder).as_posix(), s.sop_instance_uid] for s in series.slices]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _resumable_slices(staging: Path, series: Series) -> set[int]:
    """The slices in ``staging`` that can be kept. An incomplete series made from other slices
    (a bad file since fixed, a file added or removed) starts again: its numbering and its
    slices' neighbours changed."""
    marker = staging / INCOMPLETE_MARKER
    if marker.exists():
        try:
            made_from = json.loads(marker.read_text()).get("slices_sha256")
        except (OSError, ValueError, AttributeError):
            made_from = None
        if made_from != _slices_sha256(series):
            for item in staging.iterdir():
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
    return complete_slices(staging, series.n_slices)


def _mark_incomplete(staging: Path, series: Series, bad_files: list[tuple[str, str]]) -> None:
    """Write (or, for a complete series, remove) the ``INCOMPLETE_MARKER`` of ``staging``."""
    marker = staging / INCOMPLETE_MARKER
    if not bad_files:
        marker.unlink(missing_ok=True)
        return
    record = {"series_uid": series.series_uid, "slices_sha256": _slices_sha256(series),
              "slices": series.n_slices + len(series.bad),
              "bad_files": [{"path": p, "error": r} for p, r in bad_files],
              "note": "incomplete: these input files could not be used; `ldct denoise` run again retries them"}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def _load_or_error(path: Path):
    """``load_slice``, or the file's DicomError returned: it leaves out that slice, not the series."""
    try:
        return load_slice(path)
    except DicomError as exc:
        return exc


def _stream(series: Series, staging: Path, *, denoiser, derivation: Derivation,
            options: DenoiseOptions, executor: cf.Executor, progress: Progress,
            skip: set[int] = frozenset()) -> tuple[int, list[tuple[str, str]]]:
    """Read, denoise and write every slice of ``series`` into ``staging`` but those in
    ``skip`` (already there); return the clipped count and the bad slices' (path, why).

    Workers decode (``load_slice``) and encode (``write_slice``); this process converts
    to HU, runs the model in batches, blends, converts back and restores padding, so
    only stored values and headers cross between processes. A slice whose file fails
    (DicomError) is left out; its neighbours take its place as context.
    """
    n = series.n_slices
    destinations = [staging / f"{i + 1:04d}.dcm" for i in range(n)]
    seen = Counter(s.sop_instance_uid for s in series.slices)
    unique = [seen[s.sop_instance_uid] == 1 for s in series.slices]
    lookahead = 2 * max(1, options.workers) + (denoiser.batch_size + denoiser.context_slices
                                               if denoiser is not None else 0)
    writes: deque[tuple[int, cf.Future]] = deque()
    bad: list[tuple[str, str]] = []
    clipped = 0
    if skip:
        progress.slices_done(len(skip))

    def reject(index: int, reason: str) -> None:  # a slice that never reaches a write
        bad.append((str(series.slices[index].path), reason))
        progress.slices_done(1)

    def collect() -> None:
        nonlocal clipped
        index, future = writes.popleft()
        try:
            clipped += future.result()
        except DicomError as exc:  # the source file's fault (OSError, the disk's, fails the series)
            bad.append((str(series.slices[index].path), exc.reason))  # counted when submitted

    def submit_write(index: int, fn, job) -> None:
        # Keep at most `lookahead` writes in flight: memory stays flat on any series length.
        writes.append((index, executor.submit(fn, job)))
        progress.slices_done(1)  # counted as it leaves the model, so progress moves batch by batch
        while len(writes) > lookahead:
            collect()

    try:
        if options.blend >= 1.0:  # output = input: each slice is read and written in one worker
            for i, s in enumerate(series.slices):
                if i in skip:
                    continue
                submit_write(i, copy_slice, CopyJob(source=s.path, series_key=series.key, index=i,
                                                    derivation=derivation, path=destinations[i],
                                                    unique_source_uid=unique[i]))
        else:
            slices = ordered_map(executor, _load_or_error, [s.path for s in series.slices], lookahead)
            for i, header, out_stored, n_clipped in _denoised(slices, n, denoiser, options.blend, skip,
                                                              reject=reject):
                uids = OutputUIDs.for_slice(header, derivation=derivation, series_key=series.key,
                                            index=i, unique_source_uid=unique[i])
                submit_write(i, write_slice, SliceJob(header=header, stored=out_stored,
                                                      n_clipped=n_clipped, uids=uids, derivation=derivation,
                                                      path=destinations[i], source=series.slices[i].path))
        while writes:
            collect()
    except BaseException:
        # No worker may still be writing into the staging folder when it is removed.
        for _, future in writes:
            future.cancel()
        cf.wait([future for _, future in writes])
        raise
    return clipped, bad


def _denoised(slices: Iterator[tuple[Any, np.ndarray] | DicomError], n: int, denoiser,
              blend: float, skip: set[int] = frozenset(), *,
              reject: Callable[[int, str], None] = lambda index, reason: None,
              ) -> Iterator[tuple[int, Any, np.ndarray, int]]:
    """Yield ``(index, header, output stored values, pixels clipped)`` for slices in order,
    but those in ``skip`` (still read, as other slices' context) and the bad ones (a
    DicomError in ``slices``, or failing here), which go to ``reject(index, why)``.

    Slices are batched (same matrix size only), each with its ``context_slices``
    neighbours (replicated at the ends of the series; a bad neighbour, or one of another
    matrix size, is replaced by the slice itself). Only the slices still needed as
    context are kept.
    """
    half = denoiser.context_slices // 2
    loaded: dict[int, tuple[Any, np.ndarray, np.ndarray] | None] = {}
    batch: list[int] = []

    def neighbour(j: int, center: np.ndarray) -> np.ndarray:
        item = loaded.get(j)
        return item[2] if item is not None and item[2].shape == center.shape else center

    def flush():
        stacks = []
        for i in batch:
            center = loaded[i][2]
            stacks.append(np.stack([neighbour(j, center) for j in context_indices(i, n, denoiser.context_slices)]))
        denoised = denoiser(np.stack(stacks), pixel_mm=pixel_spacing_mm(loaded[batch[0]][0]))
        if not np.isfinite(denoised).all():
            bad = [i + 1 for row, i in enumerate(batch) if not np.isfinite(denoised[row]).all()]
            raise LdctError(f"the model returned NaN or infinite values (slice {bad[0]} of {n}): "
                            "nothing written for this series")
        for row, i in enumerate(batch):
            header, stored, image_hu = loaded[i]
            out_hu = denoised[row] if blend == 0 else (1.0 - blend) * denoised[row] + blend * image_hu
            try:
                out_stored, n_clipped = hu_to_stored(out_hu, header)
                padding = padding_mask(header, stored, image_hu)
            except Exception as exc:  # its header's values (checked when read) still did not serve
                reject(i, f"cannot turn the output HU back into stored values ({type(exc).__name__}: "
                          f"{brief(exc)})")
                continue
            out_stored[padding] = stored[padding]  # not anatomy: written back unchanged
            yield i, header, out_stored, n_clipped
        batch.clear()

    next_out = 0
    for index, item in enumerate(slices):
        if isinstance(item, DicomError):
            loaded[index] = None
            if index not in skip:  # a slice written before stays written
                reject(index, item.reason)
        else:
            header, stored = item
            loaded[index] = (header, stored, stored_to_hu(stored, *rescale_of(header)))
        # Every slice whose neighbours are all loaded can join a batch.
        while next_out < n and (next_out + half <= index or index == n - 1):
            if next_out in skip or loaded[next_out] is None:  # written by an earlier run, or bad
                next_out += 1
            else:
                if batch and loaded[batch[0]][2].shape != loaded[next_out][2].shape:
                    yield from flush()
                batch.append(next_out)
                next_out += 1
                if len(batch) == denoiser.batch_size:
                    yield from flush()
            keep_from = (batch[0] if batch else next_out) - half
            for old in [k for k in loaded if k < keep_from]:
                del loaded[old]
    if batch:
        yield from flush()


def pixel_spacing_mm(header) -> float | None:
    """The row spacing of a slice in mm (square pixels assumed), or None when absent."""
    spacing = header.get("PixelSpacing")
    try:
        return float(spacing[0])
    except (TypeError, ValueError, IndexError):
        return None


def context_indices(index: int, n_slices: int, context_slices: int) -> list[int]:
    """Indices of the ``context_slices`` slices centred on ``index``, replicated at the ends."""
    half = context_slices // 2
    return [min(max(i, 0), n_slices - 1) for i in range(index - half, index - half + context_slices)]


def run_denoise(input_path: Path, output_dir: Path, *, denoiser, derivation: Derivation,
                options: DenoiseOptions, progress: Progress | None = None,
                discovery: Discovery | None = None,
                executor: cf.Executor | None = None) -> RunSummary:
    """Denoise every CT series under ``input_path`` into ``output_dir``.

    ``denoiser`` may be None only with ``blend == 1`` (the I/O path alone). One bad
    file or series never stops the others: each failure is recorded in the summary.
    ``executor``: a pool from ``make_executor`` started earlier (so its workers start
    while the model loads); by default one is made, and shut down, here.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    check_paths(input_path, output_dir)
    if denoiser is None and options.blend < 1.0:
        raise UsageError("a model is needed unless --blend 1")
    progress = progress or NoProgress()
    with quiet_pydicom():  # why: ldct_cli.dicom.read; the workers silence them too
        found = discovery or discover(input_path)
        summary = RunSummary(skipped_files=[(str(p), r) for p, r in found.skipped],
                             failed_files=[(str(p), r) for p, r in found.failed])
        progress.run_started(len(found.series))
        with contextlib.nullcontext(executor) if executor else make_executor(options.workers) as executor:
            for series in found.series:
                series_uid = derivation.uid("series", series.key)
                final = output_folder(series, input_path, output_dir, derivation, series_uid)
                if not options.overwrite and not series.bad and is_complete(final, series.n_slices):
                    summary.series.append(SeriesResult(
                        input=str(series.folder), output=str(final), series_uid=series.series_uid,
                        output_series_uid=series_uid, slices=series.n_slices,
                        status="skipped", error=ALREADY_COMPLETE))
                    progress.series_finished(summary.series[-1])
                    continue
                result = process_series(series, final, denoiser=denoiser, derivation=derivation,
                                        options=options, executor=executor, progress=progress)
                if result.status == "failed":
                    _prune_empty_folders(final.parent, stop=output_dir)
                summary.series.append(result)
                known = {path for path, _ in summary.failed_files}  # discovery's are there already
                summary.failed_files += [(p, r) for p, r in result.bad_files if p not in known]
    return summary


def _prune_empty_folders(folder: Path, *, stop: Path) -> None:
    """Remove the folders a failed series left empty, up to (not including) ``stop``."""
    stop = stop.resolve()
    folder = folder.resolve()
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or not ours to remove): stop here
            return
        folder = folder.parent


def now_for_dicom() -> tuple[str, str]:
    """(DA, TM) of this moment, for Instance Creation and Content Date/Time."""
    now = datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")
