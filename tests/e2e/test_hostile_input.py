"""Hostile input (issue: batch runs that survive it): one bad value is one line for that file,
the other series are written, the exit code says something failed."""

from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pytest

from tests.synth import SeriesSpec, write_series


def _mutate(path, keyword, value):
    """Rewrite one element of a written file with raw bytes, as a damaged or careless writer would."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    raw = value.encode() + (b" " if len(value) % 2 else b"")
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), ds[tag].VR, len(raw), raw, 0, False, True)
    ds.save_as(path, enforce_file_format=True)


BAD = [
    ("InstanceNumber", "x1", "InstanceNumber 'x1': not an integer"),
    ("SeriesNumber", "1.5", "SeriesNumber '1.5': not an integer"),
    ("RescaleSlope", "0", "Rescale Slope 0"),
    ("RescaleSlope", "NaN", "RescaleSlope 'NaN': not a finite number"),
    ("RescaleIntercept", "inf", "RescaleIntercept 'inf': not a finite number"),
]


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "in"
    write_series(root / "good", SeriesSpec(n_slices=2, series_description="GOOD"))
    for k, (keyword, value, _) in enumerate(BAD):
        [path] = write_series(root / f"bad{k}", SeriesSpec(n_slices=1, series_description=f"BAD{k}"))
        _mutate(path, keyword, value)
    os.mkfifo(root / "good" / "pipe.dcm")  # reading it would block forever
    return root


def test_bad_header_values_are_one_line_each_and_the_rest_is_written(hostile, tmp_path, cli):
    result = cli("denoise", hostile, tmp_path / "out", "--model", "tv", "--strength", "50", "--json", "--quiet")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [s["status"] for s in summary["series"]] == ["done"]
    failed = {os.path.basename(os.path.dirname(f["path"])): f["error"] for f in summary["failed_files"]}
    for k, (_, _, message) in enumerate(BAD):
        assert message in failed[f"bad{k}"]
        assert "\n" not in failed[f"bad{k}"]
    assert {"path": str(hostile / "good" / "pipe.dcm"), "reason": "not a regular file"} in summary["skipped_files"]
    assert "Traceback" not in result.stderr


def test_a_model_that_returns_nan_fails_the_series(tmp_path):
    from ldct_cli import run_denoise
    from ldct_cli.api import build_classical
    from ldct_cli.pipeline import DenoiseOptions

    write_series(tmp_path / "in", SeriesSpec(n_slices=3))
    options = DenoiseOptions(workers=0)
    _, derivation = build_classical("tv", strength=10, options=options)

    class Broken:
        context_slices, batch_size = 1, 2

        def __call__(self, stack, *, pixel_mm=None):
            out = stack[:, 0].astype(np.float32)
            out[-1, 0, 0] = np.nan
            return out

    summary = run_denoise(tmp_path / "in", tmp_path / "out", denoiser=Broken(), derivation=derivation,
                          options=options)
    [series] = summary.series
    assert series.status == "failed" and "NaN or infinite" in series.error and summary.exit_code == 1
    assert list((tmp_path / "out").rglob("*.dcm")) == []


def test_square_brackets_in_paths_and_labels_are_text_not_markup(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the whole evaluate table on one screen
    result = cli("denoise", tmp_path / "[/x]", tmp_path / "out", "--model", "nlm")
    assert result.exit_code == 2 and "[/x]: no such file or folder" in result.stderr
    source = tmp_path / "[bold]in"
    write_series(source, SeriesSpec(n_slices=1))
    empty = cli("denoise", tmp_path / "[b]nothing", tmp_path / "out2", "--model", "nlm")
    assert empty.exit_code == 2 and "[b]nothing" in empty.stderr
    assert cli("denoise", source, tmp_path / "out", "--model", "tv", "--quiet").exit_code == 0
    table = cli("evaluate", source, *(tmp_path / "out").rglob("S*"))
    assert table.exit_code == 0, table.output
    assert "[ldct tv]" in table.stdout  # the derived series' label survives
    from ldct_cli.models.classical import Bm3d

    try:
        Bm3d()
    except Exception as exc:  # the package is not installed here: the hint keeps its [bm3d]
        result = cli("denoise", source, tmp_path / "out3", "--model", "bm3d")
        assert result.exit_code == 2 and "ldct-cli[bm3d]" in result.stderr, (exc, result.stderr)


def test_json_mode_answers_usage_errors_with_json(tmp_path, cli):
    write_series(tmp_path / "in", SeriesSpec(n_slices=1))
    result = cli("denoise", tmp_path / "in", tmp_path / "in" / "out", "--model", "nlm", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2 and "OUT is inside IN" in payload["error"]
    done = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "nlm", "--strength", "30", "--json",
               "--quiet")
    payload = json.loads(done.stdout)
    assert payload["blend"] == 0.0 and payload["strength_hu"] == 30.0  # numbers, not strings


def test_evaluate_names_a_missing_folder(tmp_path, cli):
    result = cli("evaluate", tmp_path / "nope")
    assert result.exit_code == 2 and "nope: no such file or folder" in result.stderr
