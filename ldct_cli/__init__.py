"""ldct-cli: denoise low-dose CT DICOM series with trained generative models.

Scripting API (imported lazily, so ``import ldct_cli`` stays light)::

    from ldct_cli import create_model, save_checkpoint, load_checkpoint, denoise_series
"""

from ldct_cli._version import __version__

_EXPORTS = {
    "create_model": "ldct_cli.models.registry",
    "list_models": "ldct_cli.models.registry",
    "save_checkpoint": "ldct_cli.checkpoint",
    "load_checkpoint": "ldct_cli.checkpoint",
    "denoise_series": "ldct_cli.api",
    "build_denoiser": "ldct_cli.api",
    "run_denoise": "ldct_cli.pipeline",
    "DenoiseOptions": "ldct_cli.pipeline",
    "Denoiser": "ldct_cli.inference",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldct_cli' has no attribute {name!r}")
