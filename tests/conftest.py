"""Shared fixtures: random-initialised checkpoints of every registered model, the CLI runner,
and the location of the real CT data (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = Path(os.environ.get("LDCT_SHARED_DATA", REPO.parent / "shared" / "data")) / "ct"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per registered model (seeded random weights): name -> path."""
    import torch

    from ldct_cli import create_model, list_models, save_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in list_models():
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.safetensors"
        save_checkpoint(create_model(name), paths[name], training={"note": "random init for tests"})
    return paths


@pytest.fixture
def cli():
    """Run ``ldct ARGS...`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from ldct_cli.cli import app

    runner = CliRunner()

    def run(*args: str | Path):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """../shared/data/ct, or skip the test when the real data is not beside the project."""
    if not SHARED_CT.is_dir():
        pytest.skip(f"real CT data not found at {SHARED_CT}")
    return SHARED_CT


def require_tool(name: str) -> str:
    """Path of a command-line validator; skip when absent unless CI requires it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("LDCT_REQUIRE_DICOM3TOOLS"):
            pytest.fail(f"{name} (Debian package dicom3tools) is required in CI but not installed")
        pytest.skip(f"{name} not installed (apt-get install dicom3tools)")
    return path
