"""Generators of the seed papers, behind one registry."""

from ldct_cli.models.normalization import HUNormalization
from ldct_cli.models.registry import ModelInfo, create_model, get_model_info, list_models

__all__ = ["HUNormalization", "ModelInfo", "create_model", "get_model_info", "list_models"]
