"""Generators of the papers this project implements, behind one registry."""

from ldct_cli.models.normalization import HUNormalization
from ldct_cli.models.registry import ModelInfo, create_model, get_model_info, list_models

__all__ = ["HUNormalization", "ModelInfo", "create_model", "get_model_info", "list_models"]
