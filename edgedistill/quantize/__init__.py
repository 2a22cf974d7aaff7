"""Quantization recipes, looked up by config type: `quantize(model_path, config, out_path)`.

Adding a recipe = a config class in configs.py plus a module here that registers its handler.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

_HANDLERS: dict[type, Callable[[Path, BaseModel, Path], Path]] = {}


def register_recipe(config_type: type):
    """Register the handler that applies configs of `config_type`."""
    def wrap(fn):
        _HANDLERS[config_type] = fn
        return fn

    return wrap


def quantize(model_path: Path, config: BaseModel, out_path: Path) -> Path:
    """Write `model_path` quantized per `config` to `out_path` and return it."""
    return _HANDLERS[type(config)](model_path, config, out_path)


from edgedistill.quantize import dynamic, fp32  # noqa: E402,F401  (registers the handlers)
