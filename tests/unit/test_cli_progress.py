"""The denoise progress display: per-slice counts, seconds per slice and the time left."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from ldct_cli.cli_progress import RichProgress


def _shown(progress: RichProgress) -> str:
    """The progress lines as drawn now, one per task."""
    out = Console(file=io.StringIO(), width=100)
    out.print(progress._bar.make_tasks_table(progress._bar.tasks))
    return out.file.getvalue()


def _started(now: list[float], n_slices: int = 100) -> tuple[RichProgress, io.StringIO]:
    log = io.StringIO()
    progress = RichProgress(Console(file=log, width=100), enabled=True, get_time=lambda: now[0])
    progress.run_started(1)
    progress.series_started(SimpleNamespace(folder=Path("/in/abdomen"), n_slices=n_slices), Path("/out/abdomen_x"))
    return progress, log


def test_before_the_first_slice_the_time_spent_shows_that_it_is_working():
    now = [0.0]
    progress, _ = _started(now)
    now[0] = 75.0  # the model loads and runs its first batch
    line = _shown(progress).splitlines()[1]
    assert "0/100" in line and "first slices, 1:15" in line


def test_seconds_per_slice_and_time_left_from_the_average_pace():
    now = [0.0]
    progress, _ = _started(now)
    now[0] = 10.0
    for _ in range(4):  # a batch of 4 finishes at once
        progress.slices_done(1)
    line = _shown(progress).splitlines()[1]
    assert "4/100" in line and "2.50 s/slice, 4:00 left" in line


def test_slices_a_stopped_run_had_written_do_not_count_in_the_pace():
    now = [0.0]
    progress, log = _started(now)
    progress.slices_done(60)  # the pipeline's first report of a resumed series
    assert "first slices" in _shown(progress)
    now[0] = 8.0
    progress.slices_done(1)
    progress.slices_done(1)
    line = _shown(progress).splitlines()[1]
    assert "62/100" in line and "4.00 s/slice, 2:32 left" in line
    progress.series_finished(SimpleNamespace(status="done", slices=100, resumed_slices=60, output="/out/a",
                                             seconds=160.0))
    assert "wrote 100 slices to /out/a (160.0 s, 4.00 s/slice)" in log.getvalue()
