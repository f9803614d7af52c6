"""What the CLI shows people: --help that lists each option's values, its examples, the
pinned typer it was tested with, and `ldct denoise --dry-run`."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.synth import SeriesSpec, write_not_dicom, write_study

REPO = Path(__file__).resolve().parents[2]


def _values(*names: str) -> str:
    return "<" + "|".join(names) + ">"


def _library_choices() -> dict[tuple[str, str], str]:
    """(command, option) -> the values the library accepts, as --help should list them."""
    from ldct_cli.dicom.write import TRANSFER_SYNTAX_CHOICES
    from ldct_cli.inference import PRECISIONS
    from ldct_cli.metrics import PRESETS
    from ldct_cli.physics.projector import FILTERS
    from ldct_cli.prepare import SPLIT_BY, SPLITS
    from ldct_cli.training import config

    devices = _values("auto", "cpu", "cuda", "cuda:N")  # resolve_device's, checked below
    filters = _values(*FILTERS, "gauss:TAU")
    return {("denoise", "--device"): devices, ("denoise", "--precision"): _values(*PRECISIONS),
            ("denoise", "--transfer-syntax"): _values(*TRANSFER_SYNTAX_CHOICES),
            ("denoise", "--strength"): _values("auto", "HU"),
            ("simulate", "--device"): devices, ("simulate", "--filter"): filters,
            ("simulate", "--transfer-syntax"): _values(*TRANSFER_SYNTAX_CHOICES),
            ("phantom", "--device"): devices, ("prepare", "--device"): devices,
            ("prepare", "--filter"): filters, ("prepare", "--split-by"): _values(*SPLIT_BY),
            ("evaluate", "--device"): devices, ("evaluate", "--preset"): _values(*PRESETS),
            ("evaluate", "--split"): _values(*SPLITS),
            ("train", "--device"): devices, ("train", "--precision"): _values(*config.PRECISIONS),
            ("train", "--perceptual"): _values(*config.PERCEPTUAL)}


@pytest.mark.parametrize("command, option", sorted(_library_choices()))
def test_help_lists_the_values_each_option_accepts(cli, monkeypatch, command, option):
    monkeypatch.setenv("COLUMNS", "250")  # one option a line
    text = cli(command, "--help").stdout
    [line] = [line for line in text.splitlines() if re.match(rf"\W*{re.escape(option)}\s", line)]  # its row
    assert _library_choices()[(command, option)] in line


def test_every_device_offered_is_accepted_and_train_offers_no_mps(cli):
    import torch

    from ldct_cli.errors import UsageError
    from ldct_cli.inference import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("mps")  # what train used to offer
    assert "mps" not in cli("train", "--help").stdout


def test_denoise_help_examples_name_models_that_have_weights(cli):
    from ldct_cli.bundled import bundled_checkpoint
    from ldct_cli.models.registry import get_model_info

    text = cli("denoise", "--help").stdout
    named = re.findall(r"--model (\w+)", text.split("Examples", 1)[1])
    assert named
    for name in named:  # each example runs as printed: bundled weights, or a filter
        assert get_model_info(name).kind == "classical" or bundled_checkpoint(name) is not None, name


def test_typer_is_pinned_to_the_minor_release_it_was_tested_with():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [typer] = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "typer"]
    assert any(spec.operator == "<" for spec in typer.specifier)  # an upper bound
    assert typer.specifier.contains(version("typer"))


# --- denoise --dry-run --------------------------------------------------------------------

def test_dry_run_lists_what_a_run_would_do_and_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    write_study(tmp_path / "in", [SeriesSpec(n_slices=3, series_description="A"),
                                  SeriesSpec(n_slices=2, series_description="B", series_number=4)])
    write_not_dicom(tmp_path / "in" / "notes.txt")
    out = tmp_path / "out"
    args = ("denoise", tmp_path / "in", out, "--model", "nlm")

    dry = cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not out.exists()  # nothing written, not even OUT
    rows = [line.split() for line in dry.stdout.splitlines() if line.strip().startswith("series_")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("series_1", "3", "write"), ("series_2", "2", "write")]
    assert "notes.txt: not a DICOM file" in dry.stderr and "would skip" in dry.stderr
    assert "nothing written" in dry.stdout and max(len(line) for line in dry.stdout.splitlines()) <= 80

    planned = json.loads(cli(*args, "--dry-run", "--json").stdout)
    assert planned["dry_run"] and [s["status"] for s in planned["series"]] == ["would write"] * 2
    # a run writes where the dry run said; a dry run after it skips what is complete
    done = json.loads(cli(*args, "--json", "--quiet", "--workers", "0").stdout)
    assert [s["output"] for s in done["series"]] == [s["output"] for s in planned["series"]]
    again = json.loads(cli(*args, "--dry-run", "--json").stdout)
    assert [(s["status"], s["error"]) for s in again["series"]] == [
        ("skipped", "already complete (use --overwrite to write it again)")] * 2
    assert "skip: complete" in cli(*args, "--dry-run").stdout
    overwrite = json.loads(cli(*args, "--dry-run", "--json", "--overwrite").stdout)
    assert [s["status"] for s in overwrite["series"]] == ["would write"] * 2


def test_dry_run_checks_the_options_and_paths_like_a_run(tmp_path, cli):
    write_study(tmp_path / "in", [SeriesSpec(n_slices=1)])
    unknown = cli("denoise", tmp_path / "in", tmp_path / "out", "--model", "nope", "--dry-run")
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.stderr
    inside = cli("denoise", tmp_path / "in", tmp_path / "in" / "out", "--model", "nlm", "--dry-run")
    assert inside.exit_code == 2 and "must not lie inside each other" in inside.stderr
    assert not (tmp_path / "in" / "out").exists() and not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli("denoise", empty, tmp_path / "out", "--model", "nlm", "--dry-run")
    assert nothing.exit_code == 1 and "no CT series found" in nothing.stderr


# --- --json answers every failure; Ctrl-C says what is left -------------------------------

@pytest.mark.parametrize("args", [
    ("denoise", "IN", "OUT", "--model", "nlm", "--batch-size", "x"),  # parsed by typer
    ("denoise", "IN", "OUT", "--model", "nlm", "--no-such-flag"),
    ("denoise", "IN", "OUT", "--model", "redcnn", "--device", "bogus"),  # checked by the command
    ("noise", "MISSING"),
    ("evaluate", "MISSING"),
])
def test_json_gets_an_error_object_on_usage_errors(tmp_path, cli, args):
    write_study(tmp_path / "in", [SeriesSpec(n_slices=1)])
    given = [str(tmp_path / "in") if a == "IN" else str(tmp_path / "out") if a == "OUT"
             else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    result = cli(*given, "--json")
    assert result.exit_code == 2, result.output
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == 2 and answer["error"] and "\n" not in answer["error"]
    assert not (tmp_path / "out").exists()
    plain = cli(*given)  # without --json stdout stays empty
    assert plain.exit_code == 2 and plain.stdout == ""


@pytest.mark.parametrize("command", ["prepare", "evaluate"])
def test_ctrl_c_in_a_command_says_what_is_left_and_exits_130(tmp_path, cli, monkeypatch, command):
    from ldct_cli import evaluate as ev
    from ldct_cli import prepare as prep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    write_study(tmp_path / "low", [SeriesSpec(n_slices=2)])
    write_study(tmp_path / "full", [SeriesSpec(n_slices=2)])
    if command == "prepare":
        monkeypatch.setattr(prep, "prepare", interrupted)
        args = ("prepare", tmp_path / "data", "--low", tmp_path / "low", "--full", tmp_path / "full")
    else:
        monkeypatch.setattr(ev, "evaluate", interrupted)
        args = ("evaluate", tmp_path / "low", "--reference", tmp_path / "full", "--out", tmp_path / "data")
    result = cli(*args)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "run the same command again" in result.stderr
    assert "Aborted" not in result.output and "Traceback" not in result.output
