"""Rich progress bars for ``ldct denoise``: one line for the series, one for its slices."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class SlicePace(ProgressColumn):
    """A series' pace: seconds per slice since it started (slices a stopped run had finished
    left out) and the time left at that pace; before its first slice, the time spent on it
    (loading, the first batch). The average, not the last interval: slices finish in batches."""

    def render(self, task) -> Text:
        if "resumed" not in task.fields:  # the bar of the whole run
            return Text("")
        done, elapsed = task.completed - task.fields["resumed"], task.elapsed or 0.0
        if done <= 0:
            return Text(f"first slices, {_clock(elapsed)}", style="progress.elapsed")
        pace = elapsed / done
        left = pace * max(0.0, (task.total or 0) - task.completed)
        return Text(f"{pace:.2f} s/slice, {_clock(left)} left", style="progress.remaining")


class RichProgress:
    """Implements the pipeline's Progress protocol; draws nothing when disabled.

    ``get_time``: the clock (tests); rich's monotonic one by default.
    """

    def __init__(self, console: Console, *, enabled: bool, get_time=None):
        self.enabled = enabled
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SlicePace(),
                             console=console, transient=True, disable=not enabled, get_time=get_time)
        self._task = None
        self._run = None
        self._counted = 0  # slices of this series reported so far

    def __enter__(self) -> "RichProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def run_started(self, n_series: int) -> None:
        self._run = self._bar.add_task("series", total=n_series)

    def series_started(self, series, output: Path) -> None:
        self._task = self._bar.add_task(f"{series.folder.name} -> {output.name}", total=series.n_slices,
                                        resumed=0)
        self._counted = 0

    def slices_done(self, n: int) -> None:
        if self._task is None:
            return
        if self._counted == 0 and n > 1:  # the pipeline's first report of a resumed series:
            self._bar.update(self._task, resumed=n)  # the slices a stopped run had written
        self._counted += n
        self._bar.advance(self._task, n)

    def series_finished(self, result) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
        if self._run is not None:
            self._bar.advance(self._run, 1)
        if self.enabled and result.status == "done":
            made = result.slices - result.resumed_slices
            pace = f", {result.seconds / made:.2f} s/slice" if made > 0 else ""
            self._bar.console.print(f"wrote {result.slices} slices to {result.output} "
                                    f"({result.seconds:.1f} s{pace})", markup=False, highlight=False)


class RichTrainProgress:
    """Implements the training loop's TrainProgress: a step bar with live losses and patches/s."""

    def __init__(self, console: Console, *, enabled: bool):
        self.console = console
        self.enabled = enabled
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                             console=console, transient=False, disable=not enabled)
        self._task = None
        self._val = ""

    def __enter__(self) -> "RichTrainProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def started(self, *, start_step: int, max_steps: int, info: dict) -> None:
        base = info.get("input") or {}
        if base:
            self._val = f"input PSNR {base['psnr']:.2f}"
        self._task = self._bar.add_task("steps", total=max_steps, completed=start_step, status=self._val)

    def stepped(self, step: int, losses: dict, patches_per_s: float) -> None:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in list(losses.items())[:4])
        self._bar.update(self._task, completed=step,
                         status=f"{shown}  {patches_per_s:.1f} patches/s  {self._val}")

    def validated(self, step: int, metrics: dict, *, best: bool) -> None:
        self._val = f"val PSNR {metrics['psnr']:.2f}{' (best)' if best else ''}"
        if self.enabled:
            self.console.print(f"step {step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                               f"RMSE {metrics['rmse_hu']:.1f} HU{'  best' if best else ''}",
                               markup=False, highlight=False)


class CaseBars:
    """One bar per case as ``ldct prepare`` writes them: ``update(case_id, done, total)``."""

    def __init__(self, console: Console, *, enabled: bool):
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=console, transient=True, disable=not enabled)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "CaseBars":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, case_id: str, done: int, total: int) -> None:
        if case_id not in self._tasks:
            self._tasks[case_id] = self._bar.add_task(case_id, total=total)
        self._bar.update(self._tasks[case_id], completed=done)
