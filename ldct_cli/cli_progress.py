"""Rich progress bars for ``ldct denoise``: one line for the series, one for its slices."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RichProgress:
    """Implements the pipeline's Progress protocol; draws nothing when disabled."""

    def __init__(self, console: Console, *, enabled: bool):
        self.enabled = enabled
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=console, transient=True,
                             disable=not enabled)
        self._task = None
        self._run = None

    def __enter__(self) -> "RichProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def run_started(self, n_series: int) -> None:
        self._run = self._bar.add_task("series", total=n_series)

    def series_started(self, series, output: Path) -> None:
        self._task = self._bar.add_task(f"{series.folder.name} -> {output.name}", total=series.n_slices)

    def slices_done(self, n: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)

    def series_finished(self, result) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
        if self._run is not None:
            self._bar.advance(self._run, 1)
        if self.enabled and result.status == "done":
            self._bar.console.print(f"wrote {result.slices} slices to {result.output} "
                                    f"({result.seconds:.1f} s)", markup=False, highlight=False)
